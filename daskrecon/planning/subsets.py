"""Operator subsets for stochastic algorithms: the partition and the seeded schedule (pure planning).

Subset ``j`` of ``m`` holds operators ``j, j + m, j + 2m, …``: interleaved, so that with
operators in acquisition order (tomography angles, MRI frames) every subset spans the
whole acquisition, as ordered-subsets methods want. Which subset an iteration uses is a
function of the seed and the iteration number only — never of the cluster or of how many
iterations ran in this process — so a run is bitwise the same on any number of workers and
after a resume.
"""

from __future__ import annotations

import numpy as np

__all__ = ["epoch_order", "partition", "subset_at"]


def partition(n: int, m: int) -> list[list[int]]:
    """``n`` operator indices in ``m`` interleaved subsets (sizes differ by at most one)."""
    if not isinstance(m, (int, np.integer)) or not 1 <= m <= n:
        raise ValueError(f"the number of subsets must be an int between 1 and the number of operators ({n}), got {m!r}")
    return [list(range(j, n, m)) for j in range(m)]


def epoch_order(seed: int, epoch: int, m: int) -> list[int]:
    """The order in which epoch ``epoch`` visits the ``m`` subsets: a permutation drawn from ``(seed, epoch)``."""
    return [int(j) for j in np.random.default_rng([int(seed), int(epoch)]).permutation(m)]


def subset_at(seed: int, iteration: int, m: int, epoch_length: int | None = None) -> int:
    """The subset of iteration ``iteration`` (0-based): position ``iteration mod L`` of its epoch's order.

    ``epoch_length`` ``L`` defaults to ``m`` (each subset once per epoch); shorter epochs use
    the first ``L`` subsets of each permutation.
    """
    length = m if epoch_length is None else epoch_length
    epoch, pos = divmod(int(iteration), length)
    return epoch_order(seed, epoch, m)[pos % m]
