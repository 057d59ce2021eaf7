import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from daskrecon.planning.reduction import reduction_plan
from daskrecon.runtime.graphs import tree_reduce


def evaluate(plan, leaves):
    level = list(leaves)
    for groups in plan:
        nxt = []
        for g in groups:
            acc = np.array(level[g[0]], copy=True)
            for j in g[1:]:
                acc += level[j]
            nxt.append(acc)
        level = nxt
    return level[0]


@given(st.integers(1, 300), st.integers(2, 9))
def test_plan_covers_each_input_once_with_bounded_fan_in(n, k):
    plan = reduction_plan(n, k)
    width = n
    for groups in plan:
        flat = [j for g in groups for j in g]
        assert flat == list(range(width))  # every input once, in order
        assert all(1 <= len(g) <= k for g in groups)
        width = len(groups)
    assert width == 1
    assert len(plan) == (0 if n == 1 else int(np.ceil(np.log(n) / np.log(k) - 1e-12)))


@given(st.integers(1, 40), st.integers(2, 5))
@settings(max_examples=50)
def test_plan_sums_exactly(n, k):
    leaves = [np.array([float(i)]) for i in range(n)]
    assert evaluate(reduction_plan(n, k), leaves)[0] == n * (n - 1) / 2


def test_bad_plans():
    with pytest.raises(ValueError):
        reduction_plan(0)
    with pytest.raises(ValueError):
        reduction_plan(4, 1)


def test_tree_reduce_on_cluster_is_bitwise_the_planned_sum(ctx):
    rng = np.random.default_rng(0)
    leaves = [rng.standard_normal((64, 64)).astype(np.float32) * 10.0 ** rng.integers(-3, 3) for _ in range(11)]
    futures = ctx.client.scatter(leaves, hash=False)
    got = tree_reduce(ctx.client, futures, fan_in=3).result()
    expected = evaluate(reduction_plan(11, 3), leaves)
    assert np.array_equal(got, expected)
