"""daskrecon.planning.schedules: per-iteration parameters as deepinv's ``params_algo`` lists index them."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from daskrecon.planning.schedules import as_schedule, check_covers, describe, value_at

values = st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=12)


@given(values, st.integers(min_value=0, max_value=30))
def test_value_at_is_deepinvs_rule(vs, k):
    """``value[k]`` for a list of more than one value, ``value[0]`` for one (deepinv's ``update_params_fn``)."""
    s = as_schedule(vs, "p")
    if len(vs) > 1 and k >= len(vs):
        with pytest.raises(IndexError):
            value_at(s, k)
    else:
        assert value_at(s, k) == (vs[k] if len(vs) > 1 else vs[0])


@given(values, st.integers(min_value=0, max_value=30))
def test_covers_exactly_when_every_iteration_has_a_value(vs, n_iter):
    s = as_schedule(vs, "p")
    if len(vs) == 1 or len(vs) >= n_iter:
        check_covers(s, n_iter, "p")
        for k in range(n_iter):
            value_at(s, k)
    else:
        with pytest.raises(ValueError, match=f"p has {len(vs)} values .* n_iter={n_iter}"):
            check_covers(s, n_iter, "p")


def test_numbers_sequences_tensors_and_arrays():
    assert as_schedule(0.5, "p") == (0.5,)
    assert as_schedule(2, "p") == (2.0,)
    assert as_schedule([0.2, 0.1], "p") == (0.2, 0.1)
    assert as_schedule(torch.tensor([0.2, 0.1]), "p") == pytest.approx((0.2, 0.1))
    assert as_schedule(np.array([3.0, 1.0]), "p") == (3.0, 1.0)
    assert as_schedule(torch.tensor(0.25), "p") == (0.25,)
    assert describe((0.5,)) == "0.5" and describe((0.2, 0.1)) == ["0.2", "0.1"]


def test_bad_schedules_are_refused_naming_the_value():
    with pytest.raises(ValueError, match="p is an empty schedule"):
        as_schedule([], "p")
    with pytest.raises(ValueError, match=r"p\[1\] must be > 0"):
        as_schedule([0.1, 0.0], "p")
    assert as_schedule([0.1, 0.0], "p", positive=False) == (0.1, 0.0)
    with pytest.raises(ValueError, match=r"p\[0\] must be >= 0"):
        as_schedule([-0.1, 0.2], "p", positive=False)
    with pytest.raises(ValueError, match="p must be > 0 and finite, got nan"):
        as_schedule(float("nan"), "p")
    with pytest.raises(TypeError, match=r"p\[1\] must be a number"):
        as_schedule([0.1, "x"], "p")
    with pytest.raises(TypeError, match="p must be a number or a sequence"):
        as_schedule("0.1", "p")
    with pytest.raises(TypeError, match="p must be a number or a sequence"):
        as_schedule(None, "p")
