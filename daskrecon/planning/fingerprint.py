"""One fingerprint for everything a problem is made of: operators, models, arrays, settings."""

from __future__ import annotations

import hashlib
import types
from typing import Any

import numpy as np
import torch

__all__ = ["fingerprint"]


def fingerprint(obj: Any) -> str:
    """A hash of what an object computes with, stable across processes and machines.

    Modules: class, state-dict tensors (names, shapes, dtypes, values) and plain
    attributes (numbers, strings, tuples; not the train/eval mode), recursively through submodules. Functions
    (factories): module, qualified name and bytecode. Sequences: their items.
    Pickles are not used: they differ between processes.
    """
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
                # ``training`` is left out: the engine runs every module in eval mode, and a mode flipped
                # by a shared default (deepinv's physics share one ``ZeroNoise()``) must not refuse a resume
                if isinstance(v, (int, float, str, bool, tuple)) and not k.startswith("_") and k != "training":
                    h.update(f"{k}={v!r}".encode())
            for name, child in sorted(o.named_children()):
                h.update(name.encode())
                feed(child, depth + 1)
        elif isinstance(o, torch.Tensor):
            a = o.detach().cpu().resolve_conj().resolve_neg().contiguous()
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
