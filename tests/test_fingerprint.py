"""planning.fingerprint: a hash of what an object computes with, the same in every process."""

import os
import subprocess
import sys

import deepinv as dinv
import torch
from deepinv.physics.functional.blur import gaussian_blur

from daskrecon.planning.fingerprint import fingerprint

_BUILD = ("import deepinv as dinv\nfrom deepinv.physics.functional.blur import gaussian_blur\n"
          "ops = [dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0 + 0.5 * i, 1.0)), padding='circular') "
          "for i in range(2)]\n")


def _ops():
    namespace: dict = {}
    exec(_BUILD, namespace)
    return namespace["ops"]


def test_the_same_objects_hash_the_same_in_another_process():
    code = "import sys\nsys.path.insert(0, %r)\n" % os.path.dirname(os.path.dirname(__file__)) + _BUILD + (
        "from daskrecon.planning.fingerprint import fingerprint\nprint(fingerprint(ops))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           timeout=120).stdout.strip()
    assert fingerprint(_ops()) == there


def test_what_an_operator_computes_with_changes_its_hash():
    a, b = _ops()
    assert fingerprint(a) != fingerprint(b)  # another filter
    c = _ops()[0]
    c.filter.data[0, 0, 0, 0] += 1e-6
    assert fingerprint(c) != fingerprint(a)
    d = dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0, 1.0)), padding="reflect")
    assert fingerprint(d) != fingerprint(a)  # another padding (a plain attribute)


def test_the_train_or_eval_mode_does_not_change_the_hash():
    """deepinv's physics share one default ``ZeroNoise()``: an ``.eval()`` anywhere in the process flips
    it for every operator, which must not make a resumed run look like another problem."""
    a = _ops()[0]
    before = fingerprint(a)
    shared = a.noise_model
    shared.eval()
    try:
        assert fingerprint(a) == before and fingerprint(_ops()[0]) == before
    finally:
        shared.train()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    assert fingerprint(model) == fingerprint(model.eval())


def test_functions_hash_by_name_and_bytecode():
    def f(x):
        return x + 1

    def g(x):
        return x + 2

    assert fingerprint(f) == fingerprint(f) and fingerprint(f) != fingerprint(g)
