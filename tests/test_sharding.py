from collections import Counter

import pytest
from hypothesis import given, strategies as st

import itertools

from daskrecon.sharding import assign_owners, balance_loads

sizes = st.integers(min_value=0, max_value=200)
workers = st.integers(min_value=1, max_value=17)


@given(sizes, workers)
def test_round_robin_is_balanced(n, w):
    owners = assign_owners(n, w, "round_robin")
    assert len(owners) == n and all(0 <= o < w for o in owners)
    counts = Counter(owners)
    if n:
        assert max(counts.values()) - min(counts.get(k, 0) for k in range(min(n, w))) <= 1
    assert owners == [i % w for i in range(n)]


@given(sizes, workers)
def test_block_is_contiguous_and_in_range(n, w):
    owners = assign_owners(n, w, "block")
    assert len(owners) == n and all(0 <= o < w for o in owners)
    assert owners == sorted(owners)  # contiguous runs
    if n:
        per = max(Counter(owners).values())
        assert per == -(-n // w)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sharding must be one of"):
        assign_owners(3, 2, "random")
    with pytest.raises(ValueError, match="no workers"):
        assign_owners(3, 0)


costs = st.lists(st.integers(min_value=0, max_value=10_000), max_size=40)
slots = st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=6)


def finish_times(placement, costs, slots):
    load = [0] * len(slots)
    for w, c in zip(placement, costs):
        load[w] += c
    return [l / s for l, s in zip(load, slots)]


@given(costs, slots)
def test_balanced_placement_is_within_one_task_of_the_optimum(c, s):
    placement = balance_loads(c, s)
    assert len(placement) == len(c) and all(0 <= w < len(s) for w in placement)
    assert placement == balance_loads(list(c), list(s))  # a function of its arguments
    # OPT >= total / threads, so this is "within the largest task per thread of the optimum"
    bound = sum(c) / sum(s) + (max(c) if c else 0) / min(s)
    assert max(finish_times(placement, c, s)) <= bound + 1e-9


@given(st.lists(st.integers(min_value=1, max_value=50), max_size=7), st.integers(min_value=1, max_value=3))
def test_identical_workers_meet_grahams_bound(c, m):
    placement = balance_loads(c, [1] * m)
    best = min((max(finish_times(p, c, [1] * m)) for p in itertools.product(range(m), repeat=len(c))), default=0)
    assert max(finish_times(placement, c, [1] * m)) <= (4 / 3 - 1 / (3 * m)) * best + 1e-9


def test_equal_tasks_spread_evenly():
    assert balance_loads([5] * 4, [1, 1]) == [0, 1, 0, 1]
    assert sorted(balance_loads([5] * 6, [2, 1])) == [0, 0, 0, 0, 1, 1]


def test_balance_bad_arguments():
    with pytest.raises(ValueError, match="no workers"):
        balance_loads([1], [])
    with pytest.raises(ValueError, match="at least one thread"):
        balance_loads([1], [1, 0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        balance_loads([1, float("nan")], [1])
