"""Train the small 3-D DnCNN bundled with daskrecon (daskrecon/data/dncnn3d_small.pt).

Data: synthetic microscopy-like volumes (:func:`daskrecon.demo.demo_volume`: blobs and
filaments; no download), 32³ patches, Gaussian noise with sigma uniform in [0, 0.2]. Held out
for evaluation: volumes of seeds the training never saw.

    python scripts/train_denoiser3d.py --steps 1000       # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

TRAIN_SEEDS = list(range(1, 17))
HELD_OUT_SEEDS = [1000, 1001]


def volume(seed: int, n: int = 96) -> torch.Tensor:
    from daskrecon.demo import demo_volume

    return torch.from_numpy(demo_volume((n, n, n), chunks=n, seed=seed).compute(scheduler="sync"))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / torch.mean((a.clamp(0, 1) - b) ** 2)))


def evaluate(model, sigmas=(0.05, 0.1, 0.2), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for s in sigmas:
            noisy, den = [], []
            for v in HELD_OUT_SEEDS:
                x = volume(v, 64)
                y = x + s * torch.randn(x.shape, generator=g)
                noisy.append(psnr(y, x))
                den.append(psnr(model(y), x))
            out[f"sigma={s}"] = {"noisy_psnr": float(np.mean(noisy)), "denoised_psnr": float(np.mean(den))}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "daskrecon" / "data" / "dncnn3d_small.pt"))
    args = p.parse_args()
    from deepinv.models import DnCNN

    from daskrecon.models import BUNDLED_DENOISER_3D

    torch.manual_seed(0)
    volumes = [volume(s) for s in TRAIN_SEEDS]
    model = DnCNN(**BUNDLED_DENOISER_3D, pretrained=None)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    t0 = time.time()
    n, q = volumes[0].shape[-1], args.patch
    for step in range(args.steps):
        batch = []
        for _ in range(args.batch):
            v = volumes[torch.randint(len(volumes), ()).item()]
            i, j, k = (torch.randint(n - q, ()).item() for _ in range(3))
            patch = v[0, :, i:i + q, j:j + q, k:k + q]
            batch.append(patch.permute(0, *(1 + torch.randperm(3)).tolist()))  # axis shuffles
        x = torch.stack(batch)
        sigma = 0.2 * torch.rand(x.shape[0], 1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(model(x + sigma * torch.randn_like(x)), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step:5d}  loss {loss.item():.6f}  {time.time() - t0:.0f} s", flush=True)
    model.eval()
    torch.save(model.state_dict(), args.out)
    scores = evaluate(model)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"architecture": BUNDLED_DENOISER_3D, "steps": args.steps, "train_seeds": TRAIN_SEEDS,
         "held_out_seeds": HELD_OUT_SEEDS, "held_out_psnr": scores, "train_seconds": time.time() - t0},
        indent=2) + "\n")
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()
