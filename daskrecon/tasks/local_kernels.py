"""Chunk kernels of the local operators (:mod:`daskrecon.operators.chunkwise`), run by ``map_overlap``.

A chunk arrives from ``map_overlap`` with a halo of ``radius`` on the sides that face another
chunk (all sides when the boundary is periodic). The sides on the image border get the
operator's own padding here, with torch's modes, so a chunk sees exactly the values the
whole-image operator sees (dask's "reflect" is numpy's "symmetric", not torch's "reflect").
Images are ``(B, C, H, W)`` or volumes ``(B, C, D, H, W)``: every function works on the
spatial axes the filter has.
"""

from __future__ import annotations

import numpy as np
import torch
from deepinv.physics.functional import conv2d, conv3d

__all__ = ["embed_block", "local_adjoint_block", "local_forward_block"]

_CONV = {2: conv2d, 3: conv3d}


def _border_sides(block_id: tuple[int, ...] | None, nblocks: tuple[int, ...],
                  periodic: bool) -> tuple[tuple[bool, bool], ...]:
    """Per spatial axis, ``(low, high)``: whether that side of the chunk lies on the image border."""
    nd = len(nblocks)
    if periodic or block_id is None:
        return ((False, False),) * nd
    idx = block_id[-nd:]
    return tuple((i == 0, i == n - 1) for i, n in zip(idx, nblocks))


def _pad_border(t: torch.Tensor, radius: tuple[int, ...], border: tuple[tuple[bool, bool], ...],
                padding: str) -> torch.Tensor:
    pad: list[int] = []
    for r, (lo, hi) in zip(reversed(radius), reversed(border)):  # F.pad lists the last axis first
        pad += [r * lo, r * hi]
    if not any(pad):
        return t
    mode = "constant" if padding in ("zeros", "constant") else padding
    return torch.nn.functional.pad(t, pad, mode=mode, value=0.0) if mode == "constant" else \
        torch.nn.functional.pad(t, pad, mode=mode)


def _conv_window(t: torch.Tensor, filt: torch.Tensor, radius: tuple[int, ...],
                 border: tuple[tuple[bool, bool], ...], padding: str, factor: int,
                 phase: tuple[int, ...]) -> torch.Tensor:
    """deepinv's padded ``conv2d`` / ``conv3d`` (then ``[p::f]`` on every spatial axis) on a window with its halo."""
    nd = len(radius)
    t = _pad_border(t, radius, border, padding)
    # deepinv pads (p - i) before and p after, i = (k - 1) % 2; the halo is p on each side.
    t = t[(..., *(slice((k - 1) % 2, None) for k in filt.shape[-nd:]))]
    out = _CONV[nd](t, filt, padding="valid")
    return out[(..., *(slice(p, None, factor) for p in phase))] if factor > 1 else out


def local_forward_block(block: np.ndarray, filt: np.ndarray, padding: str, radius: tuple[int, ...], factor: int,
                        nblocks: tuple[int, ...], phase: tuple[int, ...] | None = None,
                        block_id: tuple[int, ...] | None = None) -> np.ndarray:
    """``A`` of a padded convolution on one chunk (with its halo) → that chunk of ``y``.

    ``phase`` (per spatial axis, ``< factor``): the subsampling keeps pixels ``p, p + f, …`` of
    the chunk (chunks start at multiples of ``f``), for ``padding="valid"`` whose grid starts at
    the kernel's half-size, not at 0.
    """
    periodic = padding == "circular"
    t = torch.from_numpy(np.ascontiguousarray(block))
    border = _border_sides(block_id, nblocks, periodic)
    with torch.no_grad():
        out = _conv_window(t, torch.from_numpy(filt).to(t.dtype), radius, border, padding, factor,
                           phase or (0,) * len(radius))
    return out.numpy()


def local_adjoint_block(block: np.ndarray, filt: np.ndarray, padding: str, radius: tuple[int, ...], factor: int,
                        nblocks: tuple[int, ...], phase: tuple[int, ...] | None = None,
                        block_id: tuple[int, ...] | None = None) -> np.ndarray:
    """``Aᵀ`` on one chunk of ``y`` (with a halo of ``ceil(radius / factor)``) → that chunk of ``x``.

    The adjoint of :func:`local_forward_block` over the window of ``x`` that the halo'd ``y``
    chunk depends on, in two parts: the convolution's adjoint as a forward correlation of the
    zero-upsampled, zero-padded ``y`` with the kernel (CPU backends run a forward convolution
    many times faster than its input-gradient: 9× for 5³ kernels), then the border padding's
    adjoint by autograd (index folding, cheap). Exact for the linear map, same padding
    semantics as the forward by construction.
    """
    periodic = padding == "circular"
    yt = torch.from_numpy(np.ascontiguousarray(block))
    border = _border_sides(block_id, nblocks, periodic)
    nd, f = len(radius), factor
    spatial = yt.shape[-nd:]
    halo = [-(-d // f) for d in radius]
    inner = [(not lo, not hi) for lo, hi in border]  # sides that carry a halo
    shape = (*yt.shape[:-nd], *(f * n + d * (a + b) for n, d, (a, b) in zip(spatial, radius, inner)))
    k = torch.from_numpy(filt).to(yt.dtype)
    ksize = k.shape[-nd:]
    xw = torch.zeros(shape, dtype=yt.dtype, requires_grad=True)
    with torch.enable_grad():
        t = _pad_border(xw, radius, border, padding)
        t = t[(..., *(slice((q - 1) % 2, None) for q in ksize))]
    # The forward is a valid correlation with flip(k) (deepinv's convolution), then [::f]: its adjoint
    # scatters y back onto the valid grid and correlates the zero-padded result with k.
    valid = [n - q + 1 for n, q in zip(t.shape[-nd:], ksize)]
    u = torch.zeros((*yt.shape[:-nd], *valid), dtype=yt.dtype)
    u[(..., *(slice(p, None, f) for p in (phase or (0,) * nd)))] = yt
    pad: list[int] = []
    for q in reversed(ksize):
        pad += [q - 1, q - 1]
    gt = _CONV[nd](torch.nn.functional.pad(u, pad), k, padding="valid", correlation=True)
    (g,) = torch.autograd.grad(t, xw, grad_outputs=gt)
    region = []
    for n, d, h, (a, b) in zip(spatial, radius, halo, inner):
        start = (d + f * h) * a
        region.append(slice(start, start + f * (n - h * (a + b))))
    return g[(..., *region)].contiguous().numpy()


def embed_block(block: np.ndarray, pad: tuple[tuple[int, int], ...], nblocks: tuple[int, ...],
                block_id: tuple[int, ...] | None = None) -> np.ndarray:
    """A chunk of ``y`` embedded in zeros: per spatial axis ``lo`` zeros before the first chunk and
    ``hi`` after the last (the adjoint of the crop of ``padding="valid"``), one task per chunk."""
    border = _border_sides(block_id, nblocks, False)
    widths = [(0, 0)] * (block.ndim - len(pad)) + [(lo * a, hi * b) for (lo, hi), (a, b) in zip(pad, border)]
    return np.pad(block, widths) if any(w != (0, 0) for w in widths) else block
