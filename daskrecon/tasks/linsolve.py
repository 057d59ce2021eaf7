"""Chunk kernels of the cluster's linear solvers (:mod:`daskrecon.engine.linsolve`)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["axpy_block", "axpy_neg_block", "cg_alpha", "cg_beta", "delta_block", "dot_block", "fourier_solve",
           "polyphase_solve", "spectrum_of", "sum_in_order"]


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


def delta_block(block: np.ndarray, at: tuple[int, ...] = (), block_info: dict | None = None) -> np.ndarray:
    """One chunk of the image that is 1 at spatial position ``at`` (default: the origin) of every
    (batch, channel), 0 elsewhere."""
    out = np.zeros_like(block)
    loc = block_info[None]["array-location"][2:]
    at = tuple(at) or (0,) * len(loc)
    if all(start <= p < stop for p, (start, stop) in zip(at, loc)):
        out[(slice(None), slice(None)) + tuple(p - start for p, (start, _) in zip(at, loc))] = 1
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


def polyphase_solve(rhs: np.ndarray, c: float, *responses: np.ndarray) -> np.ndarray:
    """``(I + c·H)⁻¹ rhs`` for ``H`` commuting with shifts by ``F`` pixels, from ``H δ_p`` (``responses``,
    the ``F^d`` positions ``p`` of one period cell in row-major order; float64 inside).

    With ``N`` pixels along an axis and ``L = N / F``, ``H`` maps the frequencies ``k + jL``
    (``j`` in ``[0, F)^d``) of a class ``k`` in ``[0, L)^d`` among themselves. ``H x`` is
    ``Σ_p (H δ_p) ⊛ x_p`` with ``x_p`` ``x`` on the positions ``p + F·m``; in Fourier, on a class,
    ``(Hx)^(k + j′L) = Σ_j M[j′, j] x^(k + jL)`` with
    ``M[j′, j] = F^{-d} Σ_p (H δ_p)^(k + j′L) · exp(2πi Σ_a (k_a + j_a L_a) p_a / N_a)``.
    Each class is one ``F^d × F^d`` system, solved per batch element and channel.
    """
    spatial = rhs.shape[2:]
    d = len(spatial)
    n_pos = len(responses)
    period = round(n_pos ** (1.0 / d))
    if period ** d != n_pos or any(n % period for n in spatial):
        raise ValueError(f"{n_pos} impulse responses do not tile a period cell of an image of sides {spatial}")
    low = tuple(n // period for n in spatial)
    # Frequency index k + jL split into (j, k) per axis, then classes first: (K, J).
    split = tuple(s for n in low for s in (period, n))
    order = tuple(2 * a + 1 for a in range(d)) + tuple(2 * a for a in range(d))
    n_class = int(np.prod(low))

    def classes(a: np.ndarray) -> np.ndarray:  # (*spatial) -> (K, J)
        return a.reshape(split).transpose(order).reshape(n_class, n_pos)

    def unclasses(a: np.ndarray) -> np.ndarray:  # inverse of classes
        inverse = np.argsort(order)
        return a.reshape(tuple(low) + (period,) * d).transpose(inverse).reshape(spatial)

    # exp(2πi Σ_a (k_a + j_a L_a) p_a / N_a) as (K, J, P)
    freq = np.stack(np.meshgrid(*(np.arange(n) for n in spatial), indexing="ij"), axis=-1).reshape(-1, d)
    pos = np.array(list(np.ndindex(*(period,) * d)), dtype=np.float64)
    phase = np.exp(2j * np.pi * (freq / np.array(spatial)) @ pos.T)  # (N, P), frequencies in natural order
    phase = np.stack([classes(phase[:, p].reshape(spatial)) for p in range(n_pos)], axis=-1)
    eye = np.eye(n_pos)
    out = np.empty(rhs.shape, dtype=rhs.dtype)
    for b, ch in np.ndindex(*rhs.shape[:2]):
        spectra = np.stack([classes(np.fft.fftn(r[b, ch].astype(np.float64)))
                            for r in responses], axis=-1)  # (K, J', P)
        m = np.einsum("kqp,kjp->kqj", spectra, phase) / n_pos
        del spectra
        x = classes(np.fft.fftn(rhs[b, ch].astype(np.float64)))
        u = np.linalg.solve(eye + c * m, x[..., None])[..., 0]
        out[b, ch] = np.fft.ifftn(unclasses(u)).real.astype(rhs.dtype)
    return out
