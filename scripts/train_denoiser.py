"""Train the 2-D denoisers bundled with daskrecon.

Two recipes, one script:

* ``--arch dncnn`` (default): the small DnCNN of ``daskrecon/data/dncnn_small.pt`` (blind, 8 × 32,
  receptive radius 8: exact under overlap tiling) — ``--steps 2000``, ~6 min on 2 CPU cores (the
  shipped weights came from this script before it rotated patches and added rescaled and extra
  images: ``--no-extra-images --scales 1`` is the closest recipe);
* ``--arch drunet``: the small DRUNet of ``daskrecon/data/drunet_small.pt`` (non-blind: the noise
  level is an input; a U-Net of four scales, ``--nc 32 64 128 256 --nb 2``), the demo's denoiser —
  trained on a GPU (``--device cuda --minutes 6``; a time budget, the learning rate on a cosine of
  the elapsed fraction; ``--init`` continues from earlier weights). The shipped weights: 5.5 min on
  an H200 shared with three other candidates, then 3 min alone from those weights at half the rate
  (``daskrecon/data/drunet_small.json`` records both stages; ``scripts/train_drunet_gpu.sh`` runs them).

Data (nothing downloaded): scikit-image's bundled images, matplotlib's ``grace_hopper`` and
scikit-learn's two sample images (``china``, ``flower``; ``pip install scikit-learn``), each also at
0.75 and 0.5 scale (anti-aliased: the demo's astronaut is a 0.5-scale image); with ``--more-images``
also the five test images in ``sporco``'s wheel (kodim23, monarch, sail, tulips, barbara;
``pip install --no-deps sporco``: its data files are read, the package is not imported), which the
shipped weights did not see. Held out for
evaluation: astronaut (the demo image), chelsea and coffee. Patches: random crops, flips, 90°
rotations, channel permutations; Gaussian noise with σ uniform in [0, 0.2].

    python scripts/train_denoiser.py --steps 2000                                   # the small DnCNN
    python scripts/train_denoiser.py --arch drunet --device cuda --minutes 6 --batch 32 --patch 128 \\
        --lr 4e-4 --bf16 --out daskrecon/data/drunet_small.pt --demo-sweep            # the small DRUNet

``--demo-sweep`` then runs the demo's problem (``daskrecon.demo.demo_problem``) with plain-torch
RED, PnP and HQS over a grid of step sizes and denoiser σ and writes the PSNRs into the JSON: which
settings the demo should use (confirmed on daskrecon by ``benchmarks/bench_demo_priors.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from skimage import data, transform, util

SKIMAGE = ["hubble_deep_field", "immunohistochemistry", "stereo_motorcycle", "retina", "rocket",
           "camera", "moon", "brick", "grass", "gravel", "coins", "page", "text"]
EXTRA = ["matplotlib:grace_hopper", "sklearn:china", "sklearn:flower"]
MORE = ["sporco:kodim23", "sporco:monarch", "sporco:sail", "sporco:tulips", "sporco:barbara"]
HELD_OUT = ["astronaut", "chelsea", "coffee"]


_CACHE: dict[str, np.ndarray] = {}


def _load(name: str) -> np.ndarray:
    if name in _CACHE:
        return _CACHE[name]
    if name.startswith("matplotlib:"):
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(f"{name.split(':')[1]}.jpg") as f:
            import matplotlib.image

            return matplotlib.image.imread(f, format="jpg")
    if name.startswith("sklearn:"):
        try:
            from sklearn.datasets import load_sample_image
        except ImportError as exc:
            raise SystemExit(f"{name} is part of the training set: pip install scikit-learn") from exc
        return load_sample_image(f"{name.split(':')[1]}.jpg")
    if name.startswith("sporco:"):
        import importlib.util

        from skimage import io

        spec = importlib.util.find_spec("sporco")  # its data files only: sporco itself is not imported
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"{name} is part of the training set (--more-images): pip install --no-deps sporco")
        return io.imread(Path(spec.submodule_search_locations[0]) / "data" / f"{name.split(':')[1]}.png")
    img = getattr(data, name)()
    return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)


def rgb(name: str, scale: float = 1.0) -> torch.Tensor:
    """An image as a ``(3, H, W)`` float tensor in [0, 1] (grey images repeated), optionally rescaled."""
    img = util.img_as_float32(_load(name))
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    if scale != 1.0:
        img = transform.rescale(img, scale, channel_axis=-1, anti_aliasing=True).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / torch.mean((a.clamp(0, 1) - b) ** 2)))


def make_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    if args.arch == "dncnn":
        from deepinv.models import DnCNN

        from daskrecon.models import BUNDLED_DENOISER

        arch = {**BUNDLED_DENOISER, **({"depth": args.depth} if args.depth else {}),
                **({"nf": args.features} if args.features else {})}
        return DnCNN(**arch, pretrained=None), arch
    from deepinv.models import DRUNet

    arch = {"in_channels": 3, "out_channels": 3, "nc": tuple(args.nc), "nb": args.nb}
    return DRUNet(**arch, pretrained=None), {**arch, "nc": list(arch["nc"])}


def denoise(model: torch.nn.Module, arch: str, x: torch.Tensor, sigma) -> torch.Tensor:
    return model(x, sigma) if arch == "drunet" else model(x)


def evaluate(model, arch: str, device, sigmas=(0.05, 0.1, 0.2), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for s in sigmas:
            noisy_psnr, den_psnr = [], []
            for name in HELD_OUT:
                x = rgb(name)[None]
                y = x + s * torch.randn(x.shape, generator=g)
                noisy_psnr.append(psnr(y, x))
                den_psnr.append(psnr(denoise(model, arch, y.to(device), s).float().cpu(), x))
            out[f"sigma={s}"] = {"noisy_psnr": float(np.mean(noisy_psnr)), "denoised_psnr": float(np.mean(den_psnr))}
    return out


def demo_sweep(model, arch: str, device, iterations: int = 60) -> list[dict]:
    """The demo's problem with plain-torch RED, PnP and HQS: PSNR after each iteration, per setting."""
    from deepinv.utils import TensorList

    from daskrecon.demo import demo_problem

    x_true, ops, y = demo_problem(256, 0.05)
    import deepinv as dinv

    x_true = x_true.to(device)
    # The same blurs without their noise models (whose generators stay on the CPU): y is drawn already.
    ops = [dinv.physics.Blur(filter=op.filter.detach(), padding="circular", device=device) for op in ops]
    y = TensorList([t.to(device) for t in y])
    best_meas = max(psnr(y[i], x_true) for i in range(len(ops)))
    # deepinv's own data term: L2's gradient on the stack, and its prox (HQS's data step,
    # argmin_u ½Σ‖Aᵢu − yᵢ‖² + ‖u − v‖²/(2γ)) by deepinv's conjugate gradient.
    physics = dinv.physics.StackedLinearPhysics(ops)
    physics.max_iter, physics.tol = 100, 1e-7  # deepinv's default tol (1e-4) stops short at large γ
    fid = dinv.optim.L2()

    def grad(x):
        return fid.grad(x, y, physics)

    def prox(v, gamma):
        with warnings.catch_warnings():  # it concerns back-propagation through the solve: none here
            warnings.filterwarnings("ignore", message=".*least_squares_implicit_backward")
            return fid.prox(v, y, physics, gamma=gamma)

    x0 = physics.A_adjoint(y) / len(ops)
    grid = ([("red", {"tau": t, "lam": lam, "sigma": s}) for t, lam, s in
             itertools.product([0.3, 0.5, 1.0], [0.1, 0.3, 0.5, 1.0], [0.02, 0.035, 0.05, 0.08])]
            + [("pnp", {"tau": t, "sigma": s}) for t, s in itertools.product([0.3, 0.6, 1.0], [0.02, 0.035, 0.05, 0.08])]
            + [("hqs", {"gamma": g, "sigma": s}) for g, s in itertools.product([0.5, 2.0, 8.0], [0.02, 0.035, 0.05, 0.08])])
    rows = []
    with torch.no_grad():
        for algo, kw in grid:
            x, hist = x0.clone(), []
            for _ in range(iterations):
                if algo == "red":
                    x = x - kw["tau"] * (grad(x) + kw["lam"] * (x - denoise(model, arch, x, kw["sigma"])))
                elif algo == "pnp":
                    x = denoise(model, arch, x - kw["tau"] * grad(x), kw["sigma"])
                else:
                    x = denoise(model, arch, prox(x, kw["gamma"]), kw["sigma"])
                hist.append(psnr(x.float(), x_true))
            k = int(np.argmax(hist))
            rows.append({"algorithm": algo, **kw, "psnr_final": hist[-1], "psnr_best": hist[k], "best_iteration": k + 1,
                         "gain_final_db": hist[-1] - best_meas, "psnr_at": {n: hist[n - 1] for n in (10, 20, 30, 60)
                                                                            if n <= iterations}})
    rows.sort(key=lambda r: -r["psnr_final"])
    for r in rows[:6]:
        print(f"  {r['algorithm']} {r}", flush=True)
    return [{"best_measurement_psnr": best_meas}] + rows


def sample_batch(images: list[torch.Tensor], batch: int, patch: int, gen: torch.Generator) -> torch.Tensor:
    """Random crops with flips, 90° rotations and channel permutations, on the images' device."""
    out = []
    for _ in range(batch):
        img = images[int(torch.randint(len(images), (), generator=gen))]
        i = int(torch.randint(img.shape[1] - patch + 1, (), generator=gen))
        j = int(torch.randint(img.shape[2] - patch + 1, (), generator=gen))
        p = img[:, i:i + patch, j:j + patch]
        p = torch.rot90(p, int(torch.randint(4, (), generator=gen)), (1, 2))
        if torch.rand((), generator=gen) < 0.5:
            p = p.flip(-1)
        out.append(p[torch.randperm(3, generator=gen)])
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=["dncnn", "drunet"], default="dncnn")
    p.add_argument("--steps", type=int, default=600, help="training steps (ignored with --minutes)")
    p.add_argument("--minutes", type=float, default=None, help="train for this long (cosine schedule on time)")
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--patch", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None,
                   help="weights file (default: the bundled one of --arch, daskrecon/data/<arch>_small.pt)")
    p.add_argument("--depth", type=int, default=None, help="DnCNN; default: the bundled denoiser's")
    p.add_argument("--features", type=int, default=None, help="DnCNN; default: the bundled denoiser's")
    p.add_argument("--nc", type=int, nargs=4, default=[32, 64, 128, 256], help="DRUNet: channels per scale")
    p.add_argument("--nb", type=int, default=2, help="DRUNet: residual blocks per scale")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    p.add_argument("--extra-images", action=argparse.BooleanOptionalAction, default=True,
                   help="also train on matplotlib's and scikit-learn's sample images")
    p.add_argument("--more-images", action=argparse.BooleanOptionalAction, default=False,
                   help="also train on sporco's five test images (pip install --no-deps sporco; not in the shipped "
                        "weights' recipe)")
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--bf16", action="store_true", help="forward and backward under bf16 autocast (fp32 weights)")
    p.add_argument("--init", default=None, help="start from these weights (a state dict file)")
    p.add_argument("--image-cache", default=None,
                   help="an .npz of the raw images (written if missing): the same data where a library is absent")
    p.add_argument("--demo-sweep", action="store_true", help="then tune RED/PnP/HQS on the demo's problem")
    p.add_argument("--sweep-iterations", type=int, default=60)
    args = p.parse_args()
    if args.out is None:
        args.out = str(Path(__file__).parents[1] / "daskrecon" / "data" / f"{args.arch}_small.pt")
    device = torch.device(args.device)

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)  # crops, on the CPU
    noise_gen = torch.Generator(device).manual_seed(0)  # noise, where the batch is
    names = SKIMAGE + (EXTRA if args.extra_images else []) + (MORE if args.more_images else [])
    if args.image_cache and Path(args.image_cache).is_file():
        with np.load(args.image_cache) as cached:
            _CACHE.update({k: cached[k] for k in cached.files})
    elif args.image_cache:
        np.savez_compressed(args.image_cache, **{n: _load(n) for n in names + HELD_OUT})
    images = [rgb(n, s).to(device) for n in names for s in args.scales]
    images = [im for im in images if min(im.shape[1:]) >= args.patch]
    model, arch = make_model(args)
    if args.init:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    budget = None if args.minutes is None else 60 * args.minutes
    print(f"{args.arch} {arch}: {sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(images)} training images on {device}", flush=True)
    t0, step, curve = time.time(), 0, []
    while (step < args.steps) if budget is None else (time.time() - t0 < budget):
        frac = step / args.steps if budget is None else (time.time() - t0) / budget
        for group in opt.param_groups:
            group["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * min(frac, 1.0)))
        x = sample_batch(images, args.batch, args.patch, gen)
        sigma = 0.2 * torch.rand(x.shape[0], 1, 1, 1, generator=noise_gen, device=device)
        noise = torch.randn(x.shape, generator=noise_gen, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = denoise(model, args.arch, x + sigma * noise, sigma)
        loss = torch.nn.functional.mse_loss(out.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0:
            curve.append({"step": step, "seconds": time.time() - t0, "loss": loss.item()})
            print(f"step {step:6d}  loss {loss.item():.5f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{time.time() - t0:.0f} s", flush=True)
        step += 1
    seconds = time.time() - t0
    model.eval()
    state = {k: v.detach().to("cpu", getattr(torch, args.save_dtype) if v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}
    torch.save(state, args.out)
    # Evaluate the weights as they are stored (a float16 file is read back into a float32 model).
    model.load_state_dict(state)
    record = {"architecture": arch, "arch": args.arch, "steps": step, "train_seconds": seconds, "bf16": args.bf16,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "batch": args.batch, "patch": args.patch, "lr": args.lr, "scales": args.scales,
              "saved_dtype": args.save_dtype, "init": args.init, "train_images": names, "held_out": HELD_OUT, "loss_curve": curve}
    json_path = Path(args.out).with_suffix(".json")
    record["held_out_psnr"] = evaluate(model, args.arch, device)
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["held_out_psnr"], indent=2), flush=True)
    if args.demo_sweep:
        record["demo_sweep"] = demo_sweep(model, args.arch, device, args.sweep_iterations)
        json_path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
