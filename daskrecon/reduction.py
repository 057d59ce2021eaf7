"""Deterministic tree reduction of per-operator results.

The tree is a function of the number of leaves and the fan-in only, never of which
task finished first or which worker holds a leaf: the sum is therefore bitwise the
same on any number of workers and under any sharding.
"""

from __future__ import annotations

from collections.abc import Sequence

from distributed import Client, Future

from daskrecon.tasks import arrays as array_tasks

__all__ = ["reduction_plan", "tree_reduce"]


def reduction_plan(n_leaves: int, fan_in: int = 4) -> list[list[tuple[int, ...]]]:
    """Plan a reduction tree over ``n_leaves`` leaves.

    Parameters
    ----------
    n_leaves : int
        Number of leaves, ``>= 1``.
    fan_in : int
        Largest number of inputs one sum takes, ``>= 2``.

    Returns
    -------
    list of levels
        Level ``k`` is a list of groups; a group is a tuple of consecutive indices into
        level ``k - 1`` (the leaves for ``k = 0``), summed in that order. The last level
        has a single group. A group of one passes its input through unchanged.

    Examples
    --------
    >>> reduction_plan(5, 2)
    [[(0, 1), (2, 3), (4,)], [(0, 1), (2,)], [(0, 1)]]
    """
    if n_leaves < 1:
        raise ValueError(f"a reduction needs at least one leaf, got {n_leaves}")
    if fan_in < 2:
        raise ValueError(f"fan_in must be >= 2, got {fan_in}")
    levels: list[list[tuple[int, ...]]] = []
    width = n_leaves
    while width > 1:
        groups = [tuple(range(s, min(s + fan_in, width))) for s in range(0, width, fan_in)]
        levels.append(groups)
        width = len(groups)
    return levels


def tree_reduce(
    client: Client,
    leaves: Sequence[Future],
    fan_in: int = 4,
    *,
    add=None,
) -> Future:
    """Sum futures on the workers along :func:`reduction_plan`.

    Each partial sum runs where the scheduler finds most of its inputs; the order of
    the additions inside a group is fixed by index.

    Parameters
    ----------
    client : distributed.Client
    leaves : sequence of Future
        Futures of equally shaped numpy arrays, in operator order.
    fan_in : int
        Largest number of inputs per sum task.
    add : callable, optional
        Task function summing its positional arguments in order; defaults to
        :func:`daskrecon.tasks.arrays.sum_arrays`.

    Returns
    -------
    Future
        The total.
    """
    add = add or array_tasks.sum_arrays
    level = list(leaves)
    for groups in reduction_plan(len(level), fan_in):
        level = [
            client.submit(add, *[level[j] for j in group], pure=False) if len(group) > 1 else level[group[0]]
            for group in groups
        ]
    return level[0]
