"""Per-operator tasks: ``A_i``, ``A_iᵀ``, vector-Jacobian products, norms, pseudo-inverses.

These back the public operator methods of the distributed physics, so each runs the operator
as the user built it (:func:`daskrecon.tasks.substitutes.original`): bit for bit deepinv's own
computation. ``fast=True`` (the engine's start ``Aᵀy/N``) takes a worker's faster substitute.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from deepinv.physics import LinearPhysics

from daskrecon.tasks.arrays import module_device, to_numpy, to_tensor, worker_device
from daskrecon.tasks.substitutes import original

__all__ = ["adjoint_A_op", "adjoint_op", "build_measurement", "dagger_op", "describe", "forward_op",
           "sqnorm_from_shape", "sqnorm_op", "vjp_op"]


def build_measurement(factory: Callable, index: int, shared: Any, device_mode: str | None) -> np.ndarray:
    """Run a measurement factory ``factory(index, device, shared)`` on the worker."""
    y = factory(index, worker_device(device_mode), shared)
    return to_numpy(torch.as_tensor(y))


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Draw from ``seed`` inside the block, leaving the worker's global RNG as it was."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def forward_op(op: torch.nn.Module, x: np.ndarray, kwargs: dict, seed: int | None, noise: bool) -> np.ndarray:
    """``A_i(x)`` (``noise=False``) or ``forward_i(x)`` with noise drawn from ``seed``."""
    op = original(op)
    dev = module_device(op)
    with torch.no_grad(), _seeded(seed):
        xt = to_tensor(x, dev)
        out = op.forward(xt, **kwargs) if noise else op.A(xt, **kwargs)
    return to_numpy(out)


def adjoint_op(op: torch.nn.Module, y: np.ndarray, kwargs: dict, fast: bool = False) -> np.ndarray:
    """``A_iᵀ y_i`` (``fast``: by the worker's substitute, if any)."""
    op = op if fast else original(op)
    dev = module_device(op)
    with torch.no_grad():
        return to_numpy(op.A_adjoint(to_tensor(y, dev), **kwargs))


def vjp_op(op: torch.nn.Module, x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(∂A_i/∂x)ᵀ v_i``; by autograd when the operator is not linear."""
    op = original(op)
    dev = module_device(op)
    xt, vt = to_tensor(x, dev), to_tensor(v, dev)
    with torch.enable_grad():
        return to_numpy(op.A_vjp(xt, vt))


def vjp_backward_op(op: torch.nn.Module, x: np.ndarray, v: np.ndarray, g: np.ndarray,
                    wrt_x: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """The backward of ``(x, v) ↦ (∂A_i/∂x)ᵀ v`` at cotangent ``g``, by autograd through the operator's
    own ``A_vjp``: ``(∂⟨g, (∂A_i/∂x)ᵀ v⟩/∂x`` (``None`` unless ``wrt_x``), ``(∂A_i/∂x) g)``."""
    op = original(op)
    dev = module_device(op)
    xt = to_tensor(x, dev).requires_grad_(wrt_x)
    vt = to_tensor(v, dev).requires_grad_(True)
    leaves = [xt, vt] if wrt_x else [vt]
    with torch.enable_grad():
        grads = torch.autograd.grad(op.A_vjp(xt, vt), leaves, to_tensor(g, dev), allow_unused=True)
    grads = [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads)]
    return (to_numpy(grads[0]) if wrt_x else None), to_numpy(grads[-1])


def adjoint_A_op(op: torch.nn.Module, x: np.ndarray, kwargs: dict) -> np.ndarray:
    """``A_iᵀ A_i x``."""
    op = original(op)
    dev = module_device(op)
    with torch.no_grad():
        return to_numpy(op.A_adjoint_A(to_tensor(x, dev), **kwargs))


def sqnorm_op(op: torch.nn.Module, x0: np.ndarray, max_iter: int, tol: float) -> float:
    """``‖A_i‖²`` by the operator's own power method."""
    op = original(op)
    dev = module_device(op)
    with torch.no_grad():
        out = op.compute_sqnorm(to_tensor(x0, dev), max_iter=max_iter, tol=tol, verbose=False)
    return float(out)


def sqnorm_from_shape(op: torch.nn.Module, shape: tuple[int, ...], dtype: str, max_iter: int, tol: float) -> float:
    """``‖A_i‖²`` by the operator's power method, from a vector made here (nothing image-sized travels)."""
    dev = module_device(op)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(tuple(shape), generator=g, dtype=getattr(torch, dtype)).to(dev)
    with torch.no_grad():
        return float(op.compute_sqnorm(x0, max_iter=max_iter, tol=tol, verbose=False))


def dagger_op(op: torch.nn.Module, y: np.ndarray, kwargs: dict) -> np.ndarray:
    """``A_i^† y_i`` by the operator's own pseudo-inverse.

    Solver options are passed only where the operator's ``A_dagger`` names them (a
    closed-form pseudo-inverse such as ``BlurFFT``'s takes none).
    """
    op = original(op)
    named = inspect.signature(op.A_dagger).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in named}
    dev = module_device(op)
    with torch.no_grad():
        return to_numpy(op.A_dagger(to_tensor(y, dev), **kwargs))


def describe(obj: Any) -> dict:
    """What the driver needs to know about a built operator."""
    return {"linear": isinstance(obj, LinearPhysics), "type": type(getattr(obj, "op", obj)).__name__}
