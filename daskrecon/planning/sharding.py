"""Which worker runs what: pure functions on integers, no Dask, no torch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

__all__ = ["SHARDINGS", "assign_owners", "balance_loads", "reassign_owners"]

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


def reassign_owners(previous: Sequence[str], workers: Sequence[str]) -> list[str]:
    """Owners after the set of workers changed: as few moves as possible, no worker overloaded.

    An item keeps its owner while that worker is still there and holds at most
    ``ceil(n_items / n_workers)`` items (the lowest indices stay); every other item — its
    owner left, or its owner has too many since workers joined — goes, in index order, to
    the worker holding fewest items (ties: the first in ``workers``). Moving an operator
    costs a rebuild on its new worker, so items stay put whenever balance allows.

    Parameters
    ----------
    previous : sequence of str
        The owner of each item before the change.
    workers : sequence of str
        The workers now, in a stable order; at least one.

    Returns
    -------
    list of str
        ``owners[i]`` in ``workers``; every worker holds at most ``ceil(n_items / n_workers)``.

    Examples
    --------
    >>> reassign_owners(["a", "b", "a", "b"], ["a", "c"])
    ['a', 'c', 'a', 'c']
    >>> reassign_owners(["a", "a", "a", "a"], ["a", "b"])
    ['a', 'a', 'b', 'b']
    """
    if not workers:
        raise ValueError("no workers to place items on; the cluster has no workers")
    if len(set(workers)) != len(workers):
        raise ValueError(f"workers must be distinct, got {list(workers)}")
    cap = math.ceil(len(previous) / len(workers)) if previous else 0
    load = {w: 0 for w in workers}
    owners: list[str | None] = [None] * len(previous)
    for i, w in enumerate(previous):
        if w in load and load[w] < cap:
            owners[i] = w
            load[w] += 1
    order = {w: k for k, w in enumerate(workers)}
    for i, w in enumerate(owners):
        if w is None:
            target = min(workers, key=lambda v: (load[v], order[v]))
            owners[i] = target
            load[target] += 1
    return owners  # type: ignore[return-value]


def balance_loads(costs: Sequence[float], slots: Sequence[int]) -> list[int]:
    """Place independent tasks of known cost on workers so that they finish together.

    Longest task first, each onto the worker where it would finish earliest (its load
    so far plus the task, divided by its number of threads); ties go to the lower worker
    index. The result depends only on the arguments. Its makespan (largest load divided
    by threads) is at most ``sum(costs) / sum(slots) + max(costs) / min(slots)``, so
    within ``max(costs) / min(slots)`` of the optimum; on identical single-thread workers
    it is LPT, within ``4/3 - 1/(3 m)`` of the optimum (Graham's bound).

    Parameters
    ----------
    costs : sequence of float
        Cost of each task (e.g. pixels it processes), ``>= 0``.
    slots : sequence of int
        Threads of each worker, ``>= 1`` each; at least one worker.

    Returns
    -------
    list of int
        ``workers[i]``: index into ``slots`` of the worker that runs task ``i``.

    Examples
    --------
    >>> balance_loads([4, 4, 4, 4], [1, 1])
    [0, 1, 0, 1]
    >>> balance_loads([9, 1, 1, 1], [1, 1])
    [0, 1, 1, 1]
    >>> balance_loads([1, 1, 1], [2, 1])
    [0, 0, 1]
    """
    if not slots:
        raise ValueError("no workers to place tasks on; the cluster has no workers")
    if any(int(n) < 1 for n in slots):
        raise ValueError(f"every worker needs at least one thread, got {list(slots)}")
    if any(not c >= 0 for c in costs):
        raise ValueError(f"task costs must be finite and >= 0, got {list(costs)}")
    load = [0.0] * len(slots)
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        w = min(range(len(slots)), key=lambda k: ((load[k] + costs[i]) / slots[k], k))
        load[w] += costs[i]
        out[i] = w
    return out
