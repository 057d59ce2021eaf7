"""Chunk kernels of the synthetic microscopy volume (:func:`daskrecon.demo.demo_volume`).

The volume is a sum of blobs ("nuclei": anisotropic Gaussians of random size, brightness and
orientation) and short filaments, one of each per cell of a fixed grid, their parameters drawn
from ``(seed, cell index)``. A chunk evaluates the objects of the cells near it only, so any
chunk of an arbitrarily large volume is computed alone, and the same everywhere.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["CELL", "volume_block"]

#: Edge of a grid cell in voxels: one blob and one filament per cell.
CELL = 24


def _objects(seed: int, cell: tuple[int, int, int]) -> tuple:
    rng = np.random.default_rng([seed, *cell])
    centre = (np.asarray(cell) + rng.uniform(0.2, 0.8, 3)) * CELL
    radii = rng.uniform(3.0, 8.0, 3)
    brightness = rng.uniform(0.35, 0.9)
    a = (np.asarray(cell) + rng.uniform(0, 1, 3)) * CELL
    b = (np.asarray(cell) + rng.uniform(0, 1, 3)) * CELL
    return centre, radii, brightness, a, b, rng.uniform(0.2, 0.5)


def _box(lo: np.ndarray, hi: np.ndarray, loc: list) -> tuple[slice, ...] | None:
    """The part of the chunk ``loc`` inside the box ``[lo, hi)`` (global voxel coordinates), as local slices."""
    out = []
    for a, b, (c0, c1) in zip(lo, hi, loc):
        s, e = max(int(np.floor(a)), c0), min(int(np.ceil(b)), c1)
        if s >= e:
            return None
        out.append(slice(s - c0, e - c0))
    return tuple(out)


def volume_block(seed: int, shape: tuple[int, ...], block_info: dict | None = None) -> np.ndarray:
    """One chunk ``(1, 1, d, h, w)`` of the volume, float32 in [0, 1]."""
    loc = [tuple(x) for x in block_info[None]["array-location"][2:]]
    out = np.full(tuple(hi - lo for lo, hi in loc), 0.05, np.float32)
    axes = [np.arange(lo, hi, dtype=np.float32) for lo, hi in loc]
    reach = 1  # cells: every object lies within one cell of its own
    ranges = [range(max(0, lo // CELL - reach), min(-(-n // CELL), hi // CELL + reach + 1))
              for (lo, hi), n in zip(loc, shape[2:])]
    for cell in itertools.product(*ranges):
        centre, radii, brightness, a, b, fil = _objects(seed, cell)
        box = _box(centre - 2.5 * radii, centre + 2.5 * radii + 1, loc)
        if box is not None:
            g = np.meshgrid(*(ax[s] for ax, s in zip(axes, box)), indexing="ij", sparse=True)
            r2 = sum(((gi - c) / r) ** 2 for gi, c, r in zip(g, centre, radii))
            out[box] += brightness * np.exp(-r2)
        box = _box(np.minimum(a, b) - 4, np.maximum(a, b) + 5, loc)
        if box is not None:  # a filament: a thin Gaussian tube around the segment a–b
            g = np.meshgrid(*(ax[s] for ax, s in zip(axes, box)), indexing="ij", sparse=True)
            ab = b - a
            t = np.clip(sum((gi - p) * d for gi, p, d in zip(g, a, ab)) / max(float(ab @ ab), 1e-6), 0, 1)
            d2 = sum((gi - (p + t * d)) ** 2 for gi, p, d in zip(g, a, ab))
            out[box] += fil * np.exp(-d2 / (2 * 1.2 ** 2))
    return np.clip(out, 0, 1)[None, None]
