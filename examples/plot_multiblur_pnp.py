"""
Distributed PnP deblurring from several blurred views
=====================================================

The user guide's example: three blurs of one image, each with its own noisy measurement, are
spread over the workers of a local Dask cluster; the data-fidelity gradient is one task per
operator, summed on the workers; the bundled denoiser runs tile by tile.
"""

import os

import torch

import daskrecon as dr
from daskrecon.demo import demo_problem
from daskrecon.models import bundled_denoiser

SIZE = int(os.environ.get("DASKRECON_EXAMPLE_SIZE", 256))

if __name__ == "__main__":
    x_true, physics_list, y = demo_problem(SIZE)  # astronaut, blurs sigma 1, 2, (1.5, 3)@30°, noise 0.05
    with dr.DistributedContext() as ctx:
        print("dashboard:", ctx.dashboard_link)
        physics = dr.distribute(physics_list, ctx)
        denoiser = dr.distribute(bundled_denoiser(), ctx, patch_size=SIZE // 2, overlap=8)
        x = dr.reconstruct(physics, y, denoiser, n_iter=20, step_size=0.6, x_true=x_true)
    psnr = 10 * torch.log10(1 / torch.mean((x.clamp(0, 1) - x_true) ** 2))
    print(f"reconstruction PSNR {psnr:.2f} dB")
