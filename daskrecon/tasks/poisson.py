"""Expectation-maximization tasks (MLEM, OSEM): the back-projected ratio and the sensitivity, chunk kernels.

MLEM's update ``x ← x ⊙ Σ_i A_iᵀ(y_i / A_i x) / Σ_i A_iᵀ1`` has the shape of a gradient pass: a
pixel-wise function of ``(A_i x, y_i)`` back-projected by ``A_iᵀ`` and summed over operators. So
the engine's gradient graph (chunk-wise forms or whole-image tasks, the fixed-index tree) computes
both sums, given these two pixel-wise "distances" in place of the fidelity's: :class:`Ratio`
(``∂ = y / max(u, ε)``; its value the Poisson negative log-likelihood ``Σ u − y log max(u, ε)``)
and :class:`Ones` (``∂ = 1``, value 0: ``A_iᵀ1``). Whole-image operators back-project with their
own ``A_adjoint`` (:class:`RatioFidelity`, :class:`OnesFidelity`), as deepinv's MLEM does — not
the autograd transpose ``A_vjp`` of a gradient, which an operator's own adjoint need not equal.
"""

from __future__ import annotations

import numpy as np
import torch
from deepinv.optim.data_fidelity import DataFidelity
from deepinv.optim.distance import Distance

__all__ = [
    "Ones",
    "OnesFidelity",
    "Ratio",
    "RatioFidelity",
    "bsrem_block",
    "em_block",
    "em_numerator_block",
    "red_term_block",
    "sirt_block",
    "support_block",
]


class Ratio(Distance):
    """``∂(u, y) = y / max(u, ε)``; value ``Σ (u − y log max(u, ε))`` per batch element (Poisson NLL up to a constant)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = float(eps)

    def fn(self, x: torch.Tensor, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        u = x.clamp(min=self.eps)
        return (x - y * torch.log(u)).flatten(1).sum(1)

    def grad(self, x: torch.Tensor, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return y / x.clamp(min=self.eps)


class Ones(Distance):
    """``∂(u, y) = 1``, value 0: back-projected, the sensitivity ``A_iᵀ1``."""

    def fn(self, x: torch.Tensor, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros(x.shape[0], dtype=x.dtype)

    def grad(self, x: torch.Tensor, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.ones_like(x)


class _BackProjected(DataFidelity):
    """``grad(x, y, A) = A.A_adjoint(d.grad(A x, y))``: the operator's own adjoint (whole-image operators)."""

    def grad(self, x: torch.Tensor, y: torch.Tensor, physics, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return physics.A_adjoint(self.d.grad(physics.A(x), y))


class RatioFidelity(_BackProjected):
    """``A_iᵀ(y_i / max(A_i x, ε))``, its value the Poisson NLL (whole-image operators)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.d = Ratio(eps)


class OnesFidelity(_BackProjected):
    """``A_iᵀ1`` (whole-image operators)."""

    def __init__(self) -> None:
        super().__init__()
        self.d = Ones()


def em_block(x: np.ndarray, back: np.ndarray, sensitivity: np.ndarray, eps: float,
             prior: np.ndarray | None = None, weight: float = 0.0) -> np.ndarray:
    """One EM update on a chunk, in deepinv's order: ``(x ⊙ back) / max(s + w·prior, ε)``.

    ``prior`` (the one-step-late term, e.g. RED's ``u − D(u)`` at ``u = x ⊙ back``) and its
    weight ``w`` are optional.
    """
    num = x * back
    denom = sensitivity if prior is None else sensitivity + np.asarray(weight, dtype=x.dtype) * prior
    return num / np.maximum(denom, np.asarray(eps, dtype=x.dtype))


def em_numerator_block(x: np.ndarray, back: np.ndarray) -> np.ndarray:
    """``x ⊙ back`` on a chunk: the point where the one-step-late prior term is taken."""
    return x * back


def red_term_block(u: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``u − D(u)`` on a chunk: RED's gradient."""
    return u - d


def sirt_block(x: np.ndarray, g: np.ndarray, column_sums: np.ndarray, tau: float, eps: float) -> np.ndarray:
    """SIRT's update on a chunk, in deepinv's order: ``x + (τ · (−g)) / max(c, ε)``, ``g = Σ_i A_iᵀ W_i (A_i x − y_i)``."""
    return x + (np.asarray(tau, dtype=x.dtype) * -g) / np.maximum(column_sums, np.asarray(eps, dtype=x.dtype))


def support_block(average: np.ndarray, peak: np.ndarray, threshold: float) -> np.ndarray:
    """BSREM's reconstruction support on a chunk: ``1`` where ``s̄ > t · max s̄``, else ``0``."""
    return (average > np.asarray(threshold, dtype=average.dtype) * peak).astype(average.dtype)


def bsrem_block(x: np.ndarray, back: np.ndarray, sensitivity: np.ndarray, average: np.ndarray, support: np.ndarray,
                alpha: float, eps: float, prior: np.ndarray | None = None, weight: float = 0.0) -> np.ndarray:
    """One BSREM subset update on a chunk, in deepinv's order (``BSREMIteration``)::

        g = (s_l − back) + w · ∇R          (w = λ / L; no prior term without one)
        x ← where(support, max(x − α · (x / max(s̄, ε)) · g, ε), ε)
    """
    dt = x.dtype
    e = np.asarray(eps, dtype=dt)
    data = sensitivity - back
    g = data if prior is None else data + np.asarray(weight, dtype=dt) * prior
    inside = support > 0
    pre = np.where(inside, x / np.maximum(average, e), np.zeros_like(x))
    cand = np.maximum(x - np.asarray(alpha, dtype=dt) * pre * g, e)
    return np.where(inside, cand, np.full_like(cand, e))
