"""Crash-safe checkpoints of an iterate: a double-buffered Zarr array and an atomic commit file.

Layout of a checkpoint directory::

    ckpt/
      .daskrecon.json  marks the folder as daskrecon's (:mod:`daskrecon.runtime.storage`)
      x.zarr/          shape (2, *x.shape): two slots; a write goes to the slot not committed
      <name>.zarr/     the same for every other array of an algorithm's state (momentum...)
      COMMIT.json      {"iteration", "slot", "problem", "extra"}: replaced atomically
                       (os.replace) after every array's slot is written and flushed

A crash at any moment leaves ``COMMIT.json`` pointing at a complete slot: the new data
becomes visible only when the file is replaced, which POSIX makes atomic.

daskrecon writes only into a folder that is new, empty or its own (a non-empty folder of
other files needs ``claim(overwrite=True)``, and even then nothing of theirs is changed),
creates, replaces and deletes only arrays it marked as its own, writes every chunk, and
reads a missing chunk of its arrays as an error, never as zeros (:mod:`daskrecon.runtime.storage`).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from daskrecon.errors import DaskreconError, NotOwnedError
from daskrecon.planning.chunking import zarr_aligned
from daskrecon.runtime import storage
from daskrecon.runtime.folders import OwnedFolder
from daskrecon.runtime.halos import Sources, read_array
from daskrecon.runtime.waiting import compute
from daskrecon.tasks.regions import read_region

__all__ = ["Checkpoint", "CheckpointMismatchError"]


class CheckpointMismatchError(DaskreconError, ValueError):
    """A checkpoint was written for a different problem than the one being resumed."""


#: Names in a checkpoint folder that daskrecon writes whole (not arrays): never someone else's.
_RESERVED = ("COMMIT.json", "COMMIT.json.tmp")
#: Zarr's settings for the arrays daskrecon writes: every chunk stored, also one equal to the fill
#: value, so that a missing chunk is always an error (storage.py).
_WRITE_CONFIG = {"write_empty_chunks": True}


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

    Notes
    -----
    Before its first write the folder is claimed (:meth:`claim`): a folder that exists, is not
    empty and is not daskrecon's is refused unless claimed with ``overwrite=True``. Writes that
    workers make go through :meth:`ensure_shared` first.
    """

    def __init__(self, path: str | os.PathLike, storage_options: dict | None = None, *,
                 _folder: OwnedFolder | None = None, _sources: Sources | None = None) -> None:
        #: Where it lives, whose it is, whether the workers see it (:mod:`daskrecon.runtime.folders`).
        self.folder = _folder if _folder is not None else OwnedFolder(path, storage_options, reserved=_RESERVED)
        self.url, self.fs, self.local = self.folder.url, self.folder.fs, self.folder.local
        self.path = Path(self.folder.root) if self.local else self.folder.root
        self.storage_options = None if self.local else (storage_options or {})
        self._commit = self.folder.path_of("COMMIT.json")
        #: The dask arrays this checkpoint (and its children) handed out, read in place by halo stencils.
        self.sources = _sources if _sources is not None else Sources()

    @classmethod
    def temporary(cls, ctx: Any, scratch: str | os.PathLike | None = None, *, prefix: str = "daskrecon-",
                  why: str = "", storage_options: dict | None = None) -> Checkpoint:
        """A new, empty folder of daskrecon's under ``scratch`` (default :func:`daskrecon.runtime.storage.default_scratch`),
        checked to be shared with the workers of ``ctx``.

        Raises
        ------
        StorageNotSharedError
            The workers cannot see it (the folder is removed again); the message says ``why``
            it was needed and what to pass.
        """
        folder = OwnedFolder.temporary(ctx, scratch, prefix=prefix, why=why, storage_options=storage_options,
                                       reserved=_RESERVED)
        return cls(folder.url, storage_options, _folder=folder)

    def child(self, name: str) -> Checkpoint:
        """The checkpoint folder ``name`` inside this one (same storage; shared when this one is)."""
        folder = self.folder.child(name)
        return Checkpoint(folder.url, folder.storage_options, _folder=folder, _sources=self.sources)

    # ------------------------------------------------------------------ ownership and sharing: the folder's
    def owned(self) -> bool:
        """Whether the folder is daskrecon's (:meth:`daskrecon.runtime.folders.OwnedFolder.owned`)."""
        return self.folder.owned()

    def claim(self, overwrite: bool = False) -> None:
        """Make the folder daskrecon's before writing (:meth:`daskrecon.runtime.folders.OwnedFolder.claim`)."""
        self.folder.claim(overwrite)

    def ensure_shared(self, ctx: Any, *, why: str = "", default: bool = False) -> None:
        """Check once per set of workers that they all see the folder (:meth:`~daskrecon.runtime.folders.OwnedFolder.ensure_shared`)."""
        self.folder.ensure_shared(ctx, why=why, default=default)

    def remove(self) -> None:
        """Delete the folder if it holds only what daskrecon made (:meth:`~daskrecon.runtime.folders.OwnedFolder.remove`)."""
        self.folder.remove()

    def __repr__(self) -> str:
        return f"Checkpoint({self.url!r})"

    def exists(self) -> bool:
        """Whether the folder holds a committed daskrecon checkpoint."""
        return self.fs.isfile(self._commit) and self.owned()

    def meta(self) -> dict:
        """The commit record: iteration, slot, problem, extra."""
        if not self.exists():
            raise FileNotFoundError(f"no committed checkpoint in {self.url!r}")
        return json.loads(self.fs.cat_file(self._commit))

    def _array_path(self, name: str) -> str:
        if not name.isidentifier():
            raise ValueError(f"array names are identifiers, got {name!r}")
        return str(Path(self.folder.root) / f"{name}.zarr") if self.local else f"{self.url.rstrip('/')}/{name}.zarr"

    def load(self, name: str = "x") -> Committed:
        """The last committed value of array ``name`` (read whole; a missing chunk raises)."""
        meta = self.meta()
        arr = self.open_array("r", name)
        whole = tuple((0, n, False) for n in arr.shape[1:])
        x = read_region(arr, (meta["slot"],), whole, strict=storage.owned(arr))
        return Committed(meta["iteration"], x, meta["problem"], meta.get("extra", {}))

    def committed(self, name: str = "x", chunks: Any = None) -> Any:
        """The last committed value of array ``name`` as a dask array, read chunk by chunk.

        ``chunks`` reads it in those chunks directly (they need not be the store's). A chunk
        that is missing raises :class:`~daskrecon.errors.MissingChunkError` when it is read.
        """
        meta = self.meta()
        arr = self.open_array("r", name)
        return read_array(arr, (meta["slot"],), chunks if chunks is not None else arr.chunks[1:],
                          name=f"checkpoint-{name}-{uuid.uuid4().hex}", sources=self.sources)

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
                         stall_timeout=stall_timeout, writes=True)
        return slot, dict(zip(names, values[len(stores):]))

    def commit(self, iteration: int, slot: int, problem: dict, extra: dict | None = None) -> None:
        """Make ``slot`` the committed state at ``iteration`` (atomic)."""
        self._write_commit(iteration, slot, problem, extra)

    def _write_commit(self, iteration: int, slot: int, problem: dict, extra: dict | None) -> None:
        self.claim()
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
        arr = zarr.open_array(self._array_path(name), mode=mode, storage_options=self.storage_options)
        return arr if mode == "r" else arr.with_config(_WRITE_CONFIG)

    def scratch(self, name: str, shape: tuple, dtype: Any, chunks: tuple) -> Any:
        """An uncompressed Zarr array ``name`` for intermediate values (no slots, never committed)."""
        self.claim()
        try:
            arr = self.open_array("r+", name)
            if (storage.owned(arr) and arr.shape == tuple(shape) and arr.dtype == dtype
                    and tuple(arr.chunks) == tuple(chunks)):
                return arr
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            pass
        return self._create(name, tuple(shape), dtype, tuple(chunks), "scratch")

    def remove_array(self, name: str) -> bool:
        """Delete array ``name`` if daskrecon created it; whether it did (nothing happens otherwise)."""
        path = self.folder.path_of(f"{name}.zarr")
        if not self.folder.owns_array(path):
            return False
        self.fs.rm(path, recursive=True)
        return True

    def _create(self, name: str, shape: tuple, dtype: Any, chunks: tuple, role: str) -> Any:
        """A new array of daskrecon's, replacing only an array that daskrecon made (else :class:`NotOwnedError`)."""
        path = self.folder.path_of(f"{name}.zarr")
        if self.fs.exists(path) and not self.folder.owns_array(path):
            raise NotOwnedError(f"{self.url.rstrip('/')}/{name}.zarr exists and was not made by daskrecon: it is not "
                                "replaced; move it, or choose another checkpoint folder")
        # Uncompressed: zstd saved 8 % on float images and made reads 5x slower (benchmarks/
        # bench_region_reads.py); raw chunks are also what lets a chunk's halo be read
        # without its neighbours (tasks.regions).
        return zarr.create_array(self._array_path(name), shape=shape, chunks=chunks, dtype=dtype, overwrite=True,
                                 compressors=None, storage_options=self.storage_options,
                                 attributes=storage.owner_attributes(role), config=_WRITE_CONFIG)

    def _prepare(self, shape: tuple, dtype: Any, chunks: tuple, name: str = "x") -> Any:
        self.claim()
        full = (2, *shape)
        try:
            arr = self.open_array("r+", name)
            if storage.owned(arr) and arr.shape == full and arr.dtype == dtype and tuple(arr.chunks) == tuple(chunks):
                return arr
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            pass
        if self.exists():
            # A new layout replaces both slots: drop the commit first, so a crash from here
            # on leaves "no checkpoint", never a commit pointing into a rewritten array.
            self.fs.rm_file(self._commit)
        return self._create(name, full, dtype, chunks, "state")
