"""The denoisers bundled with daskrecon, a 2-D denoiser on volumes slice by slice, and loading users' own
weight files safely."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from deepinv.models import Denoiser

__all__ = ["BUNDLED_DENOISER", "BUNDLED_DENOISER_3D", "BUNDLED_DRUNET", "SliceBySlice", "bundled_denoiser",
           "bundled_denoiser_3d", "bundled_drunet", "load_state_dict"]

#: Architecture of the bundled weights (a small DnCNN: stride 1, receptive radius 8).
BUNDLED_DENOISER = dict(in_channels=3, out_channels=3, depth=8, nf=32)
_WEIGHTS = "dncnn_small.pt"
#: Architecture of the bundled 3-D weights (a tiny DnCNN, ``dim=3``: receptive radius 4).
BUNDLED_DENOISER_3D = dict(in_channels=1, out_channels=1, depth=4, nf=8, dim=3)
_WEIGHTS_3D = "dncnn3d_small.pt"
#: Architecture of the bundled DRUNet (deepinv's ``DRUNet``, four scales of 32–256 channels, two residual
#: blocks per scale; 4.25 M parameters, stored in float16).
BUNDLED_DRUNET = dict(in_channels=3, out_channels=3, nc=(32, 64, 128, 256), nb=2)
_WEIGHTS_DRUNET = "drunet_small.pt"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weight file as a state dict, refusing anything that is not one.

    Uses ``torch.load(weights_only=True)``, so a file cannot run code when loaded.
    Accepts a plain state dict or a checkpoint with a ``"state_dict"`` entry.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not a (weights-only) state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{str(path)!r} is not a weights-only torch state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    return obj


def bundled_denoiser(device: str | torch.device = "cpu") -> torch.nn.Module:
    """The small DnCNN shipped with daskrecon (trained by ``scripts/train_denoiser.py``).

    A blind Gaussian denoiser for RGB images in [0, 1], trained for noise levels in
    [0, 0.2] on scikit-image's bundled images; ``sigma`` arguments are ignored.
    Exact under overlap tiling with ``overlap >= 8``.
    """
    from deepinv.models import DnCNN

    model = DnCNN(**BUNDLED_DENOISER, pretrained=None)
    weights = resources.files("daskrecon.data").joinpath(_WEIGHTS)
    with resources.as_file(weights) as path:
        model.load_state_dict(load_state_dict(path))
    return model.to(device).eval()


def bundled_drunet(device: str | torch.device = "cpu") -> torch.nn.Module:
    """The small DRUNet shipped with daskrecon, the demo's denoiser (trained by ``scripts/train_denoiser.py``).

    deepinv's ``DRUNet`` at a quarter of its width and half its depth
    (``BUNDLED_DRUNET``), trained on a GPU for noise levels in [0, 0.2] on scikit-image's,
    matplotlib's and scikit-learn's bundled images: a non-blind Gaussian denoiser for RGB images in
    [0, 1], called as ``model(x, sigma)``. On the held-out images (astronaut, chelsea, coffee) at
    σ 0.05 it gives 33.3 dB against the bundled DnCNN's 30.8 (``daskrecon/data/drunet_small.json``).
    Its receptive field spans the image (a U-Net of four scales): under overlap tiling it is close
    to, not equal to, the whole-image call — ``overlap=32`` keeps the demo within 0.01 dB of it.
    Weights are stored in float16 and loaded into a float32 model.

    Parameters
    ----------
    device : str or torch.device
        Where the model is placed.

    Returns
    -------
    torch.nn.Module
        A ``deepinv.models.DRUNet`` in eval mode.

    Examples
    --------
    >>> import torch
    >>> from daskrecon.models import bundled_drunet
    >>> bundled_drunet()(torch.rand(1, 3, 64, 64), 0.05).shape
    torch.Size([1, 3, 64, 64])
    """
    from deepinv.models import DRUNet

    model = DRUNet(**BUNDLED_DRUNET, pretrained=None)
    weights = resources.files("daskrecon.data").joinpath(_WEIGHTS_DRUNET)
    with resources.as_file(weights) as path:
        model.load_state_dict(load_state_dict(path))
    return model.to(device).eval()


def bundled_denoiser_3d(device: str | torch.device = "cpu") -> torch.nn.Module:
    """The tiny 3-D DnCNN shipped with daskrecon (trained by ``scripts/train_denoiser3d.py``).

    A blind Gaussian denoiser for single-channel volumes ``(B, 1, D, H, W)`` in [0, 1], trained
    for noise levels in [0, 0.2] on synthetic microscopy-like volumes
    (:func:`daskrecon.demo.demo_volume`); ``sigma`` arguments are ignored. Exact under overlap
    tiling with ``overlap >= 4``.
    """
    from deepinv.models import DnCNN

    model = DnCNN(**BUNDLED_DENOISER_3D, pretrained=None)
    weights = resources.files("daskrecon.data").joinpath(_WEIGHTS_3D)
    with resources.as_file(weights) as path:
        model.load_state_dict(load_state_dict(path))
    return model.to(device).eval()


class SliceBySlice(Denoiser):
    """A 2-D denoiser applied to every depth slice of ``(B, C, D, H, W)`` volumes.

    ``SliceBySlice(model)(x, *args)[:, :, k] = model(x[:, :, k], *args)``: the slices go through
    ``model`` as one batch. For a CT or MRI volume reconstructed slice by slice with a 2-D prior;
    tile it with no overlap along the depth, ``overlap=(0, o, o)`` (its receptive field there is 0).

    Parameters
    ----------
    model : torch.nn.Module
        A 2-D denoiser on ``(B, C, H, W)`` images, called as ``model(x, *args, **kwargs)``.

    Examples
    --------
    >>> import torch
    >>> from deepinv.models import DnCNN
    >>> den = SliceBySlice(DnCNN(in_channels=1, out_channels=1, depth=3, nf=8, pretrained=None))
    >>> den(torch.rand(1, 1, 5, 16, 16), 0.05).shape
    torch.Size([1, 1, 5, 16, 16])
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"SliceBySlice takes (B, C, D, H, W) volumes, got shape {tuple(x.shape)}")
        b, c, d, h, w = x.shape
        flat = x.transpose(1, 2).reshape(b * d, c, h, w)  # (B·D, C, H, W): every slice a batch element
        out = self.model(flat, *args, **kwargs)
        return out.reshape(b, d, out.shape[1], *out.shape[2:]).transpose(1, 2).contiguous()
