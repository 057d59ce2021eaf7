"""Random-weight models used by the benchmarks (no download)."""

import torch


def make_model(name: str):
    """Return (model, sigma) for a benchmark model name."""
    from deepinv.models import DnCNN, DRUNet

    torch.manual_seed(0)
    if name == "drunet":
        return DRUNet(3, 3, pretrained=None).eval(), 0.05
    if name == "dncnn":
        return DnCNN(3, 3, pretrained=None).eval(), None
    if name == "tiny":
        return DnCNN(1, 1, depth=4, nf=8, pretrained=None).eval(), None
    raise ValueError(name)
