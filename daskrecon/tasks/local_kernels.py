"""Chunk kernels of the local operators (:mod:`daskrecon.local`), run by ``map_overlap``.

A chunk arrives from ``map_overlap`` with a halo of ``radius`` on the sides that face another
chunk (all sides when the boundary is periodic). The sides on the image border get the
operator's own padding here, with torch's modes, so a chunk sees exactly the values the
whole-image operator sees (dask's "reflect" is numpy's "symmetric", not torch's "reflect").
"""

from __future__ import annotations

import numpy as np
import torch
from deepinv.physics.functional import conv2d

__all__ = ["local_adjoint_block", "local_forward_block"]


# A chunk arrives from ``map_overlap`` with a halo of ``radius`` on the sides that face another
# chunk (all sides when the boundary is periodic). The sides on the image border get the
# operator's own padding here, with torch's modes, so a chunk sees exactly the values the
# whole-image operator sees (dask's "reflect" is numpy's "symmetric", not torch's "reflect").
def _border_sides(block_id: tuple[int, ...] | None, nblocks: tuple[int, int], periodic: bool) -> tuple[bool, ...]:
    """(top, bottom, left, right): which sides of the chunk lie on the image border."""
    if periodic or block_id is None:
        return (False,) * 4
    i, j = block_id[-2], block_id[-1]
    return (i == 0, i == nblocks[0] - 1, j == 0, j == nblocks[1] - 1)


def _pad_border(t: torch.Tensor, radius: tuple[int, int], border: tuple[bool, ...], padding: str) -> torch.Tensor:
    dh, dw = radius
    pad = (dw * border[2], dw * border[3], dh * border[0], dh * border[1])
    if not any(pad):
        return t
    mode = "constant" if padding in ("zeros", "constant") else padding
    return torch.nn.functional.pad(t, pad, mode=mode, value=0.0) if mode == "constant" else \
        torch.nn.functional.pad(t, pad, mode=mode)


def _conv_window(t: torch.Tensor, filt: torch.Tensor, radius: tuple[int, int], border: tuple[bool, ...],
                 padding: str, factor: int) -> torch.Tensor:
    """deepinv's padded ``conv2d`` (then ``[::f, ::f]``) on a window with its halo."""
    t = _pad_border(t, radius, border, padding)
    h, w = filt.shape[-2:]
    # deepinv pads (ph - ih) before and ph after; the halo is ph on each side.
    t = t[..., (h - 1) % 2:, (w - 1) % 2:]
    out = conv2d(t, filt, padding="valid")
    return out[..., ::factor, ::factor] if factor > 1 else out


def local_forward_block(block: np.ndarray, filt: np.ndarray, padding: str, radius: tuple[int, int], factor: int,
                        nblocks: tuple[int, int], block_id: tuple[int, ...] | None = None) -> np.ndarray:
    """``A`` of a padded convolution on one chunk (with its halo) → that chunk of ``y``."""
    periodic = padding == "circular"
    t = torch.from_numpy(np.ascontiguousarray(block))
    border = _border_sides(block_id, nblocks, periodic)
    with torch.no_grad():
        out = _conv_window(t, torch.from_numpy(filt).to(t.dtype), radius, border, padding, factor)
    return out.numpy()


def local_adjoint_block(block: np.ndarray, filt: np.ndarray, padding: str, radius: tuple[int, int], factor: int,
                        nblocks: tuple[int, int], block_id: tuple[int, ...] | None = None) -> np.ndarray:
    """``Aᵀ`` on one chunk of ``y`` (with a halo of ``ceil(radius / factor)``) → that chunk of ``x``.

    The adjoint is the vector-Jacobian product of :func:`local_forward_block` over the
    window of ``x`` that the halo'd ``y`` chunk depends on: exact for a linear map, and the
    same padding semantics as the forward by construction.
    """
    periodic = padding == "circular"
    yt = torch.from_numpy(np.ascontiguousarray(block))
    border = _border_sides(block_id, nblocks, periodic)
    (dh, dw), f = radius, factor
    hy, hw = -(-dh // f), -(-dw // f)
    inner = [not b for b in border]  # sides that carry a halo
    shape = (*yt.shape[:-2], f * yt.shape[-2] + dh * (inner[0] + inner[1]), f * yt.shape[-1] + dw * (inner[2] + inner[3]))
    xw = torch.zeros(shape, dtype=yt.dtype, requires_grad=True)
    with torch.enable_grad():
        out = _conv_window(xw, torch.from_numpy(filt).to(yt.dtype), radius, border, padding, f)
        (g,) = torch.autograd.grad(out, xw, grad_outputs=yt)
    top = (dh + f * hy) * inner[0]
    left = (dw + f * hw) * inner[2]
    core_h = f * (yt.shape[-2] - hy * (inner[0] + inner[1]))
    core_w = f * (yt.shape[-1] - hw * (inner[2] + inner[3]))
    return g[..., top:top + core_h, left:left + core_w].contiguous().numpy()
