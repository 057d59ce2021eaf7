"""
deepinv.distributed's PnP demo, with daskrecon
==============================================

deepinv's ``demo_pnp_distributed.py`` with the import changed to daskrecon (plus a local
image and the bundled denoiser, as this machine cannot download). The loop calls the
distributed data-fidelity gradient and the PnP prior by hand, exactly as the original, and
compares with the same loop run without distribution. Like deepinv's demo, it opens the
context at module level, without an ``if __name__ == "__main__":`` guard.
"""

import os

import torch
from deepinv.loss.metric import PSNR
from deepinv.optim import L2, PnP
from deepinv.physics import Blur, GaussianNoise, stack
from deepinv.physics.functional.blur import gaussian_blur

from daskrecon import DistributedContext, distribute  # was: from deepinv.distributed import ...
from daskrecon.demo import demo_problem
from daskrecon.models import bundled_denoiser

SIZE = int(os.environ.get("DASKRECON_EXAMPLE_SIZE", 512))

num_iterations, step_size, denoiser_sigma = 20, 0.5, 0.05
with DistributedContext(seed=42) as ctx:
    clean, _, _ = demo_problem(SIZE)
    ops = []
    for i, (sig, angle) in enumerate([((1.0, 1.0), 0), ((2.0, 2.0), 0), ((1.5, 3.0), 30)]):
        op = Blur(filter=gaussian_blur(sigma=sig, angle=angle), padding="circular")
        op.noise_model = GaussianNoise(sigma=[0.03, 0.05, 0.04][i], rng=torch.Generator().manual_seed(42 + i))
        ops.append(op)
    stacked = stack(*ops)
    measurements = stacked(clean)
    distributed_physics = distribute(stacked, ctx)
    distributed_data_fidelity = distribute(L2(), ctx)
    denoiser = bundled_denoiser()
    prior = PnP(denoiser=distribute(denoiser, ctx, patch_size=SIZE // 2, overlap=64))
    psnr = PSNR()
    x = torch.zeros_like(clean)
    with torch.no_grad():
        for it in range(num_iterations):
            x = x - step_size * distributed_data_fidelity.grad(x, measurements, distributed_physics)
            x = prior.prox(x, sigma_denoiser=denoiser_sigma)
            if ctx.rank == 0 and (it + 1) in (1, 5, 10, 15, 20):
                print(f"iteration {it + 1}: PSNR {psnr(x, clean).item():.2f} dB")
    if ctx.rank == 0:
        x_ref = torch.zeros_like(clean)
        with torch.no_grad():
            for _ in range(num_iterations):
                x_ref = x_ref - step_size * L2().grad(x_ref, measurements, stacked)
                x_ref = denoiser(x_ref, denoiser_sigma)
        delta = psnr(x, clean).item() - psnr(x_ref, clean).item()
        print(f"distributed {psnr(x, clean).item():.2f} dB, plain {psnr(x_ref, clean).item():.2f} dB, "
              f"max diff {(x - x_ref).abs().max().item():.2e}")
        assert abs(delta) < 0.01  # deepinv's demo asserts < 1.0 dB
