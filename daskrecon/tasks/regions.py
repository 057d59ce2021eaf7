"""Reading a region of a Zarr array inside a task: a chunk with its halo, without reading its neighbours whole.

zarr-python reads and decodes every chunk a selection touches, whole (partial reads are
an open question of the format: zarr-specs#59, zarr-python#521). A chunk's region with a
halo of 20 pixels touches up to nine chunks in 2-D (27 in 3-D): measured on this machine,
a 512² × 3 float32 chunk costs 0.67 ms to read alone and 6.6 ms with its halo, 10× the
bytes copied for 1.16× the pixels.

For the arrays daskrecon writes itself — uncompressed Zarr v3 on a local file system, one
file per chunk holding the chunk's bytes in C order (the ``bytes`` codec alone) — a
region is read here straight from the chunk files through memory maps, copying only the
pixels it needs: 0.24 ms per chunk alone, 0.89 ms with its halo (``benchmarks/bench_region_reads.py``).
Any other array (a
compressor, a filter, sharding, Zarr v2, an object store, a chunk file of the wrong size)
is read through zarr-python, so the result never depends on which path ran. zarr-python's
local store replaces a chunk file by renaming a new one over it, so a chunk mapped here is
never truncated under the reader.

``strict`` reads (the arrays daskrecon writes itself) never take a missing chunk for the
fill value: they raise :class:`~daskrecon.errors.MissingChunkError`, naming the array, the
chunk and the worker. Every chunk of such an array is written, even one that equals the fill
value (``write_empty_chunks``), so a missing one means lost data or storage the workers do
not share. Other arrays keep zarr's semantics.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import numpy as np

from daskrecon.errors import MissingChunkError
from daskrecon.tasks.storage import here

__all__ = ["check_chunks", "direct_layout", "read_region", "segments"]


def segments(lo: int, hi: int, n: int, periodic: bool) -> list[tuple[int, int, int]]:
    """``[lo, hi)`` along an axis of length ``n`` as ``(src_start, src_stop, dst_start)`` runs.

    Periodic: indices wrap modulo ``n``; otherwise the range must lie in ``[0, n]``.
    """
    if not periodic:
        if lo < 0 or hi > n:
            raise IndexError(f"region [{lo}, {hi}) outside an axis of length {n}")
        return [(lo, hi, 0)]
    out = []
    pos = lo
    while pos < hi:
        start = pos % n
        stop = min(n, start + (hi - pos))
        out.append((start, stop, pos - lo))
        pos += stop - start
    return out


def direct_layout(zarr_array: Any) -> tuple[str, tuple[int, ...], np.dtype, Any] | None:
    """``(directory, chunk shape, on-disk dtype, fill value)`` when ``zarr_array``'s chunks are raw C-order files, else ``None``."""
    try:
        from zarr.codecs import BytesCodec
        from zarr.storage import LocalStore

        meta = zarr_array.metadata
        store = zarr_array.store_path.store
        if meta.zarr_format != 3 or not isinstance(store, LocalStore):
            return None
        codecs = tuple(meta.codecs)
        if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
            return None
        dtype = np.dtype(zarr_array.dtype)
        if dtype.hasobject or dtype.kind in "OUSV":
            return None
        endian = codecs[0].endian
        if dtype.itemsize > 1:
            dtype = dtype.newbyteorder("<" if endian is None or endian.value == "little" else ">")
        chunks = tuple(int(c) for c in meta.chunk_grid.chunk_shape)
        directory = os.path.join(str(store.root), zarr_array.store_path.path)
        return directory, chunks, dtype, meta.fill_value
    except (AttributeError, ImportError, TypeError, ValueError):
        return None


def _read_direct(zarr_array: Any, layout: tuple, index: tuple[list[tuple[int, int, int]], ...],
                 out_shape: tuple[int, ...], strict: bool = False) -> np.ndarray | None:
    """The region from the chunk files (``None``: a chunk file is not what the layout says)."""
    directory, chunks, disk_dtype, fill = layout
    out = np.empty(out_shape, dtype=zarr_array.dtype)
    chunk_bytes = math.prod(chunks) * disk_dtype.itemsize
    for runs in itertools.product(*index):
        # One box of the region that does not wrap: the chunks it crosses, one copy each.
        per_axis = []
        for (start, stop, dst), c in zip(runs, chunks):
            per_axis.append([(k, max(start, k * c), min(stop, (k + 1) * c), dst - start)
                             for k in range(start // c, (stop - 1) // c + 1)])
        for pieces in itertools.product(*per_axis):
            coords = tuple(k for k, _, _, _ in pieces)
            dst = tuple(slice(a + shift, b + shift) for _, a, b, shift in pieces)
            path = os.path.join(directory, zarr_array.metadata.encode_chunk_key(coords))
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                if strict:
                    raise _missing(zarr_array, coords) from None
                out[dst] = fill  # a chunk never written reads as the fill value, as in zarr
                continue
            if size != chunk_bytes:
                return None
            mapped = np.memmap(path, dtype=disk_dtype, mode="r", shape=chunks)
            out[dst] = mapped[tuple(slice(a - k * c, b - k * c) for (k, a, b, _), c in zip(pieces, chunks))]
            del mapped
    return out


def _missing(zarr_array: Any, coords: tuple[int, ...]) -> MissingChunkError:
    return MissingChunkError(
        f"chunk {coords} of the Zarr array {_describe(zarr_array)} is missing on {here()}: daskrecon wrote every "
        "chunk of this array, so the data was lost or the workers do not share this storage (each wrote to its "
        "own disk). Use a checkpoint= or scratch= location that every worker and the driver see (a shared file "
        "system or an fsspec URL)")


def _describe(zarr_array: Any) -> str:
    try:
        store = zarr_array.store_path.store
        root = getattr(store, "root", None) or getattr(store, "path", None) or store
        return repr(os.path.join(str(root), zarr_array.store_path.path))
    except AttributeError:
        return repr(zarr_array)


def _chunks_touched(zarr_array: Any, index: tuple[list[tuple[int, int, int]], ...]) -> set[tuple[int, ...]]:
    chunks = tuple(int(c) for c in zarr_array.metadata.chunk_grid.chunk_shape)
    touched: set[tuple[int, ...]] = set()
    for runs in itertools.product(*index):
        ranges = [range(start // c, (stop - 1) // c + 1) for (start, stop, _), c in zip(runs, chunks)]
        touched.update(itertools.product(*ranges))
    return touched


def check_chunks(zarr_array: Any, index: tuple[list[tuple[int, int, int]], ...]) -> None:
    """Raise :class:`MissingChunkError` for the first chunk the region ``index`` touches that is not stored."""
    from zarr.core.sync import sync  # zarr-python's stores are asynchronous; its own sync API uses this

    store, prefix = zarr_array.store_path.store, zarr_array.store_path.path
    for coords in sorted(_chunks_touched(zarr_array, index)):
        key = zarr_array.metadata.encode_chunk_key(coords)
        if not sync(store.exists(f"{prefix}/{key}" if prefix else key)):
            raise _missing(zarr_array, coords)


def read_region(zarr_array: Any, lead: tuple[int, ...], where: tuple[tuple[int, int, bool], ...],
                barrier: Any = None, after: Any = None, strict: bool = False) -> np.ndarray:
    """``zarr_array[lead][region]``, ``where`` one ``(start, stop, periodic)`` per axis (periodic: wrapped).

    ``barrier`` (the write of the array, when it is a scratch one) and ``after`` only order the
    task after them. Raw chunk files are read in place (see the module); the values are
    those zarr-python returns. ``strict``: a chunk that is not stored raises
    :class:`~daskrecon.errors.MissingChunkError` instead of reading as the fill value.
    """
    shape = tuple(zarr_array.shape)
    inner = shape[len(lead):]
    index = [segments(i, i + 1, n, False) for i, n in zip(lead, shape)]
    index += [segments(lo, hi, n, p) for (lo, hi, p), n in zip(where, inner)]
    out_shape = tuple(hi - lo for lo, hi, _ in where)
    layout = direct_layout(zarr_array)
    if layout is not None and all(hi > lo for lo, hi, _ in where):
        got = _read_direct(zarr_array, layout, tuple(index), (1,) * len(lead) + out_shape, strict)
        if got is not None:
            return got.reshape(out_shape)
    if strict and all(hi > lo for lo, hi, _ in where):
        check_chunks(zarr_array, tuple(index))
    if not any(p for _, _, p in where):
        return np.asarray(zarr_array[(*lead, *(slice(lo, hi) for lo, hi, _ in where))])
    sel = tuple(np.arange(lo, hi) % n if p else slice(lo, hi) for (lo, hi, p), n in zip(where, inner))
    return np.asarray(zarr_array.oindex[(*lead, *sel)])
