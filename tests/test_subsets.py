"""The operator subsets of stochastic algorithms: a partition and a schedule fixed by seed and iteration."""

import pytest
from hypothesis import given, settings, strategies as st

from daskrecon.planning.subsets import epoch_order, partition, subset_at


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.data())
def test_partition_is_interleaved_and_balanced(n, data):
    m = data.draw(st.integers(1, n))
    parts = partition(n, m)
    assert sorted(i for p in parts for i in p) == list(range(n))  # every operator exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(p == sorted(p) and all(i % m == j for i in p) for j, p in enumerate(parts))  # spans the acquisition


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.integers(0, 50))
def test_each_epoch_visits_every_subset_once_in_an_order_fixed_by_seed_and_epoch(seed, m, epoch):
    order = [subset_at(seed, epoch * m + p, m) for p in range(m)]
    assert sorted(order) == list(range(m))
    assert order == epoch_order(seed, epoch, m)  # a function of (seed, epoch) only: any process, any resume


def test_schedules_differ_between_seeds_and_epochs():
    a, b = epoch_order(0, 0, 12), epoch_order(1, 0, 12)
    assert a != b and epoch_order(0, 1, 12) != a
    assert [subset_at(0, k, 12, 5) for k in range(5)] == a[:5]  # shorter epochs take the first subsets


@pytest.mark.parametrize("m", [0, 5, 2.0])
def test_bad_subset_counts(m):
    with pytest.raises(ValueError, match="number of subsets must be an int between 1 and the number of operators"):
        partition(4, m)
