"""The denoisers bundled with daskrecon, a 2-D denoiser on volumes slice by slice, and loading users' own
weight files safely."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from deepinv.models import Denoiser

__all__ = [
    "ARCHITECTURES",
    "BUNDLED_DENOISER",
    "BUNDLED_DENOISER_3D",
    "BUNDLED_DRUNET",
    "FlipRotateAverage",
    "GreyThroughColour",
    "SliceBySlice",
    "bundled_denoiser",
    "bundled_denoiser_3d",
    "bundled_drunet",
    "load_network",
    "load_state_dict",
    "network_from_state_dict",
    "network_layout",
]

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


#: The deepinv networks :func:`network_from_state_dict` rebuilds from their weights alone.
ARCHITECTURES = ("dncnn", "drunet")


def _architecture_of(state: dict[str, torch.Tensor]) -> str | None:
    if "m_head.weight" in state and "m_tail.weight" in state:
        return "drunet"
    if "in_conv.weight" in state and "out_conv.weight" in state:
        return "dncnn"
    return None


def network_layout(state: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """``(input channels, spatial dimensions)`` of deepinv DnCNN or DRUNet weights (2 for images, 3 for
    volumes), read from their first convolution; ``None`` for other weights."""
    arch = _architecture_of(state)
    if arch is None:
        return None
    first = state["m_head.weight" if arch == "drunet" else "in_conv.weight"]
    # DRUNet's head also takes the noise-level map: one input channel more than the image has
    return int(first.shape[1]) - (arch == "drunet"), first.dim() - 2


def _drunet_options(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    head, tail = state["m_head.weight"], state["m_tail.weight"]
    nb = sum(1 for k in state if k.startswith("m_down1.") and k.endswith(".res.0.weight"))
    downs = [state.get(f"m_down{i}.{nb}.weight") for i in (1, 2, 3)]
    if any(w is None for w in downs):
        raise ValueError("these DRUNet weights have no strided-convolution down-sampling (downsample_mode "
                         "'strideconv'); build the network yourself and load them with load_state_dict")
    channels, dim = network_layout(state)
    return dict(in_channels=channels, out_channels=tail.shape[0],
                nc=(head.shape[0], *(int(w.shape[0]) for w in downs)), nb=nb, dim=dim)


def _dncnn_options(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    first, last = state["in_conv.weight"], state["out_conv.weight"]
    inner = sum(1 for k in state if k.startswith("conv_list.") and k.endswith(".weight"))
    channels, dim = network_layout(state)
    return dict(in_channels=channels, out_channels=last.shape[0], depth=inner + 2, nf=first.shape[0],
                bias="in_conv.bias" in state, dim=dim)


def network_from_state_dict(state: dict[str, torch.Tensor], architecture: str | None = None) -> torch.nn.Module:
    """The deepinv network these weights belong to, built to their sizes, with them loaded (eval mode).

    Channels, widths, depth and dimension (2-D or 3-D) are read from the weights' shapes, so deepinv's
    own DRUNet and DnCNN checkpoints (colour or grey), the bundled networks and those trained by
    ``scripts/train_denoiser.py`` all load without their constructor's arguments; names saved from
    ``DataParallel``/DDP (``module.``) or ``torch.compile`` (``_orig_mod.``) are taken too.

    Parameters
    ----------
    state : dict of str to Tensor
        A state dict (:func:`load_state_dict` reads one from a file safely).
    architecture : {"dncnn", "drunet"}, optional
        Checked against the weights when given; read from their names when not.

    Returns
    -------
    torch.nn.Module
        A ``deepinv.models.DnCNN`` or ``DRUNet``.

    Raises
    ------
    ValueError
        The weights are not those of a network in :data:`ARCHITECTURES`, not of the one named, or do
        not load into the network their shapes describe.
    """
    from deepinv.models import DnCNN, DRUNet

    for prefix in ("module.", "_orig_mod."):  # saved from DataParallel/DDP, or from torch.compile
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    found = _architecture_of(state)
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {architecture!r}")
    if found is None:
        first = ", ".join(list(state)[:3])
        raise ValueError(f"these weights are not those of a deepinv {' or '.join(ARCHITECTURES)} (their first "
                         f"names: {first}); build the network and load them with load_state_dict")
    if architecture is not None and architecture != found:
        raise ValueError(f"architecture {architecture!r} was asked, but these are {found} weights")
    options = _drunet_options(state) if found == "drunet" else _dncnn_options(state)
    model = (DRUNet if found == "drunet" else DnCNN)(**options, pretrained=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"these {found} weights do not load into {type(model).__name__}({options}): "
                         f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def load_network(path: str | Path, architecture: str | None = None,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """A DnCNN or DRUNet from a weight file of yours (``torch.load(weights_only=True)``: no code runs).

    ``load_network("drunet_color.pth")`` gives the network deepinv's ``DRUNet(pretrained=...)``
    would, without a download; sizes are read from the weights (:func:`network_from_state_dict`).

    Parameters
    ----------
    path : str or Path
        A state dict, or a checkpoint with a ``"state_dict"`` entry.
    architecture : {"dncnn", "drunet"}, optional
        Checked against the weights when given.
    device : str or torch.device
        Where the model is placed.

    Returns
    -------
    torch.nn.Module
        The network in eval mode.
    """
    return network_from_state_dict(load_state_dict(path), architecture).to(device)


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


class FlipRotateAverage(Denoiser):
    """A 2-D denoiser averaged over the 8 flips and 90° rotations of its input (the dihedral group), exactly.

    deepinv's ``EquivariantDenoiser(model, random=False)`` averages over the same eight transforms,
    but rotates through torchvision's resampling on a grid of coordinates: under ``torch.autocast``
    in bf16 those coordinates are rounded beyond 256 pixels (bf16 holds 8 significant bits), and a
    512² image came back at 25.3 dB where fp32 gives 30.9 (daskrecon's precision probe refuses it;
    ``benchmarks/bench_flip_rotate.py``).
    Here the transforms are ``torch.rot90`` and ``torch.flip``: exact in every dtype, so only the
    network runs in the reduced precision; a rectangular input is rotated as it is (deepinv crops
    and pads it to its shape). In fp32 the result equals deepinv's up to the order of the sum.
    The eight outputs are averaged in fp32.

    Parameters
    ----------
    denoiser : torch.nn.Module
        A 2-D denoiser on ``(B, C, H, W)`` images, called as ``denoiser(x, *args, **kwargs)``.

    Examples
    --------
    >>> import torch
    >>> from daskrecon.models import FlipRotateAverage, bundled_drunet
    >>> FlipRotateAverage(bundled_drunet())(torch.rand(1, 3, 32, 48), 0.05).shape
    torch.Size([1, 3, 32, 48])
    """

    def __init__(self, denoiser: torch.nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser  # the name deepinv's priors use: the tile alignment reads it

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"FlipRotateAverage takes (B, C, H, W) images, got shape {tuple(x.shape)}")
        b = x.shape[0]
        total = None
        # quarter turns 0 and 2 keep the shape, 1 and 3 swap H and W: one batched call each (one if square)
        groups = [(0, 1, 2, 3)] if x.shape[-1] == x.shape[-2] else [(0, 2), (1, 3)]
        for turns in groups:
            views = [torch.rot90(v, k, (-2, -1)) for k in turns for v in (x, x.flip(-1))]
            out = self.denoiser(torch.cat(views), *args, **kwargs).float()
            for j, k in enumerate(turns):
                for f in range(2):
                    back = torch.rot90(out[(2 * j + f) * b:(2 * j + f + 1) * b], -k, (-2, -1))
                    back = back.flip(-1) if f else back
                    total = back if total is None else total + back
        return (total / 8).to(x.dtype) if x.dtype.is_floating_point else total / 8


class GreyThroughColour(Denoiser):
    """A colour (3-channel) denoiser on grey (1-channel) signals: the channel given three times, the noise
    level scaled by √3, the three outputs averaged.

    A grey image is a colour image whose channels are equal, inside what the bundled (colour) networks were
    trained on, but its noise is equal in the three channels too: what a colour network would see as
    noise of ``σ·√3`` per channel, averaged over them. Told ``σ`` it leaves much of the noise in
    (the bundled DRUNet at σ 0.1 on scikit-image's camera, 512²: 26.2 dB told σ, 28.9 dB told σ·√3, from
    20.0; the astronaut in grey 26.5 and 29.6; ``python benchmarks/bench_grey_through_colour.py``). Blind
    networks (the bundled DnCNN) ignore the level. ``daskrecon reconstruct`` wraps a colour denoiser in this for a grey image by itself and
    says so.

    Parameters
    ----------
    denoiser : torch.nn.Module
        Called as ``denoiser(x3, sigma, ...)`` on ``(B, 3, ...)`` signals.
    sigma_scale : float
        What the noise level (``sigma``, positional or keyword) is multiplied by (default √3).

    Examples
    --------
    >>> import torch
    >>> from daskrecon.models import GreyThroughColour, bundled_drunet
    >>> GreyThroughColour(bundled_drunet())(torch.rand(1, 1, 32, 32), 0.05).shape
    torch.Size([1, 1, 32, 32])
    """

    #: What it takes (read by the tiled denoiser's channel check).
    in_channels = 1

    def __init__(self, denoiser: torch.nn.Module, sigma_scale: float = 3 ** 0.5) -> None:
        super().__init__()
        self.denoiser = denoiser  # the name deepinv's priors use: the tile alignment reads it
        self.sigma_scale = float(sigma_scale)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != 1:
            raise ValueError(f"GreyThroughColour takes 1-channel signals (B, 1, ...), got shape {tuple(x.shape)}")
        if args:
            args = (self._scaled(args[0]), *args[1:])
        elif "sigma" in kwargs:
            kwargs = {**kwargs, "sigma": self._scaled(kwargs["sigma"])}
        out = self.denoiser(x.repeat(1, 3, *([1] * (x.dim() - 2))), *args, **kwargs)
        return out.mean(dim=1, keepdim=True)

    def _scaled(self, sigma: Any) -> Any:
        return sigma * self.sigma_scale if isinstance(sigma, (int, float, torch.Tensor)) else sigma
