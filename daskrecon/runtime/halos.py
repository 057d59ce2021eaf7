"""Halo exchange for stencils on chunked arrays: through Zarr out of core, axis by axis in memory.

A ``map_overlap`` builds each chunk's halo from its neighbours' tasks. In a graph that
chains stencils (``A x``, then ``Aᵀ r``, then the tiled denoiser), the scheduler must keep a
front of finished neighbours between every two of them: a slab of chunks as wide as the
volume per stage and per array. For a 3-D volume several times the workers' memory that
front alone is gigabytes (measured: 1 GiB held — spilled — for a 0.5 GiB volume, and a
worker restarted by its nanny on a 8 GiB one).

Given a :class:`Stager` (the engine makes one for a problem that streams through Zarr and
carries it in the plan: the problem's chunk-wise forms and its denoiser call hold it),
:func:`map_overlap` does instead what a file-backed stencil code does: the stencil's input is written to a scratch Zarr array next to the checkpoint, and
after that write (one barrier task) each chunk reads its own region *with its halo* from
the array. Nothing is held between stages but the scratch array on disk; each task holds
one extended chunk. An input that is already a committed state array of the checkpoint is
read from there directly (no write): the checkpoint keeps a :class:`Sources` table of the
dask arrays it handed out. The extended blocks are exactly ``map_overlap``'s, so results are
bitwise the same as without staging. Nothing here is module state: a graph built without a
stager never reads Zarr, whatever else runs in the process.

In cluster memory (no stager), a chunk's halo comes from its neighbours' tasks. Dask's
``map_overlap`` cuts one sliver task per neighbour — 26 in 3-D, 8 in 2-D — and joins them: a
48³ volume in 8³ chunks ran 28,672 ``getitem`` tasks in two iterations of one blur and a
tiled denoiser (``benchmarks/bench_halo_tasks.py``). :func:`map_overlap` here exchanges
halos one axis at a time instead, as MPI stencil codes do: along the first axis each chunk
receives a sliver from each of its two neighbours there; along the next, each sliver is
cut from the chunk and the slivers it received before, so it carries the corners on. A
chunk's extended block is then its two slivers per axis and one task that writes them and
the chunk into it once (7 tasks per chunk in 3-D against dask's 28, 5 in 2-D against 10),
moving the same bytes; the extended blocks are dask's, value for value. ``dask.config`` key
``daskrecon.arrays.halo-exchange``: ``"axes"`` (this, the default) or ``"dask"``
(``dask.array.map_overlap`` as it is).
"""

from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.array.overlap import coerce_boundary, coerce_depth, trim_internal
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from daskrecon.planning.chunking import zarr_aligned
from daskrecon.runtime import defaults
from daskrecon.runtime.storage import owned
from daskrecon.tasks import arrays as array_tasks
from daskrecon.tasks import halos as halo_tasks
from daskrecon.tasks import regions

__all__ = ["Sources", "Stager", "exchanged", "map_overlap", "read_array"]


class Sources:
    """Dask arrays that read a Zarr array as they are (by dask name): ``(zarr array, leading index)``.

    Bounded (``limit`` most recent): only the latest committed arrays of a checkpoint matter.
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._table: OrderedDict[str, tuple[Any, tuple[int, ...]]] = OrderedDict()

    def add(self, arr: da.Array, zarr_array: Any, lead: tuple[int, ...] = ()) -> da.Array:
        """Record that ``arr`` is ``zarr_array[lead]`` read as is; returns ``arr``."""
        self._table[arr.name] = (zarr_array, tuple(lead))
        while len(self._table) > self.limit:
            self._table.popitem(last=False)
        return arr

    def get(self, arr: da.Array) -> tuple[Any, tuple[int, ...]] | None:
        """``(zarr array, lead)`` when ``arr`` reads one as it is (and has its shape), else ``None``."""
        found = self._table.get(arr.name)
        if found is None or tuple(found[0].shape[len(found[1]):]) != tuple(arr.shape):
            return None
        return found

    def __len__(self) -> int:
        return len(self._table)


class Stager:
    """Scratch Zarr arrays for the stencils of the graphs being built.

    Parameters
    ----------
    store : Checkpoint
        The scratch arrays are ``stage_<k>`` next to its arrays (uncompressed; removed by
        :meth:`cleanup`); the arrays it hands out (its ``sources``) are read in place.
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        sources = getattr(store, "sources", None)
        self.sources: Sources = sources if sources is not None else Sources()
        self._next = 0
        self._made: set[str] = set()
        self._tokens = itertools.count()
        self._id = uuid.uuid4().hex[:8]  # keys unique across stagers of one client

    def mark(self) -> int:
        """Where the scratch numbering stands: see :meth:`rewind`."""
        return self._next

    def rewind(self, where: int) -> None:
        """Number scratch arrays from ``where`` (a :meth:`mark`) again.

        For a loop whose every pass builds and computes its own graph (the power method, conjugate
        gradient out of core): pass ``k`` reuses pass ``k − 1``'s scratch arrays, which that pass's
        computation is done with, and never those of a graph built before the loop began.
        """
        self._next = where

    def fresh(self, a: da.Array, after: da.Array | None = None) -> da.Array:
        """``a`` under new keys when it reads the checkpoint's Zarr, else ``a``.

        A state array read in two stages of one graph would be held by the scheduler from the
        first to the last; read twice, it is held by neither. ``after`` (same chunks) orders each
        block's read after that block of ``after`` — the value it is to be combined with —, so
        that the read runs when it is needed, not whenever a thread is free.
        """
        if self.sources.get(a) is None:
            return a
        if after is not None and after.chunks != a.chunks:
            after = None
        return self.extended(a, {}, {}, after)

    def extended(self, a: da.Array, depth: dict[int, int], boundary: dict[int, str],
                 after: da.Array | None = None) -> da.Array:
        """``a``'s blocks with their halos, each read in one task from Zarr (``dask.array.overlap``'s blocks).

        ``after``, an array of the same blocks, orders each read after its block of ``after``.
        """
        source = self.sources.get(a)
        if source is not None:
            zarr_array, lead = source
            barrier = None
        else:
            zarr_array, barrier = self._write(a)
            lead = ()
        name = f"halo-read-{self._id}-{next(self._tokens):06d}"
        return _reads(zarr_array, lead, a.chunks, depth, boundary, name, barrier, after)

    def _write(self, a: da.Array) -> tuple[Any, Any]:
        a, chunks = zarr_aligned(a)
        name = f"stage_{self._next}"
        self._next += 1
        self._made.add(name)
        z = self.store.scratch(name, a.shape, a.dtype, chunks)
        writes = da.store(a, z, lock=False, compute=False)
        key = f"halo-write-{self._id}-{next(self._tokens):06d}"
        layer = {key: (array_tasks.barrier, list(writes.__dask_keys__()))}
        return z, Delayed(key, HighLevelGraph.from_collections(key, layer, dependencies=[writes]))

    def cleanup(self) -> None:
        """Remove the scratch arrays."""
        for name in sorted(self._made):
            self.store.remove_array(name)
        self._made.clear()


def read_array(zarr_array: Any, lead: tuple[int, ...], chunks: Any, name: str | None = None,
               sources: Sources | None = None) -> da.Array:
    """``zarr_array[lead]`` as a dask array with ``chunks``, each block read in one task.

    Recorded in ``sources`` when given (a stager over them reads its halos from the array
    directly). An array
    daskrecon owns is read strictly: a missing chunk raises
    :class:`~daskrecon.errors.MissingChunkError`, never the fill value.
    """
    shape = tuple(zarr_array.shape[len(lead):])
    chunks = da.core.normalize_chunks(chunks, shape)
    out = _reads(zarr_array, tuple(lead), chunks, {}, {}, name or f"zarr-read-{uuid.uuid4().hex}")
    return sources.add(out, zarr_array, lead) if sources is not None else out


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


def _check_halos(a: da.Array, depth: dict[int, int]) -> None:
    """Refuse a halo wider than a chunk it would come from (``allow_rechunk=False``'s rule)."""
    for ax, d in depth.items():
        if d and len(a.chunks[ax]) > 1 and min(a.chunks[ax]) < d:
            raise ValueError(f"chunks along axis {ax} ({min(a.chunks[ax])}) are smaller than the halo ({d})")


def exchanged(a: da.Array, depth: dict[int, int]) -> da.Array:
    """``a``'s blocks with halos ``depth`` from their neighbours (``boundary="none"``), one axis at a time.

    The blocks of ``dask.array.overlap.overlap(a, depth, "none")``, value for value. Per chunk,
    two ``halo-face`` tasks per axis with a halo — a sliver for each neighbour there, built from
    the chunk and the slivers its own neighbours sent along the axes before, so it carries
    the corners on — and one ``halo-block`` task writing the chunk and its slivers into the
    extended block. A halo wider than a neighbouring chunk is refused, as ``allow_rechunk=False``
    does.
    """
    _check_halos(a, depth)
    axes = [ax for ax in range(a.ndim) if depth.get(ax, 0) and len(a.chunks[ax]) > 1]
    if not axes:
        return a
    token = dask.base.tokenize(a.name, sorted(depth.items()))
    faces = {ax: f"halo-face-{ax}-{token}" for ax in axes}
    blocks = list(itertools.product(*(range(len(c)) for c in a.chunks)))

    def sides(idx: tuple[int, ...], before: list[int]) -> tuple[list, list, list]:
        """Along each axis in ``before``, the slivers ``idx``'s neighbours send it (keys, or ``None``)."""
        lows, highs = [], []
        for ax in before:
            lo = idx[:ax] + (idx[ax] - 1,) + idx[ax + 1:]
            hi = idx[:ax] + (idx[ax] + 1,) + idx[ax + 1:]
            lows.append((faces[ax], 1, *lo) if idx[ax] > 0 else None)
            highs.append((faces[ax], 0, *hi) if idx[ax] < len(a.chunks[ax]) - 1 else None)
        return list(before), lows, highs

    layer: dict = {}
    for k, ax in enumerate(axes):
        for idx in blocks:  # the slivers block idx sends its neighbours along ax (high side: to the next one)
            for high in (0, 1):
                if (idx[ax] < len(a.chunks[ax]) - 1) if high else (idx[ax] > 0):
                    layer[(faces[ax], high, *idx)] = (halo_tasks.face, (a.name, *idx), ax, depth[ax], bool(high),
                                                      *sides(idx, axes[:k]))
    name = f"halo-block-{token}"
    for idx in blocks:
        layer[(name, *idx)] = (halo_tasks.extend, (a.name, *idx), *sides(idx, axes))
    chunks = tuple(tuple(n + depth[ax] * ((i > 0) + (i < len(sizes) - 1)) for i, n in enumerate(sizes))
                   if ax in axes else sizes for ax, sizes in enumerate(a.chunks))
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[a])
    return da.Array(graph, name, chunks, meta=a._meta)


def map_overlap(fn: Any, a: da.Array, *, depth: dict[int, int], boundary: str, trim: bool = True,
                annotations: dict | None = None, stager: Stager | None = None, **kwargs: Any) -> da.Array:
    """``dask.array.map_overlap(fn, a, depth=…, boundary=…, trim=…, allow_rechunk=False, **kwargs)``,
    its halos read from Zarr when a ``stager`` is given (see the module).

    ``annotations`` (e.g. worker placement) go on ``fn``'s tasks. Staged, the reads stay
    unannotated: the scheduler queues unrestricted root tasks and hands them out as threads
    free up, where restricted ones would all be read at once, ahead of their consumers.
    """
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
        how = defaults.default("arrays.halo-exchange")
        if how not in ("axes", "dask"):
            raise ValueError(f"daskrecon.arrays.halo-exchange is 'axes' or 'dask', got {how!r}")
        if how == "dask" or any(d and (boundary_n[ax] != "none" or not isinstance(d, int))
                                for ax, d in depth_n.items()):  # asymmetric halos (tuples): dask's
            with dask.annotate(**(annotations or {})):
                return da.map_overlap(fn, a, depth=depth, boundary=boundary, trim=trim, allow_rechunk=False,
                                      **kwargs)
        ext = exchanged(a, depth_n)
    else:
        _check_halos(a, depth_n)
        ext = stager.extended(a, depth_n, boundary_n)
    if not trim:
        kwargs.setdefault("chunks", a.chunks)
    with dask.annotate(**(annotations or {})):
        out = da.map_blocks(fn, ext, **kwargs)
    return trim_internal(out, depth_n, boundary_n) if trim else out
