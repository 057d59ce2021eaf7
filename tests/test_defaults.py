"""runtime.defaults: daskrecon's defaults in dask.config — shipped, documented, read by every keyword listed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import dask
import pytest
import torch
import yaml

import daskrecon as dr
from daskrecon.engine.options import CONFIGURED, ReconstructOptions
from daskrecon.runtime import defaults

from helpers import blurs, noisy_measurements, small_dncnn

DOC = Path(__file__).parents[1] / "docs" / "configuration.md"


def test_the_shipped_defaults_are_registered_and_documented_in_one_table():
    shipped = yaml.safe_load(open(defaults.PATH))["daskrecon"]
    rows = dict(re.findall(r"^\| `daskrecon\.([a-z0-9.-]+)` \| `([^`]*)` \|", DOC.read_text(), flags=re.M))
    assert sorted(rows) == sorted(defaults.keys())  # every key in the table, nothing else
    for key in defaults.keys():
        section, name = key.split(".")
        value = shipped[section][name]
        assert defaults.default(key) == value  # registered (no user config in the test environment)
        shown = {None: "null", True: "true", False: "false"}.get(value, value) if not isinstance(value, float) \
            else value
        assert yaml.safe_load(rows[key]) == value or rows[key] == str(shown), (key, rows[key], value)


def test_reconstruct_options_take_the_configured_defaults_and_keywords_win():
    assert ReconstructOptions().n_iter == defaults.default("reconstruct.iterations") == 20
    with dask.config.set({"daskrecon.reconstruct.iterations": 7, "daskrecon.reconstruct.progress": False,
                          "daskrecon.reconstruct.cg-tol": 1e-3}):
        opts = ReconstructOptions()
        assert (opts.n_iter, opts.progress, opts.cg_tol) == (7, False, 1e-3)
        assert ReconstructOptions(n_iter=3).n_iter == 3
        assert ReconstructOptions.default("n_iter") == 7
    assert ReconstructOptions().n_iter == 20  # the block ended
    with dask.config.set({"daskrecon.reconstruct.storage": "disk"}):
        with pytest.raises(ValueError, match="storage must be one of"):  # checked as a keyword would be
            ReconstructOptions()
    assert set(CONFIGURED.values()) == {k.split(".")[1] for k in defaults.keys() if k.startswith("reconstruct.")}


def test_reconstruct_and_the_denoiser_run_with_what_the_config_says(ctx):
    ops = blurs(2)
    x = torch.rand(1, 3, 32, 32)
    y = noisy_measurements(ops, x)
    dphys = dr.distribute(ops, ctx)
    with dask.config.set({"daskrecon.reconstruct.iterations": 3, "daskrecon.denoiser.patch-size": 16,
                          "daskrecon.denoiser.overlap": 6, "daskrecon.reconstruct.progress": False}):
        dden = dr.distribute(small_dncnn(3), ctx)
        assert (dden.patch_size, dden.overlap) == (16, 6)
        _, hist = dr.reconstruct(dphys, y, dden, step_size=0.5, return_history=True)
    assert len(hist) == 3
    _, hist = dr.reconstruct(dphys, y, dden, step_size=0.5, n_iter=2, progress=False, return_history=True)
    assert len(hist) == 2 and dr.distribute(small_dncnn(3), ctx).patch_size == 256
    with dask.config.set({"daskrecon.context.fan-in": 3, "daskrecon.context.stall-timeout": 9.0}):
        c = dr.DistributedContext(ctx.client)
        assert (c.fan_in, c.stall_timeout) == (3, 9.0)
        assert dr.DistributedContext(ctx.client, fan_in=5).fan_in == 5
    with dask.config.set({"daskrecon.denoiser.precision": "half"}):
        with pytest.raises(ValueError, match="precision must be one of"):
            dr.distribute(small_dncnn(3), ctx)


def test_environment_variables_set_them_as_dask_reads_them():
    env = dict(os.environ, DASK_DASKRECON__RECONSTRUCT__ITERATIONS="11", DASK_DASKRECON__DENOISER__PATCH_SIZE="64",
               DASK_DASKRECON__CONTEXT__STALL_TIMEOUT="600")
    code = ("import daskrecon; from daskrecon.runtime.defaults import default; "
            "from daskrecon.engine.options import ReconstructOptions; "
            "print(default('denoiser.patch-size'), default('context.stall-timeout'), ReconstructOptions().n_iter)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["64", "600", "11"]
