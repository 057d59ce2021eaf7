"""Chunk kernels of the cluster's linear solvers (:mod:`daskrecon.linsolve`)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["axpy_block", "axpy_neg_block", "cg_alpha", "cg_beta", "delta_block", "dot_block", "fourier_solve",
           "spectrum_of", "sum_in_order"]


def axpy_block(x: np.ndarray, y: np.ndarray, a: float) -> np.ndarray:
    """``x + a·y`` on one chunk, in ``x``'s dtype."""
    return x + np.asarray(a, dtype=x.dtype) * y


def axpy_neg_block(x: np.ndarray, y: np.ndarray, a: float) -> np.ndarray:
    """``x − a·y`` on one chunk, in ``x``'s dtype (``a`` may come from another task)."""
    return x - np.asarray(a, dtype=x.dtype) * y


def cg_alpha(rr: float, pq: float, threshold: float = 0.0) -> float:
    """Conjugate gradient's step ``‖r‖² / ⟨p, Mp⟩``; 0 once converged (``‖r‖² ≤ threshold``) or
    when ⟨p, Mp⟩ is not positive (the driver raises)."""
    return rr / pq if (pq > 0 and rr > threshold) else 0.0


def cg_beta(rr_new: float, rr: float, threshold: float = 0.0) -> float:
    """``‖r_new‖² / ‖r‖²``; 0 once converged."""
    return rr_new / rr if rr > threshold else 0.0


def dot_block(a: np.ndarray, b: np.ndarray) -> float:
    """``⟨a, b⟩`` of one chunk, in float64."""
    return float(np.vdot(a.astype(np.float64, copy=False).ravel(), b.astype(np.float64, copy=False).ravel()))


def sum_in_order(*values: Any) -> float:
    """Sum in argument order (a fixed order: bitwise reproducible)."""
    total = 0.0
    for v in values:
        total += float(v)
    return total


def delta_block(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    """One chunk of the image that is 1 at the spatial origin of every (batch, channel), 0 elsewhere."""
    out = np.zeros_like(block)
    loc = block_info[None]["array-location"]
    if all(start == 0 for start, _ in loc[2:]):
        out[(slice(None), slice(None)) + (0,) * (block.ndim - 2)] = 1
    return out


def _spatial_axes(a: np.ndarray) -> tuple[int, ...]:
    return tuple(range(2, a.ndim))


def spectrum_of(impulse_response: np.ndarray) -> np.ndarray:
    """Eigenvalues of a circulant (per batch and channel) normal operator from its impulse response."""
    spectrum = np.fft.fftn(impulse_response.astype(np.float64), axes=_spatial_axes(impulse_response)).real
    return spectrum.astype(impulse_response.dtype)


def fourier_solve(rhs: np.ndarray, spectrum: np.ndarray, c: float) -> np.ndarray:
    """``(I + c·H)⁻¹ rhs`` for ``H`` diagonal in Fourier with eigenvalues ``spectrum`` (float64 inside)."""
    axes = _spatial_axes(rhs)
    u = np.fft.ifftn(np.fft.fftn(rhs.astype(np.float64), axes=axes) / (1.0 + c * spectrum), axes=axes).real
    return u.astype(rhs.dtype)
