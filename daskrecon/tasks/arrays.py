"""Arrays inside tasks: devices, torch <-> numpy, identity and sums (fixed order)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

__all__ = ["barrier", "shape_dtype", "module_device", "place_array", "scale_array", "set_torch_threads", "sum_arrays", "to_numpy", "to_tensor",
           "worker_device"]


def worker_device(device_mode: str | None) -> torch.device:
    """The device this worker computes on: its (first visible) GPU unless told "cpu"."""
    if device_mode != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def module_device(obj: Any) -> torch.device:
    """Device of a module's first buffer or parameter (cpu when it has none)."""
    if isinstance(obj, torch.nn.Module):
        for t in obj.buffers():
            return t.device
        for t in obj.parameters():
            return t.device
    return torch.device("cpu")


def to_tensor(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().resolve_conj().cpu().numpy()


def set_torch_threads(n: int) -> None:
    """Bound torch's intra-op threads in this worker process (called by the plugin)."""
    torch.set_num_threads(max(1, int(n)))
    os.environ["DASKRECON_TORCH_THREADS"] = str(n)


def set_tf32(allow: bool) -> None:
    """Whether this worker's GPU may round fp32 convolutions and matrix products to TF32 (called by the plugin)."""
    torch.backends.cudnn.allow_tf32 = bool(allow)
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)


def place_array(a: np.ndarray) -> np.ndarray:
    """Identity task: keeps an array in worker memory with a recomputable lineage."""
    return a


def barrier(*_: Any) -> None:
    """Nothing: a task that runs after all of its dependencies (writes of a whole array)."""


def sum_arrays(*arrays: np.ndarray) -> np.ndarray:
    """Sum in argument order (fixed order = bitwise reproducible)."""
    out = np.array(arrays[0], copy=True)
    for a in arrays[1:]:
        if a.shape != out.shape:
            raise ValueError(
                f"cannot sum per-operator results of shapes {out.shape} and {a.shape}: "
                "reduce_op='sum'/'mean' needs operators with equal output shapes"
            )
        out += a
    return out


def scale_array(a: np.ndarray, factor: float) -> np.ndarray:
    """``factor · a``, keeping ``a``'s dtype."""
    return a * np.asarray(factor, dtype=a.dtype)


def shape_dtype(a: np.ndarray) -> tuple[tuple[int, ...], str]:
    """An array's shape and dtype name (what the driver asks of a result it does not fetch)."""
    return tuple(a.shape), str(a.dtype)
