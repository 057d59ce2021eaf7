"""Train the small DnCNN bundled with daskrecon (daskrecon/data/dncnn_small.pt).

Data: scikit-image's bundled images (no download). Held out for evaluation: astronaut
(the demo image), chelsea and coffee. Gaussian noise with sigma uniform in [0, 0.2].

    python scripts/train_denoiser.py --steps 600        # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data, util

TRAIN = ["hubble_deep_field", "immunohistochemistry", "stereo_motorcycle", "retina", "rocket",
         "camera", "moon", "brick", "grass", "gravel", "coins", "page", "text"]
HELD_OUT = ["astronaut", "chelsea", "coffee"]


def rgb(name: str) -> torch.Tensor:
    img = getattr(data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    img = util.img_as_float32(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return torch.from_numpy(img[..., :3]).permute(2, 0, 1).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / torch.mean((a.clamp(0, 1) - b) ** 2)))


def evaluate(model, sigmas=(0.05, 0.1, 0.2), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for s in sigmas:
            noisy_psnr, den_psnr = [], []
            for name in HELD_OUT:
                x = rgb(name)[None]
                y = x + s * torch.randn(x.shape, generator=g)
                noisy_psnr.append(psnr(y, x))
                den_psnr.append(psnr(model(y), x))
            out[f"sigma={s}"] = {"noisy_psnr": float(np.mean(noisy_psnr)), "denoised_psnr": float(np.mean(den_psnr))}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--patch", type=int, default=48)
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "daskrecon" / "data" / "dncnn_small.pt"))
    p.add_argument("--depth", type=int, default=None, help="default: the bundled denoiser's")
    p.add_argument("--features", type=int, default=None, help="default: the bundled denoiser's")
    p.add_argument("--bf16", action="store_true", help="forward and backward under bf16 autocast (fp32 weights)")
    args = p.parse_args()
    from deepinv.models import DnCNN

    from daskrecon.models import BUNDLED_DENOISER

    torch.manual_seed(0)
    images = [rgb(n) for n in TRAIN]
    arch = {**BUNDLED_DENOISER, **({"depth": args.depth} if args.depth else {}),
            **({"nf": args.features} if args.features else {})}
    model = DnCNN(**arch, pretrained=None)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    t0 = time.time()
    for step in range(args.steps):
        batch = []
        for _ in range(args.batch):
            img = images[torch.randint(len(images), ()).item()]
            i = torch.randint(img.shape[1] - args.patch, ()).item()
            j = torch.randint(img.shape[2] - args.patch, ()).item()
            patch = img[:, i:i + args.patch, j:j + args.patch]
            if torch.rand(()) < 0.5:
                patch = patch.flip(-1)
            batch.append(patch[torch.randperm(3)])  # channel shuffles: colour variety
        x = torch.stack(batch)
        sigma = 0.2 * torch.rand(x.shape[0], 1, 1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(x + sigma * torch.randn_like(x))
        loss = torch.nn.functional.mse_loss(out.float(), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step:5d}  loss {loss.item():.5f}  {time.time() - t0:.0f} s", flush=True)
    model.eval()
    torch.save(model.state_dict(), args.out)
    scores = evaluate(model)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"architecture": arch, "steps": args.steps, "bf16": args.bf16, "train_images": TRAIN, "held_out": HELD_OUT,
         "held_out_psnr": scores, "train_seconds": time.time() - t0}, indent=2) + "\n")
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()
