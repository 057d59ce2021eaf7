"""Fine-tune the bundled DRUNet through unrolled ADMM iterations of the demo's scheme (deep unfolding).

The demo (``daskrecon demo``) runs ADMM whose denoiser σ decreases over a few iterations
(``daskrecon.demo.demo_schedule``). This script trains the denoiser for that use: each step draws
patches of the training images (``scripts/train_denoiser.py``'s, the demo's astronaut and the other
held-out images excluded), blurs each with three circular Gaussian blurs — the demo's (``--fixed``)
or random ones (σ per axis in [0.7, 3.2], any angle) — adds noise (0.05, or uniform in [0.03, 0.07]
with random blurs), runs the ``--iterations`` ADMM iterations in closed form (FFT) with the
denoiser, and takes the MSE of the last iterate against the patch, back through every iteration.
Every ``--eval-every`` minutes and at the end it runs the same ADMM on the held-out images at 256²
with the demo's blurs and prints the PSNR after each iteration.

On this machine's 2 CPU cores (2026-12-05) neither recipe gained within the hour they allow: see
docs/status.md. It is kept for a machine with a GPU (``--device cuda``).

    python scripts/finetune_unrolled.py --minutes 30 --fixed --lr 2e-5 --bf16 --out /tmp/unrolled.pt
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_denoiser as td  # the training images, crops and PSNR


def blur_spectra(kernels: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """The centred FFTs of ``kernels`` zero-padded to ``size`` (circular convolution), ``(len, H, W)``."""
    from deepinv.physics.functional.convolution import filter_fft

    return torch.stack([filter_fft(k, img_size=size, real_fft=False, dims=(-2, -1))[0, 0] for k in kernels])


def random_kernels(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    from deepinv.physics.functional.blur import gaussian_blur

    out = []
    for _ in range(n):
        sx, sy = (0.7 + 2.5 * torch.rand(2, generator=gen)).tolist()
        out.append(gaussian_blur(sigma=(sx, sy), angle=float(180 * torch.rand((), generator=gen))))
    return out


def unrolled_admm(model, y_fft: torch.Tensor, spectra: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor,
                  relative_sigmas: list[float], weight: float | list[float]) -> list[torch.Tensor]:
    """ADMM on ``Σ_i ½‖H_i x − y_i‖²`` with ``D_σ``: the iterates. ``y_fft``: ``(B, M, C, H, W)``,
    ``spectra``: ``(B, M, H, W)``, ``noise``: ``(B, 1, 1, 1)`` or a float; σ_k = noise · relative_sigmas[k]
    and the data term's weight ρ_k = weight_k · noise² / σ_k² (the demo's γ_k = 1 / ρ_k; ``weight`` one
    value for all iterations or one per iteration)."""
    hty = (spectra.conj()[:, :, None] * y_fft).sum(1)
    hth = (spectra.abs() ** 2).sum(1)[:, None]
    weights = list(weight) if isinstance(weight, (list, tuple)) else [weight] * len(relative_sigmas)
    x, u, out = x0, torch.zeros_like(x0), []
    for r, w in zip(relative_sigmas, weights, strict=True):
        sigma = noise * r
        rho = w * noise ** 2 / sigma ** 2
        v = torch.fft.ifft2((hty + rho * torch.fft.fft2(x - u)) / (hth + rho)).real
        x = model(v + u, sigma).float()
        u = u + v - x
        out.append(x)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--iterations", type=int, default=5, help="unrolled ADMM iterations (the demo's 5)")
    p.add_argument("--sigma-from", type=float, default=0.2)
    p.add_argument("--sigma-to", type=float, default=0.08)
    p.add_argument("--weight", type=float, default=1.0, help="λ of the schedule (daskrecon.demo.demo_schedule)")
    p.add_argument("--fixed", action="store_true", help="the demo's three blurs and noise 0.05 (else random)")
    p.add_argument("--more-images", action=argparse.BooleanOptionalAction, default=True,
                   help="also sporco's five images (pip install --no-deps sporco)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-every", type=float, default=10.0, help="minutes")
    p.add_argument("--out", required=True, help="the fine-tuned weights (a state dict; a JSON log next to it)")
    args = p.parse_args()

    from daskrecon.demo import demo_problem, demo_schedule
    from daskrecon.models import bundled_drunet

    device = torch.device(args.device)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    names = td.SKIMAGE + td.EXTRA + (td.MORE if args.more_images else [])
    images = [im for im in (td.rgb(n, s) for n in names for s in (1.0, 0.75, 0.5)) if min(im.shape[1:]) >= args.patch]
    sigmas = demo_schedule(args.iterations, 0.05, args.sigma_from, args.sigma_to, args.weight)["sigma_denoiser"]
    relative = [s / 0.05 for s in sigmas]
    demo_kernels = [op.filter for op in demo_problem(64)[1]]
    model = bundled_drunet(device).train()
    for q in model.parameters():
        q.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    def evaluate() -> dict:
        """The held-out images at 256², the demo's blurs and noise σ 0.05 (the astronaut: the demo's own
        measurements): the PSNR after each iteration."""
        model.eval()
        out = {}
        for name in td.HELD_OUT:
            if name == "astronaut":
                x, ops, y = demo_problem(256)
            else:
                x = torch.nn.functional.interpolate(td.rgb(name)[None], size=(256, 256), mode="area")
                ops, g = demo_problem(64)[1], torch.Generator().manual_seed(1)
                y = [op.A(x) + 0.05 * torch.randn(x.shape, generator=g) for op in ops]
            y = torch.stack([y[i] for i in range(len(ops))], 1).to(device)  # (1, M, C, H, W)
            spectra = blur_spectra([op.filter for op in ops], (256, 256))[None].to(device)
            with torch.no_grad():
                xs = unrolled_admm(model, torch.fft.fft2(y), spectra, torch.full((1, 1, 1, 1), 0.05, device=device),
                                   y.mean(1), relative, args.weight)
            out[name] = [round(td.psnr(v.cpu(), x), 3) for v in xs]
        model.train()
        return out

    log = [{"step": 0, "seconds": 0.0, "held_out": evaluate()}]
    print("before", log[0]["held_out"], flush=True)
    t0 = last = time.time()
    step, budget = 0, 60 * args.minutes
    while time.time() - t0 < budget:
        for group in opt.param_groups:
            group["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * min((time.time() - t0) / budget, 1.0)))
        x = td.sample_batch(images, args.batch, args.patch, gen).to(device)
        size = (args.patch, args.patch)
        if args.fixed:
            spectra = blur_spectra(demo_kernels, size)[None].expand(args.batch, -1, -1, -1)
            noise = torch.full((args.batch, 1, 1, 1), 0.05)
        else:
            spectra = torch.stack([blur_spectra(random_kernels(3, gen), size) for _ in range(args.batch)])
            noise = 0.03 + 0.04 * torch.rand(args.batch, 1, 1, 1, generator=gen)
        spectra, noise = spectra.to(device), noise.to(device)
        y = torch.fft.ifft2(spectra[:, :, None] * torch.fft.fft2(x)[:, None]).real
        y = y + noise[:, None] * torch.randn(y.shape, generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            xs = unrolled_admm(model, torch.fft.fft2(y), spectra, noise, y.mean(1), relative, args.weight)
        loss = torch.nn.functional.mse_loss(xs[-1], x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            print(f"step {step}  loss {loss.item():.5f}  {time.time() - t0:.0f} s", flush=True)
        if time.time() - last > 60 * args.eval_every:
            log.append({"step": step, "seconds": time.time() - t0, "held_out": evaluate()})
            print("eval", log[-1], flush=True)
            last = time.time()
    log.append({"step": step, "seconds": time.time() - t0, "held_out": evaluate()})
    print("final", log[-1], flush=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1) + "\n")


if __name__ == "__main__":
    main()
