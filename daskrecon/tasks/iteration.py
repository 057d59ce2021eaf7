"""Chunk kernels of one reconstruction iteration: assembling, splitting, steps, metrics."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "assemble_blocks",
    "axpy_block",
    "block_of",
    "dual_block",
    "gradient_of",
    "metric_partial",
    "momentum_block",
    "pnp_step_block",
    "red_step_block",
    "sum_metrics",
    "sum_values",
    "svrg_step_block",
    "value_of",
]


def assemble_blocks(blocks: list) -> np.ndarray:
    """One array from the nested list of a dask array's blocks (``to_delayed().tolist()``)."""
    return np.block(blocks)


def block_of(value: Any, fn: Any, args: tuple, region: tuple[slice, ...]) -> np.ndarray:
    """``fn(value, *args)[region]``: one chunk of a whole-image result (a view, copied to own its memory)."""
    return np.ascontiguousarray(fn(value, *args)[region])


def gradient_of(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The gradient part of a ``[∇f.ravel(), f]`` array (:func:`daskrecon.tasks.fidelity.fidelity_grad_value_op`)."""
    return flat[:-1].reshape(shape)


def value_of(flat: np.ndarray) -> float:
    """The value part of a ``[∇f.ravel(), f]`` array."""
    return float(flat[-1])


def sum_values(*values: Any) -> float:
    """Sum in argument order, in float64 (a fixed order: bitwise reproducible)."""
    total = 0.0
    for v in values:
        total += float(np.asarray(v, dtype=np.float64).sum())
    return total


def pnp_step_block(x: np.ndarray, g: np.ndarray, tau: float, scale: float) -> np.ndarray:
    """``x − τ·scale·∇f`` on one chunk, in ``x``'s dtype."""
    if scale != 1.0:
        g = g * np.asarray(scale, dtype=g.dtype)
    return x - np.asarray(tau, dtype=x.dtype) * g


def momentum_block(new: np.ndarray, old: np.ndarray, alpha: float) -> np.ndarray:
    """``new + α (new − old)`` on one chunk (FISTA's extrapolation), in ``new``'s dtype."""
    return new + np.asarray(alpha, dtype=new.dtype) * (new - old)


def axpy_block(x: np.ndarray, y: np.ndarray, a: float) -> np.ndarray:
    """``x + a·y`` on one chunk, in ``x``'s dtype."""
    return x + np.asarray(a, dtype=x.dtype) * y


def dual_block(z: np.ndarray, u: np.ndarray, x: np.ndarray, beta: float) -> np.ndarray:
    """``z + β (u − x)`` on one chunk (ADMM's scaled dual update)."""
    return z + np.asarray(beta, dtype=z.dtype) * (u - x)


def svrg_step_block(x: np.ndarray, gx: np.ndarray, ga: np.ndarray, mu: np.ndarray, tau: float, scale: float,
                    weight: float) -> np.ndarray:
    """``x − τ·scale·(w (∇f_S(x) − ∇f_S(x̃)) + μ)`` on one chunk (SVRG's variance-reduced step)."""
    dt = x.dtype
    g = np.asarray(weight, dtype=dt) * (gx - ga) + mu
    return x - np.asarray(tau * scale, dtype=dt) * g


def red_step_block(x: np.ndarray, g: np.ndarray, d: np.ndarray, tau: float, scale: float, lam: float) -> np.ndarray:
    """``x − τ (scale·∇f + λ (x − D(x)))`` on one chunk (RED's gradient step)."""
    if scale != 1.0:
        g = g * np.asarray(scale, dtype=g.dtype)
    dt = x.dtype
    return x - np.asarray(tau, dtype=dt) * (g + np.asarray(lam, dtype=dt) * (x - d))


def metric_partial(new: np.ndarray, old: np.ndarray, truth: np.ndarray | None = None, *, batch: int = 1,
                   first: int = 0) -> np.ndarray:
    """The metrics of one chunk, in float64: ``Σ(new − old)²`` and ``Σ new²`` for each of the ``batch``
    elements (axis 0; the chunk holds elements ``first, first + 1, …``, the other entries stay 0), then
    ``Σ(clip(new, 0, 1) − truth)²`` and the pixel count: ``2·batch + 2`` values."""
    n, o = new.astype(np.float64), old.astype(np.float64)
    out = np.zeros(2 * batch + 2)
    rows = slice(first, first + n.shape[0])
    axes = tuple(range(1, n.ndim))
    out[rows] = ((n - o) ** 2).sum(axis=axes)
    out[batch:][rows] = (n ** 2).sum(axis=axes)
    out[-1] = float(n.size)
    if truth is not None:
        out[-2] = ((np.clip(n, 0, 1) - truth.astype(np.float64)) ** 2).sum()
    return out


def sum_metrics(*partials: np.ndarray) -> np.ndarray:
    """Chunk partials of :func:`metric_partial` summed in chunk order."""
    total = np.zeros_like(partials[0])
    for p in partials:
        total += p
    return total
