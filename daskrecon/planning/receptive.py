"""Measure how far a network looks: the overlap that makes tiling exact."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["KNOWN_OVERLAPS", "receptive_radius"]

#: Overlap that makes overlap tiling exact for deepinv models (measured by
#: :func:`receptive_radius`; see docs/tiling.rst). DRUNet's field covers hundreds of
#: pixels: no practical overlap is exact, use 32-64 with align=8 (error measured there).
KNOWN_OVERLAPS = {
    "DnCNN(depth=d)": "d (20 for the default depth)",
    "DRUNet": "not exact below ~200 px; 32-64 with align=8 keeps the error small",
}


def receptive_radius(
    model: Any,
    channels: int = 3,
    ndim: int = 2,
    size: int = 65,
    max_size: int = 1025,
    trials: int = 2,
    model_kwargs: dict | None = None,
) -> int:
    """Radius (in pixels) of the region of the input that one output pixel depends on.

    Back-propagates from the centre output pixel of random inputs and returns the largest
    distance (Chebyshev, over all axes) of an input pixel with a non-zero gradient. The
    input grows until the support no longer touches its border.

    Parameters
    ----------
    model : callable
        ``model(x, **model_kwargs)`` with ``x`` of shape ``(1, channels, *[size]*ndim)``.
    channels, ndim : int
        Input channels and spatial dimensions.
    size, max_size : int
        First and largest input side tried (odd, so that there is a centre pixel).
    trials : int
        Random inputs tried (the union of their supports is used: a ReLU that is off
        for one input can hide a dependence).
    model_kwargs : dict, optional
        Extra arguments (e.g. ``{"sigma": 0.05}``).

    Returns
    -------
    int
        Use at least this ``overlap`` for exact overlap tiling of a stride-1 network.

    Raises
    ------
    ValueError
        If the support still touches the border at ``max_size`` (the field is larger).
    """
    kwargs = model_kwargs or {}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        while size <= max_size:
            support = None
            for t in range(trials):
                g = torch.Generator().manual_seed(t)
                x = torch.rand((1, channels) + (size,) * ndim, generator=g).requires_grad_(True)
                out = model(x, **kwargs)
                centre = (slice(None), slice(None)) + (size // 2,) * ndim
                (grad,) = torch.autograd.grad(out[centre].sum(), x)
                s = grad.abs().sum(dim=(0, 1)) > 0
                support = s if support is None else support | s
            idx = torch.nonzero(support)
            radius = int((idx - size // 2).abs().max()) if len(idx) else 0
            if radius < size // 2:
                return radius
            size = 2 * size - 1
        raise ValueError(f"the receptive field reaches beyond {max_size} px: tiling cannot be exact; "
                         "use blend='cosine' and the largest affordable overlap")
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
