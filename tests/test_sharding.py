from collections import Counter

import pytest
from hypothesis import given, strategies as st

from daskrecon.sharding import assign_owners

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
