"""How the iterate of a reconstruction is cut into chunks: pure functions of the problem, never of the cluster.

The chunks of the iterate decide which tile windows the denoiser sees and how the
chunk-wise operators cut their convolutions, hence the float rounding of the result. They
are therefore planned from the problem alone (image shape, dtype, the denoiser's tile size
and overlap, the operators' halos and factors), so that a reconstruction is bitwise the
same on any number of workers. A chunk is a whole number of denoiser tiles, as large as
possible up to ``max_bytes``, but small enough that the image has at least ``min_chunks``
chunks when it has that many tiles (parallelism on small images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_CHUNK_BYTES", "MIN_CHUNKS", "plan_chunks", "whole_axes", "working_chunks", "zarr_aligned"]

#: Largest chunk of the iterate, in bytes (a chunk and its halo are held whole by a task).
MAX_CHUNK_BYTES = 64 * 2**20
#: Chunks an image should be cut into, when it has that many denoiser tiles...
MIN_CHUNKS = 4
#: ...and chunks at least this large: below, a task's overhead (milliseconds) outweighs its work.
MIN_CHUNK_BYTES = 256 * 2**10


def plan_chunks(
    shape: Sequence[int],
    itemsize: int,
    patch: Sequence[int],
    *,
    overlap: Sequence[int] = (0, 0),
    align: int = 1,
    factor: int = 1,
    min_size: int = 1,
    max_bytes: int = MAX_CHUNK_BYTES,
    min_chunks: int = MIN_CHUNKS,
    min_bytes: int = MIN_CHUNK_BYTES,
    whole: Sequence[int] = (),
) -> tuple[tuple[int, ...], ...]:
    """Regular chunks of a ``(B, C, H, W)`` iterate (or a ``(B, C, D, H, W)`` volume).

    Parameters
    ----------
    shape : sequence of int
        ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
    itemsize : int
        Bytes per element.
    patch : sequence of int
        The denoiser's tile core along each spatial axis; a chunk is a multiple of it.
    overlap : sequence of int
        The denoiser's halo: a chunk is at least this (``map_overlap`` needs it).
    align : int
        Chunk boundaries fall on multiples of this (networks that down-sample).
    factor : int
        Chunk boundaries fall on multiples of this too (down-sampling operators).
    min_size : int
        Smallest chunk the operators can run on exactly.
    max_bytes : int
        Largest chunk in bytes.
    min_chunks : int
        Cut at least this many chunks when the image has at least this many tiles and
        every chunk keeps at least ``min_bytes``.
    min_bytes : int
        Smallest chunk worth a task of its own (a small image stays one chunk).
    whole : sequence of int
        Axes (of ``shape``, 2 and up) kept in one chunk: a slice-by-slice operator's
        (:mod:`daskrecon.operators.slicewise`) ``H`` and ``W``.

    Returns
    -------
    tuple of tuples
        Dask chunks: B and C whole, the spatial axes regular (the last may be shorter; it is
        merged into its neighbour when shorter than what the operators and the denoiser need).

    Examples
    --------
    >>> plan_chunks((1, 3, 512, 512), 4, (256, 256))
    ((1,), (3,), (256, 256), (256, 256))
    >>> plan_chunks((1, 3, 128, 128), 4, (64, 64))
    ((1,), (3,), (128,), (128,))
    >>> plan_chunks((1, 3, 8192, 8192), 4, (512, 512))[2][:2]
    (2048, 2048)
    """
    if len(shape) not in (4, 5):
        raise ValueError(f"plan_chunks takes a (B, C, H, W) or (B, C, D, H, W) shape, got {tuple(shape)}")
    b, c, *spatial = (int(s) for s in shape)
    nd = len(spatial)
    if len(patch) != nd or len(overlap) != nd:
        raise ValueError(f"patch and overlap need one entry per spatial axis ({nd}), got {patch!r}, {overlap!r}")
    step = math.lcm(max(1, align), max(1, factor))
    base = [_round_up(max(1, int(p)), step) for p in patch]
    for a in whole:
        if not 2 <= a < len(shape):
            raise ValueError(f"whole names spatial axes (2 to {len(shape) - 1}), got {a}")
        base[a - 2] = spatial[a - 2]
    per_pixel = b * c * itemsize
    need = [max(min_size, int(o), 1) for o in overlap]
    tiles = [max(1, -(-n // p)) for n, p in zip(spatial, base)]

    def cut(counts: list[int]) -> list[tuple[int, ...]]:
        # ``counts[a]`` chunks along axis a, each a whole number of tiles (evenly spread).
        return [_regular(n, min(p * -(-t // q), n), m, step)
                for n, p, t, q, m in zip(spatial, base, tiles, counts, need)]

    # Start from one chunk and cut the longest side once more until chunks fit max_bytes and
    # the image has min_chunks chunks (when it has that many tiles and they are worth a task):
    # cubic chunks, least halo.
    wanted = max(1, min(min_chunks, math.prod(tiles), math.prod(spatial) * per_pixel // max(1, min_bytes)))
    counts = [1] * nd
    while True:
        sizes = cut(counts)
        too_big = math.prod(max(s) for s in sizes) * per_pixel > max_bytes
        too_few = math.prod(len(s) for s in sizes) < wanted
        axes = [a for a in sorted(range(nd), key=lambda a: (-max(sizes[a]), a)) if counts[a] < tiles[a]]
        if not (too_big or too_few) or not axes:
            return ((b,), (c,), *sizes)
        counts[axes[0]] += 1


def working_chunks(shape: tuple[int, ...], chunks: tuple[tuple[int, ...], ...],
                   forms: list[Any]) -> tuple[tuple[int, ...], ...]:
    """Regular chunks (every chunk but the last equal) near ``chunks`` that every operator can run on.

    Zarr stores regular chunks only, and a write aligned with them needs no lock.
    """
    factor = math.lcm(*(f.factor for f in forms)) if forms else 1
    whole = whole_axes(forms)
    out = [(shape[0],), (shape[1],)]
    for axis in range(2, len(shape)):
        if axis in whole:
            out.append((shape[axis],))
            continue
        sizes = chunks[axis]
        # one size asked for (``chunks=(h, w)``) cuts the axis into several chunks all the same
        n = len(sizes) if sum(sizes) == shape[axis] else -(-shape[axis] // max(1, sizes[0]))
        need = max((f.min_chunk(n) for f in forms), default=1)
        size = min(-(-max(chunks[axis][0], need) // factor) * factor, shape[axis])
        out.append(_regular(shape[axis], size, need, factor))
    return tuple(out)


def whole_axes(forms: list[Any]) -> tuple[int, ...]:
    """Axes some operator needs whole in every chunk (``whole_axes`` of its chunk-wise form)."""
    return tuple(sorted({a for f in forms for a in getattr(f, "whole_axes", ())}))


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _regular(total: int, size: int, minimum: int, step: int) -> tuple[int, ...]:
    """``total`` cut into chunks of ``size``; a remainder under ``minimum`` joins the last full chunk."""
    size = max(1, min(size, total))
    full, rest = divmod(total, size)
    if rest and rest < minimum and full >= 1:
        return tuple([size] * (full - 1) + [size + rest])
    return tuple([size] * full + ([rest] if rest else []))


def zarr_aligned(x: Any) -> tuple[Any, tuple[int, ...]]:
    """``x`` and the Zarr chunks to store it in (its first dask chunk per axis), rechunked to regular
    chunks first when a dask chunk boundary is not a Zarr one — so that no two tasks write one Zarr
    chunk (no lock needed, no lost write: zarr-python #3514)."""
    chunks = tuple(c[0] for c in x.chunks)
    if not all(not (np.cumsum(sizes)[:-1] % size).any() for sizes, size in zip(x.chunks, chunks)):
        x = x.rechunk(chunks)
    return x, chunks
