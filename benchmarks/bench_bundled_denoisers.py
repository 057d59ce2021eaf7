"""The bundled 2-D denoisers on these CPUs: what a tile costs, how close the DRUNet tiles, how RED behaves with it.

In one run:

* **cost** — one 144² RGB tile, one thread, fp32 and bf16 autocast: the bundled DnCNN, the bundled
  small DRUNet and deepinv's full-size DRUNet (random weights: the cost does not depend on them);
  median of ``--repeats`` after a warm-up, and each one's ratio to the small DRUNet;
* **tiling** — the bundled DRUNet through ``dr.distribute(..., patch_size=128, overlap=O)`` on 2
  workers, on the demo's astronaut 256² with noise σ 0.05, against the whole-image call: largest and
  mean difference and the PSNR, for ``O`` in 8, 16, 32 (the demo's), 48;
* **red** — plain deepinv RED (gradient descent on ``L2`` + ``RED`` prior, τ 0.5, λ 0.5) with the
  bundled DRUNet on the demo's problem for ``--iterations``, at denoiser σ 0.05 and 0.08 (the
  demo's): the PSNR at 30, at the best iteration and at the last — how far it drifts after its peak.

Writes benchmarks/results/bundled_denoisers.json.

    python benchmarks/bench_bundled_denoisers.py [--repeats 5] [--iterations 150]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, timeit, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iterations", type=int, default=150)
    args = p.parse_args()

    import deepinv as dinv
    import torch
    from deepinv.models import DRUNet

    import daskrecon as dr
    from daskrecon.demo import demo_image, demo_problem
    from daskrecon.engine.loop import psnr
    from daskrecon.models import bundled_denoiser, bundled_drunet

    torch.set_num_threads(1)
    tile = torch.rand(1, 3, 144, 144, generator=torch.Generator().manual_seed(0))
    models = {"bundled DnCNN": (bundled_denoiser(), False), "bundled DRUNet": (bundled_drunet(), True),
              "deepinv DRUNet, full size": (DRUNet(pretrained=None).eval(), True)}
    cost = {}
    for name, (model, takes_sigma) in models.items():
        cost[name] = {"parameters": sum(q.numel() for q in model.parameters())}
        for precision in ("fp32", "bf16"):
            def call():
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    return model(tile, 0.05) if takes_sigma else model(tile)
            cost[name][f"{precision}_s"] = timeit(call, args.repeats)["median_s"]
    for name, c in cost.items():
        c["fp32_vs_bundled_drunet"] = c["fp32_s"] / cost["bundled DRUNet"]["fp32_s"]
        print(f"{name:28s} {c['parameters'] / 1e6:5.2f} M  fp32 {c['fp32_s'] * 1e3:6.0f} ms  "
              f"bf16 {c['bf16_s'] * 1e3:6.0f} ms  ({c['fp32_vs_bundled_drunet']:.1f}x the bundled DRUNet)", flush=True)

    model = bundled_drunet()
    x = demo_image(256)
    y = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(y, 0.05)
    tiling = {"whole_psnr": psnr(whole, x), "overlaps": []}
    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx:
        for overlap in (8, 16, 32, 48):
            tiled = dr.distribute(model, ctx, patch_size=128, overlap=overlap)(y, 0.05).detach()
            diff = (tiled - whole).abs()
            tiling["overlaps"].append({"overlap": overlap, "max_abs_diff": float(diff.max()),
                                       "mean_abs_diff": float(diff.mean()), "psnr": psnr(tiled, x)})
            print(f"overlap {overlap:2d}: max |tiled - whole| {float(diff.max()):.1e}, mean {float(diff.mean()):.1e}, "
                  f"PSNR {psnr(tiled, x):.3f} dB (whole {tiling['whole_psnr']:.3f})", flush=True)

    torch.set_num_threads(2)
    x_true, ops, meas = demo_problem(256)
    physics = dinv.physics.StackedLinearPhysics(ops)
    fid, red = dinv.optim.L2(), dinv.optim.prior.RED(model)
    red_rows = []
    for sigma in (0.05, 0.08):
        xk, hist = physics.A_adjoint(meas) / len(ops), []
        with torch.no_grad():
            for _ in range(args.iterations):
                xk = xk - 0.5 * (fid.grad(xk, meas, physics) + 0.5 * red.grad(xk, sigma_denoiser=sigma))
                hist.append(psnr(xk, x_true))
        k = max(range(len(hist)), key=hist.__getitem__)
        red_rows.append({"sigma_denoiser": sigma, "psnr_30": hist[min(29, len(hist) - 1)], "psnr_best": hist[k],
                         "best_iteration": k + 1, "psnr_last": hist[-1], "iterations": args.iterations})
        print(f"RED, σ {sigma}: {hist[min(29, len(hist) - 1)]:.2f} dB at 30, best {hist[k]:.2f} at {k + 1}, "
              f"{hist[-1]:.2f} at {args.iterations}", flush=True)

    write("bundled_denoisers", {"machine": machine(), "args": vars(args), "cost_per_144_tile": cost,
                                "drunet_tiling": tiling, "drunet_red_drift": red_rows})


if __name__ == "__main__":
    main()
