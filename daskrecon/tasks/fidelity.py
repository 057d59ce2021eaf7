"""Data-fidelity tasks: per-operator gradients and values, whole-image and chunk by chunk."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from deepinv.optim.data_fidelity import L2, DataFidelity

from daskrecon.errors import ShapeError
from daskrecon.tasks.arrays import module_device, to_numpy, to_tensor

__all__ = ["SIRTFidelity", "fidelity_fn_op", "fidelity_grad_op", "fidelity_grad_value_op", "fidelity_hvp_op", "pointwise_grad_block",
           "pointwise_value_block", "uses_chain_rule"]


def uses_chain_rule(fidelity: Any) -> bool:
    """Whether the fidelity's gradient is deepinv's chain rule ``(∂A/∂x)ᵀ ∇d(A x, y)``."""
    return type(fidelity).grad in (DataFidelity.grad, L2.grad)


def _check_measurement(index: int, ax: torch.Tensor, y: torch.Tensor) -> None:
    if tuple(ax.shape) != tuple(y.shape):
        raise ShapeError(
            f"y[{index}] has shape {tuple(y.shape)} but operator {index} maps x to shape {tuple(ax.shape)}; "
            "check the image shape and that y is in operator order"
        )


def _grad_and_value(op: torch.nn.Module, fidelity: Any, x: np.ndarray, y: np.ndarray, index: int, kwargs: dict,
                    value: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    dev = module_device(op)
    xt = to_tensor(x, dev)
    yt = None if y is None else to_tensor(y, dev)
    v = None
    if uses_chain_rule(fidelity):
        with torch.no_grad():
            try:
                ax = op.A(xt)
            except Exception as exc:  # an x0 of another shape fails inside deepinv with its own words
                exc.add_note(f"operator {index} was applied to x of shape {tuple(xt.shape)}"
                             + ("" if yt is None else f"; its measurement y[{index}] has shape {tuple(yt.shape)}"))
                raise
            if yt is None:  # zero measurements: for L2, the normal operator's term A_iᵀA_i x / σ²
                yt = torch.zeros_like(ax)
            _check_measurement(index, ax, yt)
            g = fidelity.d.grad(ax, yt, **kwargs)
            if value:
                v = fidelity.d(ax, yt, **kwargs).sum()
        with torch.enable_grad():
            out = op.A_vjp(xt, g)
    else:
        if yt is None:
            raise TypeError(f"operator {index}'s fidelity {type(fidelity).__name__} has no chain-rule gradient: "
                            "its normal operator is not defined")
        with torch.enable_grad():
            out = fidelity.grad(xt, yt, op, **kwargs)
        if value:
            with torch.no_grad():
                v = torch.as_tensor(fidelity.fn(xt, yt, op, **kwargs)).sum()
    return out, v


def fidelity_grad_op(
    op: torch.nn.Module, fidelity: Any, x: np.ndarray, y: np.ndarray, index: int, kwargs: dict
) -> np.ndarray:
    """``∇_x d_i(A_i x, y_i) = (∂A_i/∂x)ᵀ ∇d_i(A_i x, y_i)``.

    For fidelities whose gradient is the chain rule (``L2``, any plain ``DataFidelity``)
    this costs one ``A`` and one ``A_vjp``, not ``L2.grad``'s ``AᵀA x − Aᵀ y`` (one
    more operator pass); other fidelities use their own ``grad``.
    """
    return to_numpy(_grad_and_value(op, fidelity, x, y, index, kwargs, value=False)[0])


def fidelity_grad_value_op(
    op: torch.nn.Module, fidelity: Any, x: np.ndarray, y: np.ndarray, index: int, kwargs: dict
) -> np.ndarray:
    """``[∇_x d_i(A_i x, y_i).ravel(), d_i(A_i x, y_i)]``: the gradient and the value in one pass.

    For chain-rule fidelities the value comes from the ``A_i x`` the gradient needs anyway.
    Summing these arrays sums gradients and values alike (the value is the last entry).
    """
    out, v = _grad_and_value(op, fidelity, x, y, index, kwargs, value=True)
    flat = to_numpy(out).ravel()
    return np.concatenate([flat, np.asarray([float(v)], dtype=flat.dtype)])


def fidelity_hvp_op(op: torch.nn.Module, fidelity: Any, x: np.ndarray, y: np.ndarray, index: int, kwargs: dict,
                    v: np.ndarray) -> np.ndarray:
    """``∇²_x d_i(A_i x, y_i) v``: the vector-Hessian product of the fidelity's own gradient, by autograd."""
    dev = module_device(op)
    xt = to_tensor(x, dev).requires_grad_(True)
    yt, vt = to_tensor(y, dev), to_tensor(v, dev)
    with torch.enable_grad():
        g = fidelity.grad(xt, yt, op, **kwargs)
        (out,) = torch.autograd.grad(g, xt, vt, allow_unused=True)
    return to_numpy(torch.zeros_like(xt) if out is None else out)


def fidelity_y_vjp_op(op: torch.nn.Module, fidelity: Any, x: np.ndarray, y: np.ndarray, index: int, kwargs: dict,
                      kind: str, g: np.ndarray) -> np.ndarray:
    """The vector-Jacobian product with respect to ``y_i`` of ``d_i(A_i x, y_i)`` (``kind="fn"``,
    ``g`` per batch element) or of its gradient in ``x`` (``kind="grad"``, ``g`` shaped like ``x``), by autograd."""
    dev = module_device(op)
    xt, gt = to_tensor(x, dev), to_tensor(g, dev)
    yt = to_tensor(y, dev).requires_grad_(True)
    with torch.enable_grad():
        if kind == "fn" and type(fidelity).fn is DataFidelity.fn:
            ax = op.A(xt)
            _check_measurement(index, ax, yt)
            out = fidelity.d(ax, yt, **kwargs)
        else:
            out = getattr(fidelity, kind)(xt, yt, op, **kwargs)
        out = torch.as_tensor(out)
        (gy,) = torch.autograd.grad(out, yt, gt.reshape(out.shape), allow_unused=True)
    return to_numpy(torch.zeros_like(yt) if gy is None else gy)


def fidelity_fn_op(
    op: torch.nn.Module, fidelity: Any, x: np.ndarray, y: np.ndarray, index: int, kwargs: dict
) -> np.ndarray:
    """``d_i(A_i x, y_i)`` per batch element."""
    dev = module_device(op)
    with torch.no_grad():
        xt, yt = to_tensor(x, dev), to_tensor(y, dev)
        if type(fidelity).fn is DataFidelity.fn:
            ax = op.A(xt)
            _check_measurement(index, ax, yt)
            out = fidelity.d(ax, yt, **kwargs)
        else:
            out = fidelity.fn(xt, yt, op, **kwargs)
    return to_numpy(torch.as_tensor(out))


def pointwise_grad_block(u: np.ndarray, y: np.ndarray | None, weight: np.ndarray | None = None, *, distance: Any,
                         eps: float = 0.0) -> np.ndarray:
    """``∇_u d(u, y)`` of a separable distance on one chunk (``y=None``: zeros, made here), divided by
    ``max(weight, eps)`` when a weight chunk is given (SIRT's row sums)."""
    y = np.zeros_like(u) if y is None else y
    with torch.no_grad():
        g = distance.grad(torch.from_numpy(np.ascontiguousarray(u)), torch.from_numpy(np.ascontiguousarray(y)))
        if weight is not None:
            g = g / torch.from_numpy(np.ascontiguousarray(weight)).clamp(min=eps)
        return g.numpy()


def pointwise_value_block(u: np.ndarray, y: np.ndarray | None, distance: Any) -> np.ndarray:
    """``d(u, y)`` of a separable distance on one chunk, per batch element: shape ``(B, 1, …, 1)``."""
    y = np.zeros_like(u) if y is None else y
    with torch.no_grad():
        v = distance.fn(torch.from_numpy(np.ascontiguousarray(u)), torch.from_numpy(np.ascontiguousarray(y)))
    return v.double().numpy().reshape((u.shape[0],) + (1,) * (u.ndim - 1))


class SIRTFidelity(DataFidelity):
    """SIRT's weighted residual back-projected: ``grad(x, y, A) = A.A_adjoint((A x − y) / max(A 1, ε))``.

    The value is the plain L2 term ``½‖A x − y‖²``. The row sums ``A 1`` are computed once per
    operator and image shape, on the worker holding the operator, and kept with this object
    (which lives there while the physics does): later iterations reuse them.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        from deepinv.optim.distance import L2Distance

        self.d = L2Distance()
        self.eps = float(eps)
        self._rows: dict = {}

    def grad(self, x: torch.Tensor, y: torch.Tensor, physics: Any, *args, **kwargs) -> torch.Tensor:
        key = (id(physics), tuple(x.shape), x.dtype)
        with torch.no_grad():
            if key not in self._rows:
                self._rows[key] = physics.A(torch.ones_like(x)).clamp(min=self.eps)
            return physics.A_adjoint((physics.A(x) - y) / self._rows[key])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": {}}
