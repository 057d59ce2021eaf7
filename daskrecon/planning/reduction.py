"""Deterministic tree reduction of per-operator results.

The tree is a function of the number of leaves and the fan-in only, never of which
task finished first or which worker holds a leaf: the sum is therefore bitwise the
same on any number of workers and under any sharding.
"""

from __future__ import annotations

__all__ = ["REDUCTIONS", "reduction_plan"]

#: How per-operator results in the signal space combine: summed, or averaged over the operators.
REDUCTIONS = ("sum", "mean")


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
