"""A colour denoiser on grey images (``daskrecon.models.GreyThroughColour``): what the noise-level scale buys.

The bundled DRUNet is a colour network; a grey image goes through it as three equal channels, whose
noise is equal too. Told the noise level σ, the network sees less noise than there is (iid noise of
σ per channel averages to σ/√3 in the luminance it denoises); told σ·√3 it sees the right amount.
This measures both on scikit-image's grey images and the astronaut in grey, at σ 0.05 and 0.1, one
noise draw (seed 0) each, and prints the gain of the scale over telling σ.

Writes benchmarks/results/grey_through_colour.json.

    python benchmarks/bench_grey_through_colour.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402


def main() -> None:
    import torch
    from skimage import color, data, util

    from daskrecon.models import GreyThroughColour, bundled_drunet

    images = {"camera": data.camera(), "coins": data.coins(), "astronaut (grey)": color.rgb2gray(data.astronaut())}
    model = bundled_drunet()
    scaled, told = GreyThroughColour(model), GreyThroughColour(model, sigma_scale=1.0)

    def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
        return float(-10 * torch.log10(((a - ref) ** 2).mean()))

    rows = []
    print(f"{'image':18s} {'sigma':>5s} {'noisy':>7s} {'told σ':>7s} {'σ·√3':>7s} {'gain':>6s}")
    for name, img in images.items():
        x = torch.from_numpy(util.img_as_float32(img))[None, None]
        for sigma in (0.05, 0.1):
            y = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                row = {"image": name, "size": list(x.shape[2:]), "sigma": sigma, "noisy_db": psnr(y, x),
                       "told_sigma_db": psnr(told(y, sigma), x), "scaled_db": psnr(scaled(y, sigma), x)}
            rows.append(row)
            print(f"{name:18s} {sigma:5.2f} {row['noisy_db']:7.2f} {row['told_sigma_db']:7.2f} {row['scaled_db']:7.2f} "
                  f"{row['scaled_db'] - row['told_sigma_db']:+6.2f}")
    path = write("grey_through_colour", {"machine": machine(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
