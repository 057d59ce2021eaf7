"""Crash-safe checkpoints of an iterate: a double-buffered Zarr array and an atomic commit file.

Layout of a checkpoint directory::

    ckpt/
      x.zarr/        shape (2, *x.shape): two slots; a write goes to the slot not committed
      COMMIT.json    {"iteration", "slot", "problem"}: replaced atomically (os.replace)
                     after the slot's data is written and flushed

A crash at any moment leaves ``COMMIT.json`` pointing at a complete slot: the new data
becomes visible only when the file is replaced, which POSIX makes atomic.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from daskrecon.errors import DaskreconError

__all__ = ["Checkpoint", "CheckpointMismatchError", "fingerprint"]


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
        A local directory (created if missing).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._commit = self.path / "COMMIT.json"
        self._array = self.path / "x.zarr"

    def exists(self) -> bool:
        return self._commit.is_file()

    def load(self) -> Committed:
        """The last committed iterate."""
        if not self.exists():
            raise FileNotFoundError(f"no committed checkpoint in {str(self.path)!r}")
        meta = json.loads(self._commit.read_text())
        x = zarr.open_array(str(self._array), mode="r")[meta["slot"]]
        return Committed(meta["iteration"], np.asarray(x), meta["problem"], meta.get("extra", {}))

    def check(self, problem: dict) -> None:
        """Refuse to resume a different problem, naming what differs."""
        saved = json.loads(self._commit.read_text())["problem"]
        differ = sorted(k for k in set(saved) | set(problem) if saved.get(k) != problem.get(k))
        if differ:
            raise CheckpointMismatchError(
                f"checkpoint {str(self.path)!r} was written for a different problem: {', '.join(differ)} differ; "
                "use a new checkpoint directory or resume=False to start over"
            )

    def save(self, iteration: int, x: np.ndarray, problem: dict, extra: dict | None = None) -> None:
        """Write ``x`` into the free slot, then commit it atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        slot = 0
        if self.exists():
            slot = 1 - json.loads(self._commit.read_text())["slot"]
        arr = self._open_array(x)
        arr[slot] = x
        tmp = self._commit.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump({"iteration": iteration, "slot": slot, "problem": problem, "extra": extra or {}}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._commit)

    def _open_array(self, x: np.ndarray) -> Any:
        shape = (2, *x.shape)
        if self._array.exists():
            arr = zarr.open_array(str(self._array), mode="r+")
            if arr.shape == shape and arr.dtype == x.dtype:
                return arr
        chunks = (1, *x.shape)  # one chunk per slot: a slot is written whole
        return zarr.create_array(str(self._array), shape=shape, chunks=chunks, dtype=x.dtype, overwrite=True)


def fingerprint(obj: Any) -> str:
    """A hash of what an object computes with, stable across processes and machines.

    Modules: class, state-dict tensors (names, shapes, dtypes, values) and plain
    attributes (numbers, strings, tuples), recursively through submodules. Functions
    (factories): module, qualified name and bytecode. Sequences: their items.
    Pickles are not used: they differ between processes.
    """
    import hashlib
    import types

    import torch

    h = hashlib.sha256()

    def feed(o: Any, depth: int = 0) -> None:
        if depth > 6:
            return
        if isinstance(o, torch.nn.Module):
            h.update(f"{type(o).__module__}.{type(o).__qualname__}".encode())
            for name, t in sorted(o.state_dict().items()):
                h.update(name.encode())
                feed(t, depth + 1)
            for k, v in sorted(vars(o).items()):
                if isinstance(v, (int, float, str, bool, tuple)) and not k.startswith("_"):
                    h.update(f"{k}={v!r}".encode())
            for name, child in sorted(o.named_children()):
                h.update(name.encode())
                feed(child, depth + 1)
        elif isinstance(o, torch.Tensor):
            a = o.detach().cpu().contiguous()
            h.update(f"{tuple(a.shape)}{a.dtype}".encode())
            h.update(a.numpy().tobytes() if a.dtype != torch.bfloat16 else a.float().numpy().tobytes())
        elif isinstance(o, np.ndarray):
            h.update(f"{o.shape}{o.dtype}".encode())
            h.update(np.ascontiguousarray(o).tobytes())
        elif isinstance(o, (list, tuple)):
            h.update(f"seq{len(o)}".encode())
            for item in o:
                feed(item, depth + 1)
        elif isinstance(o, dict):
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                feed(o[k], depth + 1)
        elif isinstance(o, types.FunctionType):
            h.update(f"{o.__module__}.{o.__qualname__}".encode())
            h.update(o.__code__.co_code)
        else:
            h.update(repr(o).encode() if isinstance(o, (int, float, str, bool, type(None))) else type(o).__qualname__.encode())

    feed(obj)
    return h.hexdigest()[:16]
