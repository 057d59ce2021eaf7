from collections import Counter

import pytest
from hypothesis import given, strategies as st

import itertools

from daskrecon.planning.sharding import assign_owners, balance_loads, reassign_owners

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


names = st.sampled_from([f"w{k}" for k in range(8)])


@given(st.lists(names, max_size=60), st.lists(names, min_size=1, max_size=8, unique=True))
def test_reassign_keeps_what_it_can_and_overloads_no_worker(previous, live):
    owners = reassign_owners(previous, live)
    assert len(owners) == len(previous) and set(owners) <= set(live)
    cap = -(-len(previous) // len(live)) if previous else 0
    counts = Counter(owners)
    assert max(counts.values(), default=0) <= cap
    # an item moves only if its owner left, or its owner kept `cap` lower-indexed items
    for i, (old, new) in enumerate(zip(previous, owners)):
        if old != new:
            assert old not in live or sum(1 for j in range(i) if previous[j] == old and owners[j] == old) == cap
    assert reassign_owners(previous, live) == owners  # deterministic
    assert reassign_owners(owners, live) == owners  # a settled placement stays put


@given(sizes, workers)
def test_reassign_of_a_fresh_sharding_moves_nothing(n, w):
    live = [f"w{k}" for k in range(w)]
    for sharding in ("round_robin", "block"):
        owners = [live[k] for k in assign_owners(n, w, sharding)]
        assert reassign_owners(owners, live) == owners


def test_reassign_rejects_an_empty_cluster():
    with pytest.raises(ValueError, match="no workers"):
        reassign_owners(["a"], [])
