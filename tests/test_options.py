"""One set of options and defaults for reconstruct() and the config file, checked once."""

import dataclasses
import inspect
from pathlib import Path

import pytest

import daskrecon as dr
from daskrecon.config import options_from
from daskrecon.engine.options import ReconstructOptions


def test_reconstruct_and_the_config_have_the_same_defaults():
    keywords = inspect.signature(dr.reconstruct).parameters
    for field in dataclasses.fields(ReconstructOptions):
        assert keywords[field.name].default == field.default, field.name
    assert options_from({"_base": Path(".")}) == ReconstructOptions()  # a config that says nothing


@pytest.mark.parametrize("bad, message", [
    (dict(algorithm="lbfgs"), "algorithm must be one of"),
    (dict(algorithm="os-pnp"), "needs n_subsets"),
    (dict(n_subsets=2), "n_subsets applies to 'os-pnp', 'svrg', 'osem'"),
    (dict(n_iter=-1), "n_iter must be a non-negative int"),
    (dict(checkpoint_every=0), "checkpoint_every must be a positive int"),
    (dict(tol=-1.0), "tol must be >= 0"),
    (dict(max_time=0), "max_time must be > 0"),
    (dict(storage="ram"), "storage must be one of"),
    (dict(prox_solver="direct"), "prox_solver must be one of"),
    (dict(red_weight=-0.5), "red_weight must be a number >= 0"),
    (dict(red_weight=float("nan")), "red_weight must be a number >= 0"),
    (dict(progress="no"), "progress must be True or False"),
    (dict(resume=True), "resume=True continues a checkpoint: pass checkpoint="),
    (dict(resume=True, overwrite=True, checkpoint="ck"), "resume=True continues the checkpoint and overwrite=True"),
])
def test_a_bad_option_is_named_when_the_options_are_made(bad, message):
    with pytest.raises(ValueError, match=message):
        ReconstructOptions(**bad)
    with pytest.raises(ValueError, match=message):
        ReconstructOptions().replace(**bad)
