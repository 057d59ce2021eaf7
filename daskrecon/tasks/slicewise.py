"""Slab kernels of axis-separable operators (:mod:`daskrecon.operators.slicewise`), run inside tasks.

A 2-D deepinv operator applied to every slice of a volume: a task receives a slab
``(B, C, d, H, W)`` of the volume (whole along everything but the depth) and returns the
slab ``(B, C', d, h', w')`` of the measurement, slice by slice. The operator travels as a
small payload (its recipe and persistent state, or its pickle) and is built once per worker
process, then cached: a parallel-beam ``Tomography`` holds its sampling grids as buffers
(135 MB pickled at 256² × 64 angles) but is rebuilt from a few numbers.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from typing import Any

import cloudpickle
import numpy as np
import torch

__all__ = ["apply_slices", "build_operator", "remember", "slab_block"]

#: Operators kept built per worker process (one per distinct payload).
_CACHE_SIZE = 16
_OPS: OrderedDict[str, Any] = OrderedDict()
_LOCK = threading.Lock()


def build_operator(payload: bytes) -> Any:
    """The operator a payload describes (built once per process, then from the cache)."""
    key = _digest(payload)
    with _LOCK:
        op = _OPS.get(key)
        if op is not None:
            _OPS.move_to_end(key)
            return op
    builder, state = cloudpickle.loads(payload)
    op = builder() if state is not None else builder
    if state is not None:
        # The driver's persistent buffers (angles, operator norm...), so every worker holds the
        # same bits whatever its thread count made of them while building.
        op.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    if isinstance(op, torch.nn.Module):
        if isinstance(getattr(op, "noise_model", None), torch.nn.Module):
            # deepinv's default ZeroNoise() is one object shared by every physics of the process (the
            # driver's too): this operator's eval() must not flip the caller's operators' mode
            op.noise_model = copy.deepcopy(op.noise_model)
        op.eval()
    with _LOCK:
        _OPS[key] = op
        while len(_OPS) > _CACHE_SIZE:
            _OPS.popitem(last=False)
    return op


def remember(payload: bytes, op: Any) -> None:
    """Put an operator already built in this process (the driver's own) in the cache under its payload,
    so that shape probes and norms on the driver do not build a second copy."""
    with _LOCK:
        _OPS[_digest(payload)] = op
        while len(_OPS) > _CACHE_SIZE:
            _OPS.popitem(last=False)


def _digest(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def apply_slices(op: Any, x: torch.Tensor, method: str, batch: int) -> torch.Tensor:
    """``method`` (``"A"`` or ``"A_adjoint"``) of a 2-D operator on every depth slice of ``x`` (B, C, D, H, W).

    With ``B == 1`` up to ``batch`` slices go through the operator together as one batch (its
    batch axis); otherwise slice by slice with the whole batch. The result is the same
    (every operator this is used with acts on batch elements independently).
    """
    fn = getattr(op, method)
    b, d = x.shape[0], x.shape[2]
    outs = []
    if b == 1:
        slices = x[0].transpose(0, 1)  # (D, C, H, W): the slices as a batch
        for k in range(0, d, batch):
            outs.append(fn(slices[k:k + batch].contiguous()))
        return torch.cat(outs, 0).transpose(0, 1).unsqueeze(0).contiguous()
    for k in range(d):
        outs.append(fn(x[:, :, k].contiguous()))
    return torch.stack(outs, 2).contiguous()


def slab_block(block: np.ndarray, payload: bytes, method: str, batch: int) -> np.ndarray:
    """One slab of ``A x`` (``method="A"``) or ``Aᵀ y`` (``"A_adjoint"``): a task of the chunk-wise form."""
    op = build_operator(payload)
    with torch.no_grad():  # a task's values only; the physics on tensors (Slicewise) keeps autograd
        out = apply_slices(op, torch.from_numpy(np.ascontiguousarray(block)), method, batch)
    return out.numpy().astype(block.dtype, copy=False)
