"""Tile geometry for exact tiled processing: pure functions on integers (no torch, no Dask).

Along each tiled axis of length ``D`` the image is cut into disjoint *cores* of
``patch`` pixels (the last one shorter) that cover ``[0, D)`` exactly once. Each core is
processed inside a *window*, placed so that:

* a window never leaves the image: at the image border the window *is* the border, so a
  network with zero padding sees exactly what it sees on the whole image;
* on every side that is not the image border, the core has at least ``overlap`` pixels
  of real context inside its window.

So for a stride-1 network whose receptive radius is at most ``overlap``, the core of
every tile equals the whole-image output, borders included.

Windows are *minimal* by default: ``core ± overlap`` clipped to the image, so a border
tile carries no useless context (for a 2×2 grid of 256-pixel cores with overlap 32 that
is 19 % fewer pixels than uniform windows). Tiles of equal window shape batch together.
``uniform=True`` gives every window ``patch + 2 * overlap`` pixels, shifted inwards at the
border (deepinv's geometry, without its padding). Window origins are multiples of
``align`` (for networks that down-sample), except, with uniform windows, the last one of
an axis whose length is not a multiple of ``align``, which is flush with the border.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

__all__ = ["AxisTile", "Tile", "axis_tiles", "batch_tiles", "blend_weights_1d", "default_batch", "plan_tiles",
           "round_up"]


@dataclass(frozen=True)
class AxisTile:
    """One tile along one axis: ``core`` = ``[core_start, core_stop)``, window likewise."""

    core_start: int
    core_stop: int
    win_start: int
    win_stop: int


@dataclass(frozen=True)
class Tile:
    """A tile of an N-D grid: per tiled axis, its :class:`AxisTile`."""

    index: int
    axes: tuple[AxisTile, ...]

    def window(self) -> tuple[slice, ...]:
        return tuple(slice(a.win_start, a.win_stop) for a in self.axes)

    def core(self) -> tuple[slice, ...]:
        return tuple(slice(a.core_start, a.core_stop) for a in self.axes)

    def core_in_window(self) -> tuple[slice, ...]:
        return tuple(slice(a.core_start - a.win_start, a.core_stop - a.win_start) for a in self.axes)


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= value``."""
    return -(-value // multiple) * multiple


def axis_tiles(size: int, patch: int, overlap: int, align: int = 1, uniform: bool = False) -> list[AxisTile]:
    """Tiles of one axis of length ``size``.

    Parameters
    ----------
    size : int
        Axis length, ``>= 1``.
    patch : int
        Core length, ``>= 1``; a multiple of ``align``.
    overlap : int
        Context on each internal side, ``>= 0``; a multiple of ``align``.
    align : int
        Window origins are multiples of it (but see the module notes for the last one).
    uniform : bool
        All windows ``patch + 2 * overlap`` long instead of minimal (see the module notes).

    Returns
    -------
    list of AxisTile
        One tile covering everything when ``size <= patch + 2 * overlap``.

    Examples
    --------
    >>> [(t.core_start, t.core_stop, t.win_start, t.win_stop) for t in axis_tiles(100, 40, 8)]
    [(0, 40, 0, 48), (40, 80, 32, 88), (80, 100, 72, 100)]
    >>> [(t.core_start, t.core_stop, t.win_start, t.win_stop) for t in axis_tiles(100, 40, 8, uniform=True)]
    [(0, 40, 0, 56), (40, 80, 32, 88), (80, 100, 44, 100)]
    """
    if size < 1:
        raise ValueError(f"axis length must be >= 1, got {size}")
    if patch < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if align < 1 or patch % align or overlap % align:
        raise ValueError(f"patch_size ({patch}) and overlap ({overlap}) must be multiples of align ({align})")
    window = patch + 2 * overlap
    if size <= window:
        return [AxisTile(0, size, 0, size)]
    tiles = []
    last_origin = size - window
    for start in range(0, size, patch):
        stop = min(start + patch, size)
        if not uniform:
            tiles.append(AxisTile(start, stop, max(start - overlap, 0), min(stop + overlap, size)))
            continue
        origin = min(max(start - overlap, 0), last_origin // align * align)
        if origin + window < stop + (overlap if stop < size else 0):
            origin = last_origin  # flush with the border; the only unaligned case
        tiles.append(AxisTile(start, stop, origin, origin + window))
    return tiles


def plan_tiles(
    shape: tuple[int, ...], patch: tuple[int, ...], overlap: tuple[int, ...], align: int = 1, uniform: bool = False
) -> list[Tile]:
    """Cartesian product of :func:`axis_tiles` over the tiled axes, row-major (last axis fastest)."""
    if not (len(shape) == len(patch) == len(overlap)):
        raise ValueError(f"shape {shape}, patch {patch} and overlap {overlap} must have one entry per tiled axis")
    per_axis = [axis_tiles(s, p, o, align, uniform) for s, p, o in zip(shape, patch, overlap)]
    return [Tile(i, tuple(combo)) for i, combo in enumerate(itertools.product(*per_axis))]


def batch_tiles(tiles: list[Tile], per_batch: int) -> list[list[int]]:
    """Group tile indices into batches of equal window shape, at most ``per_batch`` each.

    Shapes are taken in order of first appearance and indices stay sorted inside a
    shape, so the grouping depends on the geometry alone.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for t in tiles:
        by_shape.setdefault(tuple(a.win_stop - a.win_start for a in t.axes), []).append(t.index)
    return [idx[s:s + per_batch] for idx in by_shape.values() for s in range(0, len(idx), per_batch)]


def default_batch(n_tiles: int, window_pixels: int, max_pixels: int = 2**20, target_tasks: int = 8) -> int:
    """Tiles per batch when the user gave none: a function of the geometry only.

    At least ``target_tasks`` batches when there are that many tiles (so several workers
    have work), and at most ``max_pixels`` window pixels per batch (bounded memory).
    Independent of the number of workers, so results do not depend on it.
    """
    by_count = math.ceil(n_tiles / target_tasks)
    by_memory = max(1, max_pixels // max(1, window_pixels))
    return max(1, min(by_count, by_memory))


def blend_weights_1d(tile: AxisTile, size: int, width: int) -> list[float]:
    """Raised-cosine weights over a tile's window for blended reduction.

    The weight is 1 inside the core and falls to 0 across each internal core boundary
    over ``width`` pixels centred on it (``cos²`` on one side, ``sin²`` on the other),
    so neighbouring tiles' weights sum to one when ``width <= min(overlap, patch)``.
    Image-border sides are not tapered.
    """
    if width <= 0:
        return [1.0 if tile.core_start <= u < tile.core_stop else 0.0 for u in range(tile.win_start, tile.win_stop)]
    half = width / 2
    out = []
    for u in range(tile.win_start, tile.win_stop):
        w = 1.0
        c = u + 0.5
        if tile.core_start > 0:
            t = (c - (tile.core_start - half)) / width
            w *= 0.0 if t <= 0 else 1.0 if t >= 1 else math.sin(math.pi / 2 * t) ** 2
        if tile.core_stop < size:
            t = (c - (tile.core_stop - half)) / width
            w *= 1.0 if t <= 0 else 0.0 if t >= 1 else math.cos(math.pi / 2 * t) ** 2
        out.append(w)
    return out
