"""Crash-safe checkpoints of an iterate: a double-buffered Zarr array and an atomic commit file.

Layout of a checkpoint directory::

    ckpt/
      x.zarr/        shape (2, *x.shape): two slots; a write goes to the slot not committed
      <name>.zarr/   the same for every other array of an algorithm's state (momentum...)
      COMMIT.json    {"iteration", "slot", "problem", "extra"}: replaced atomically
                     (os.replace) after every array's slot is written and flushed

A crash at any moment leaves ``COMMIT.json`` pointing at a complete slot: the new data
becomes visible only when the file is replaced, which POSIX makes atomic.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from daskrecon.chunking import zarr_aligned
from daskrecon.errors import DaskreconError
from daskrecon.staging import register_source
from daskrecon.waiting import compute

__all__ = ["Checkpoint", "CheckpointMismatchError"]


class CheckpointMismatchError(DaskreconError, ValueError):
    """A checkpoint was written for a different problem than the one being resumed."""


@dataclass
class Committed:
    iteration: int
    x: np.ndarray
    problem: dict
    extra: dict


class Checkpoint:
    """A checkpoint directory for an iterate of fixed shape and dtype.

    Parameters
    ----------
    path : str or Path
        A local directory (created if missing) or an fsspec URL (``s3://bucket/run``,
        ``gs://…``, ``file://…``; the protocol's package must be installed). On object
        stores the commit file is written with one PUT, which they make atomic.
    storage_options : dict, optional
        Passed to fsspec for URLs (credentials, endpoint).
    """

    def __init__(self, path: str | os.PathLike, storage_options: dict | None = None) -> None:
        from fsspec.core import url_to_fs
        from fsspec.implementations.local import LocalFileSystem

        self.url = str(path)
        self.fs, root = url_to_fs(self.url, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.path = Path(root) if self.local else root
        self.storage_options = None if self.local else (storage_options or {})
        self._commit = f"{root}/COMMIT.json"
        self._root = root

    def __repr__(self) -> str:
        return f"Checkpoint({self.url!r})"

    def exists(self) -> bool:
        return self.fs.isfile(self._commit)

    def meta(self) -> dict:
        """The commit record: iteration, slot, problem, extra."""
        if not self.exists():
            raise FileNotFoundError(f"no committed checkpoint in {self.url!r}")
        return json.loads(self.fs.cat_file(self._commit))

    def _array_path(self, name: str) -> str:
        if not name.isidentifier():
            raise ValueError(f"array names are identifiers, got {name!r}")
        return str(Path(self._root) / f"{name}.zarr") if self.local else f"{self.url.rstrip('/')}/{name}.zarr"

    def load(self, name: str = "x") -> Committed:
        """The last committed value of array ``name`` (read whole)."""
        meta = self.meta()
        x = self.open_array("r", name)[meta["slot"]]
        return Committed(meta["iteration"], np.asarray(x), meta["problem"], meta.get("extra", {}))

    def committed(self, name: str = "x", chunks: Any = None) -> Any:
        """The last committed value of array ``name`` as a dask array, read chunk by chunk.

        ``chunks`` reads it in those chunks directly (they need not be the store's).
        """
        meta = self.meta()
        arr = self.open_array("r", name)
        spec = ((1, 1), *chunks) if chunks is not None else (1, *arr.chunks[1:])
        out = da.from_array(arr, chunks=spec, inline_array=True)[meta["slot"]]
        return register_source(out, arr, (meta["slot"],))  # stencils read its halos from here

    def check(self, problem: dict) -> None:
        """Refuse to resume a different problem, naming what differs."""
        saved = self.meta()["problem"]
        differ = sorted(k for k in set(saved) | set(problem) if saved.get(k) != problem.get(k))
        if differ:
            raise CheckpointMismatchError(
                f"checkpoint {self.url!r} was written for a different problem: {', '.join(differ)} differ; "
                "use a new checkpoint directory or resume=False to start over"
            )

    def _free_slot(self) -> int:
        return 1 - self.meta()["slot"] if self.exists() else 0

    def save(self, iteration: int, x: np.ndarray, problem: dict, extra: dict | None = None, name: str = "x") -> None:
        """Write ``x`` (a numpy array) into the free slot, then commit it atomically."""
        slot = self._free_slot()
        arr = self._prepare(x.shape, x.dtype, (1, *x.shape), name)  # one chunk per slot: a slot is written whole
        arr[slot] = x
        self._write_commit(iteration, slot, problem, extra)

    def save_dask(self, iteration: int, x: Any, problem: dict, extra: dict | None = None,
                  also: dict | None = None, *, client: Any = None, stall_timeout: float | None = None) -> dict:
        """Stream a dask array into the free slot chunk by chunk, then commit it atomically.

        ``also`` maps names to lazy values (reductions of the same graph) computed in the
        same pass; their values are returned and, with ``extra``, stored in the commit
        record by a callable ``extra(values) -> dict`` or as given. The pass runs on
        ``client`` (default: the current one) and never waits for ever
        (:func:`daskrecon.waiting.compute`).
        """
        slot, out = self.write({"x": x}, also, client=client, stall_timeout=stall_timeout)
        self.commit(iteration, slot, problem, extra(out) if callable(extra) else extra)
        return out

    def store_tasks(self, arrays: dict[str, Any]) -> tuple[int, list]:
        """Lazy writes of ``arrays`` (dask arrays, by name) into the free slot: ``(slot, [store arrays])``.

        The store's chunks are the first dask chunk's; every dask chunk boundary must be one of
        theirs, so that no two tasks write one Zarr chunk (no lock, no lost write: zarr-python
        #3514). A dask array whose chunks are not so is rechunked to regular ones first.
        """
        slot = self._free_slot()
        stores = []
        for name, x in arrays.items():
            x, chunks = zarr_aligned(x)
            arr = self._prepare(x.shape, x.dtype, (1, *chunks), name)
            region = (slice(slot, slot + 1), *(slice(None),) * x.ndim)
            stores.append(da.store(x[None], arr, regions=region, lock=False, compute=False))
        return slot, stores

    def write(self, arrays: dict[str, Any], also: dict | None = None, *, client: Any = None,
              stall_timeout: float | None = None) -> tuple[int, dict]:
        """Write ``arrays`` into the free slot and compute ``also`` in the same pass; nothing is committed."""
        slot, stores = self.store_tasks(arrays)
        names = list(also or {})
        values = compute([*stores, *[also[k] for k in names]], client=client, what="checkpoint write",
                         stall_timeout=stall_timeout)
        return slot, dict(zip(names, values[len(stores):]))

    def commit(self, iteration: int, slot: int, problem: dict, extra: dict | None = None) -> None:
        """Make ``slot`` the committed state at ``iteration`` (atomic)."""
        self._write_commit(iteration, slot, problem, extra)

    def _write_commit(self, iteration: int, slot: int, problem: dict, extra: dict | None) -> None:
        record = json.dumps({"iteration": iteration, "slot": slot, "problem": problem, "extra": extra or {}})
        if self.local:
            tmp = self._commit + ".tmp"
            with open(tmp, "w") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._commit)
        else:
            self.fs.pipe_file(self._commit, record.encode())

    def open_array(self, mode: str = "r", name: str = "x") -> Any:
        return zarr.open_array(self._array_path(name), mode=mode, storage_options=self.storage_options)

    def scratch(self, name: str, shape: tuple, dtype: Any, chunks: tuple) -> Any:
        """An uncompressed Zarr array ``name`` for intermediate values (no slots, never committed)."""
        self.fs.makedirs(str(self.path), exist_ok=True)
        try:
            arr = self.open_array("r+", name)
            if arr.shape == tuple(shape) and arr.dtype == dtype and tuple(arr.chunks) == tuple(chunks):
                return arr
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            pass
        return zarr.create_array(self._array_path(name), shape=shape, chunks=chunks, dtype=dtype, overwrite=True,
                                 compressors=None, storage_options=self.storage_options)

    def remove_array(self, name: str) -> None:
        """Delete array ``name`` (nothing if absent)."""
        path = self._array_path(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def _prepare(self, shape: tuple, dtype: Any, chunks: tuple, name: str = "x") -> Any:
        self.fs.makedirs(str(self.path), exist_ok=True)
        full = (2, *shape)
        try:
            arr = self.open_array("r+", name)
            if arr.shape == full and arr.dtype == dtype and tuple(arr.chunks) == tuple(chunks):
                return arr
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            pass
        if self.exists():
            # A new layout replaces both slots: drop the commit first, so a crash from here
            # on leaves "no checkpoint", never a commit pointing into a rewritten array.
            self.fs.rm_file(self._commit)
        # Uncompressed: zstd saved 8 % on float images and made reads 5x slower (benchmarks/
        # bench_region_reads.py); raw chunks
        # are also what lets a chunk's halo be read without its neighbours (tasks.regions).
        return zarr.create_array(self._array_path(name), shape=full, chunks=chunks, dtype=dtype, overwrite=True,
                                 compressors=None, storage_options=self.storage_options)
