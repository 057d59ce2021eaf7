"""A chunk's halo from its neighbours in cluster memory, one axis at a time (see :mod:`daskrecon.runtime.halos`).

The sides of a block are given as three lists — ``axes``, ``lows``, ``highs`` — (flat lists, so
that Dask hands the tasks the slivers in place of their keys): along ``axes[k]``, the slivers of
the neighbours before and after (``None`` where there is none), each already extended along
``axes[:k]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["extend", "face"]


def _cut(a: Any, axis: int, depth: int, high: bool) -> Any:
    where = slice(a.shape[axis] - depth, None) if high else slice(0, depth)
    return a[(slice(None),) * axis + (where,)]


def extend(block: Any, axes: Sequence[int], lows: Sequence[Any], highs: Sequence[Any]) -> Any:
    """``block`` with its neighbours' slivers around it, written once into a new C-ordered array.

    Each side's slivers span the extended range along the axes of the sides before it and the
    block's own range along the others, so the pieces tile the result exactly: the corners
    come with the slivers of the last axis they touch.
    """
    shape, start = list(block.shape), [0] * block.ndim
    sides = list(zip(axes, lows, highs))
    for axis, low, high in sides:
        n_low = 0 if low is None else low.shape[axis]
        shape[axis] += n_low + (0 if high is None else high.shape[axis])
        start[axis] = n_low
    out = np.empty_like(block, shape=tuple(shape), order="C")
    core = [slice(s, s + n) for s, n in zip(start, block.shape)]
    out[tuple(core)] = block
    region = list(core)
    for axis, low, high in sides:
        if low is not None:
            region[axis] = slice(0, start[axis])
            out[tuple(region)] = low
        if high is not None:
            region[axis] = slice(start[axis] + block.shape[axis], shape[axis])
            out[tuple(region)] = high
        region[axis] = slice(None)  # the sides after this one span it whole
    return out


def face(block: Any, axis: int, depth: int, high: bool, axes: Sequence[int], lows: Sequence[Any],
         highs: Sequence[Any]) -> Any:
    """The ``depth`` pixels of ``block`` on one side along ``axis``, extended by the neighbours'
    slivers along ``axes`` (axes before ``axis``), cut to the same pixels.

    A new array, not a view: a view would keep the whole chunk alive, unseen by Dask's memory
    accounting, for as long as the sliver is held.
    """
    def cut(a: Any) -> Any:
        return None if a is None else _cut(a, axis, depth, high)

    return extend(_cut(block, axis, depth, high), axes, [cut(lo) for lo in lows], [cut(hi) for hi in highs])
