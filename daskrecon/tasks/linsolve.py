"""Chunk kernels of the cluster's linear solvers (:mod:`daskrecon.linsolve`)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["axpy_block", "axpy_neg_block", "cg_alpha", "cg_beta", "dot_block", "sum_in_order"]


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
