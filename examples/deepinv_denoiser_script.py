"""
deepinv.distributed's tiled-denoiser demo, with daskrecon
=========================================================

deepinv's ``demo_denoiser_distributed.py`` with ``from deepinv.distributed import ...``
replaced by ``from daskrecon import ...``. Two further changes, because this machine
cannot download: a scikit-image image instead of ``load_example("CBSD_0010.png")``, and
the bundled denoiser instead of ``DRUNet(pretrained="download")``. Like deepinv's demo, it
opens the context at module level, without an ``if __name__ == "__main__":`` guard.
"""

import os

import torch
from deepinv.loss.metric import PSNR

from daskrecon import DistributedContext, distribute  # was: from deepinv.distributed import ...
from daskrecon.demo import demo_problem
from daskrecon.models import bundled_denoiser

SIZE = int(os.environ.get("DASKRECON_EXAMPLE_SIZE", 512))

with DistributedContext(seed=42) as ctx:
    clean, _, _ = demo_problem(SIZE)
    clean = clean.to(ctx.device)
    torch.manual_seed(42)
    noisy = torch.clamp(clean + 0.1 * torch.randn_like(clean), 0, 1)
    psnr = PSNR()
    denoiser = bundled_denoiser()
    distributed_denoiser = distribute(denoiser, ctx, patch_size=SIZE // 2, overlap=64)
    with torch.no_grad():
        denoised = distributed_denoiser(noisy, sigma=0.1)
    if ctx.rank == 0:
        with torch.no_grad():
            reference = denoiser(noisy, sigma=0.1)
        diff = (denoised - reference).abs()
        print(f"input PSNR {psnr(noisy, clean).item():.2f} dB -> {psnr(denoised, clean).item():.2f} dB")
        print(f"tiled vs untiled: mean {diff.mean().item():.2e}, max {diff.max().item():.2e}")
        assert diff.max() < 1e-5  # deepinv's own demo tolerates mean < 0.01, max < 0.5
