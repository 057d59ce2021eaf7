"""Halo exchange through Zarr for out-of-core graphs: stencils in memory bounded by the chunk.

A ``map_overlap`` builds each chunk's halo from its neighbours' tasks. In a graph that
chains stencils (``A x``, then ``Aᵀ r``, then the tiled denoiser), the scheduler must keep a
front of finished neighbours between every two of them: a slab of chunks as wide as the
volume per stage and per array. For a 3-D volume several times the workers' memory that
front alone is gigabytes (measured: 1 GiB held — spilled — for a 0.5 GiB volume, and a
worker restarted by its nanny on a 8 GiB one).

While a :class:`Stager` is active (:func:`staged`; the engine sets one for a problem that
streams through Zarr), :func:`map_overlap` does instead what a file-backed stencil code
does: the stencil's input is written to a scratch Zarr array next to the checkpoint, and
after that write (one barrier task) each chunk reads its own region *with its halo* from
the array. Nothing is held between stages but the scratch array on disk; each task holds
one extended chunk. An input that is already a committed state array of the checkpoint is
read from there directly (no write). The extended blocks are exactly ``map_overlap``'s, so
results are bitwise the same as without staging.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.array.overlap import coerce_boundary, coerce_depth, trim_internal
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from daskrecon.planning.chunking import zarr_aligned
from daskrecon.runtime.storage import owned
from daskrecon.tasks import arrays as array_tasks
from daskrecon.tasks import regions

__all__ = ["Stager", "active", "fresh", "map_overlap", "mark", "read_array", "register_source", "rewind", "staged"]

_ACTIVE: ContextVar[Stager | None] = ContextVar("daskrecon_stager", default=None)
# Dask arrays that read a Zarr array (by array name): (zarr array, leading index). Bounded:
# only the checkpoint's latest committed arrays matter.
_SOURCES: OrderedDict[str, tuple[Any, tuple[int, ...]]] = OrderedDict()
_MAX_SOURCES = 64
_tokens = itertools.count()


def register_source(arr: da.Array, zarr_array: Any, lead: tuple[int, ...] = ()) -> da.Array:
    """Record that ``arr`` is ``zarr_array[lead]`` read as is, so stencils can read its halos directly."""
    _SOURCES[arr.name] = (zarr_array, tuple(lead))
    while len(_SOURCES) > _MAX_SOURCES:
        _SOURCES.popitem(last=False)
    return arr


def active() -> Stager | None:
    """The active stager, if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def staged(stager: Stager | None) -> Iterator[Stager | None]:
    """Make ``stager`` active while building graphs (``None``: nothing changes)."""
    token = _ACTIVE.set(stager)
    try:
        yield stager
    finally:
        _ACTIVE.reset(token)


class Stager:
    """Scratch Zarr arrays for the stencils of the graphs being built.

    Parameters
    ----------
    store : Checkpoint
        The scratch arrays are ``stage_<k>`` next to its arrays (uncompressed; removed by
        :meth:`cleanup`).
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self._next = 0
        self._made: set[str] = set()

    def extended(self, a: da.Array, depth: dict[int, int], boundary: dict[int, str],
                 after: da.Array | None = None) -> da.Array:
        """``a``'s blocks with their halos, each read in one task from Zarr (``dask.array.overlap``'s blocks).

        ``after``, an array of the same blocks, orders each read after its block of ``after``.
        """
        source = _SOURCES.get(a.name)
        if source is not None and tuple(source[0].shape[len(source[1]):]) == tuple(a.shape):
            zarr_array, lead = source
            barrier = None
        else:
            zarr_array, barrier = self._write(a)
            lead = ()
        return _reads(zarr_array, lead, a.chunks, depth, boundary, f"halo-read-{next(_tokens):06d}", barrier, after)

    def _write(self, a: da.Array) -> tuple[Any, Any]:
        a, chunks = zarr_aligned(a)
        name = f"stage_{self._next}"
        self._next += 1
        self._made.add(name)
        z = self.store.scratch(name, a.shape, a.dtype, chunks)
        writes = da.store(a, z, lock=False, compute=False)
        key = f"halo-write-{next(_tokens):06d}"
        layer = {key: (array_tasks.barrier, list(writes.__dask_keys__()))}
        return z, Delayed(key, HighLevelGraph.from_collections(key, layer, dependencies=[writes]))

    def cleanup(self) -> None:
        """Remove the scratch arrays."""
        for name in sorted(self._made):
            self.store.remove_array(name)
        self._made.clear()


def read_array(zarr_array: Any, lead: tuple[int, ...], chunks: Any, name: str | None = None) -> da.Array:
    """``zarr_array[lead]`` as a dask array with ``chunks``, each block read in one task.

    Registered as a source (stencils read its halos from the array directly). An array
    daskrecon owns is read strictly: a missing chunk raises
    :class:`~daskrecon.errors.MissingChunkError`, never the fill value.
    """
    shape = tuple(zarr_array.shape[len(lead):])
    chunks = da.core.normalize_chunks(chunks, shape)
    out = _reads(zarr_array, tuple(lead), chunks, {}, {}, name or f"zarr-read-{uuid.uuid4().hex}")
    return register_source(out, zarr_array, lead)


def _reads(zarr_array: Any, lead: tuple[int, ...], chunks: tuple[tuple[int, ...], ...], depth: dict[int, int],
           boundary: dict[int, str], name: str, barrier: Delayed | None = None,
           after: da.Array | None = None) -> da.Array:
    """The blocks of ``zarr_array[lead]`` cut by ``chunks``, with halos ``depth``, one read task each."""
    windows = [_windows(sizes, depth.get(ax, 0), boundary.get(ax, "none")) for ax, sizes in enumerate(chunks)]
    strict = owned(zarr_array)
    layer = {(name, *idx): (regions.read_region, zarr_array, lead, where,
                            barrier.key if barrier is not None else None,
                            (after.name, *idx) if after is not None else None, strict)
             for idx, where in zip(itertools.product(*(range(len(w)) for w in windows)),
                                   itertools.product(*windows))}
    out_chunks = tuple(tuple(hi - lo for lo, hi, _ in w) for w in windows)
    deps = [d for d in (after, barrier) if d is not None]
    graph = HighLevelGraph.from_collections(name, layer, dependencies=deps)
    dtype = np.dtype(zarr_array.dtype)
    return da.Array(graph, name, out_chunks, dtype=dtype, meta=np.empty((0,) * len(chunks), dtype))


def _windows(sizes: tuple[int, ...], d: int, boundary: str) -> list[tuple[int, int, bool]]:
    """Each block's ``(start, stop, periodic)`` along one axis with a halo ``d`` (``dask.array.overlap``'s)."""
    starts = np.cumsum((0,) + sizes[:-1]).tolist()
    last = len(sizes) - 1
    if d == 0:
        return [(lo, lo + n, False) for lo, n in zip(starts, sizes)]
    if boundary == "periodic":
        return [(lo - d, lo + n + d, True) for lo, n in zip(starts, sizes)]
    if boundary == "none":
        return [(lo - d if i else lo, lo + n + d if i < last else lo + n, False)
                for i, (lo, n) in enumerate(zip(starts, sizes))]
    raise NotImplementedError(f"staged halo with boundary={boundary!r}")


def mark() -> int | None:
    """Where the active stager's numbering stands (``None`` without a stager): see :func:`rewind`."""
    stager = _ACTIVE.get()
    return None if stager is None else stager._next


def rewind(where: int | None) -> None:
    """Number scratch arrays from ``where`` (a :func:`mark`) again.

    For a loop whose every pass builds and computes its own graph (the power method, conjugate
    gradient out of core): pass ``k`` reuses pass ``k − 1``'s scratch arrays, which that pass's
    computation is done with, and never those of a graph built before the loop began.
    """
    stager = _ACTIVE.get()
    if stager is not None and where is not None:
        stager._next = where


def fresh(a: da.Array, after: da.Array | None = None) -> da.Array:
    """``a`` under new keys when it reads the checkpoint's Zarr (and a stager is active), else ``a``.

    A state array read in two stages of one graph would be held by the scheduler from the
    first to the last; read twice, it is held by neither. ``after`` (same chunks) orders each
    block's read after that block of ``after`` — the value it is to be combined with —, so
    that the read runs when it is needed, not whenever a thread is free.
    """
    if _ACTIVE.get() is None or a.name not in _SOURCES:
        return a
    if after is not None and after.chunks != a.chunks:
        after = None
    return _ACTIVE.get().extended(a, {}, {}, after)


def _wrapped(a: da.Array, depth: dict[int, int], boundary: dict[int, Any]) -> tuple[da.Array, dict[int, Any]]:
    """``a`` with its periodic halos appended to its first and last chunks (``depth`` pixels of the
    other end), and those axes' boundary now ``"none"``.

    The same windows as dask's ``boundary="periodic"``, which adds a ring of edge chunks and
    trims it again: ~40 tasks per chunk of a 2-D image (80 for a one-chunk image), against one
    slice and one merge per edge chunk here.
    """
    boundary = dict(boundary)
    for ax, d in depth.items():
        if not d or boundary[ax] != "periodic":
            continue
        n = a.shape[ax]
        if d > n:
            raise ValueError(f"a periodic halo of {d} pixels is wider than axis {ax} ({n} pixels)")
        lo = a[(slice(None),) * ax + (slice(n - d, n),)]
        hi = a[(slice(None),) * ax + (slice(0, d),)]
        sizes = list(a.chunks[ax])
        sizes[0] += d
        sizes[-1] += d
        a = da.concatenate([lo, a, hi], axis=ax).rechunk({ax: tuple(sizes)})
        boundary[ax] = "none"
    return a, boundary


def map_overlap(fn: Any, a: da.Array, *, depth: dict[int, int], boundary: str, trim: bool = True,
                annotations: dict | None = None, **kwargs: Any) -> da.Array:
    """``dask.array.map_overlap(fn, a, depth=…, boundary=…, trim=…, allow_rechunk=False, **kwargs)``,
    its halos read from Zarr while a stager is active (see the module).

    ``annotations`` (e.g. worker placement) go on ``fn``'s tasks. Staged, the reads stay
    unannotated: the scheduler queues unrestricted root tasks and hands them out as threads
    free up, where restricted ones would all be read at once, ahead of their consumers.
    """
    stager = _ACTIVE.get()
    depth_n = coerce_depth(a.ndim, depth)
    boundary_n = coerce_boundary(a.ndim, boundary)
    if stager is None and not trim and any(d and boundary_n[ax] == "periodic" for ax, d in depth_n.items()):
        a, boundary_n = _wrapped(a, depth_n, boundary_n)
        boundary = boundary_n
    if all(d == 0 or (len(a.chunks[ax]) == 1 and boundary_n[ax] == "none") for ax, d in depth_n.items()):
        # No chunk has a neighbour to read a halo from: dask's overlap would only add a task per chunk.
        with dask.annotate(**(annotations or {})):
            return da.map_blocks(fn, a, **kwargs)
    if stager is None:
        with dask.annotate(**(annotations or {})):
            return da.map_overlap(fn, a, depth=depth, boundary=boundary, trim=trim, allow_rechunk=False, **kwargs)
    for ax, d in depth_n.items():
        if d and min(a.chunks[ax]) < d and len(a.chunks[ax]) > 1:
            raise ValueError(f"chunks along axis {ax} ({min(a.chunks[ax])}) are smaller than the halo ({d})")
    ext = stager.extended(a, depth_n, boundary_n)
    if not trim:
        kwargs.setdefault("chunks", a.chunks)
    with dask.annotate(**(annotations or {})):
        out = da.map_blocks(fn, ext, **kwargs)
    return trim_internal(out, depth_n, boundary_n) if trim else out
