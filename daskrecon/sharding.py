"""Which worker owns which operator: pure functions on integers, no Dask, no torch."""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["SHARDINGS", "assign_owners"]

Sharding = Literal["round_robin", "block"]
SHARDINGS: tuple[str, ...] = ("round_robin", "block")


def assign_owners(n_items: int, n_workers: int, sharding: str = "round_robin") -> list[int]:
    """Return, for each item index, the index of the worker that owns it.

    Parameters
    ----------
    n_items : int
        Number of items (operators, measurements) to place; ``>= 0``.
    n_workers : int
        Number of workers; ``>= 1``.
    sharding : {"round_robin", "block"}
        ``"round_robin"``: item ``i`` goes to worker ``i % n_workers`` (deepinv's rule).
        ``"block"``: contiguous runs of ``ceil(n_items / n_workers)`` items per worker,
        so that neighbouring items, which the reduction tree sums first, share a worker.

    Returns
    -------
    list of int
        ``owners[i]`` in ``range(n_workers)``.

    Examples
    --------
    >>> assign_owners(5, 2, "round_robin")
    [0, 1, 0, 1, 0]
    >>> assign_owners(5, 2, "block")
    [0, 0, 0, 1, 1]
    """
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}; the cluster has no workers")
    if sharding == "round_robin":
        return [i % n_workers for i in range(n_items)]
    if sharding == "block":
        per_worker = max(1, math.ceil(n_items / n_workers))
        return [i // per_worker for i in range(n_items)]
    raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
