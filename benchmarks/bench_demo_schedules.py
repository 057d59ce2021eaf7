"""Which ADMM schedule for the demo: a sweep of σ schedules in plain torch, on the demo's problem.

The demo (``daskrecon demo``) runs ADMM whose denoiser σ decreases geometrically over a few iterations
with the step following it, ``γ_k = (σ_k / 0.05)² / λ`` (``daskrecon.demo.demo_schedule``). This
sweeps the schedule's length, its first and last σ and λ — 3 × 3 × 3 × 2 = 54 schedules — with the
bundled DRUNet on the whole image, the data term's prox in closed form (the ADMM of
``scripts/finetune_unrolled.py``, tested against deepinv's ``ADMM``), and prints the best by the PSNR
of the last iteration. The chosen schedules are confirmed on the cluster, tiled, by
``benchmarks/bench_demo_priors.py``. Writes benchmarks/results/demo_schedules.json.

    python benchmarks/bench_demo_schedules.py
    python benchmarks/bench_demo_schedules.py --weights /tmp/a.pt   # the demo's schedule only, with other
                                                                     # DRUNet weights against the bundled ones

With ``--weights`` (state dicts of the bundled DRUNet's architecture, e.g. from
``scripts/train_denoiser.py --init``), only the demo's schedule runs, plain and averaged over the 8
flips and rotations as the demo does, with the bundled weights and each file; the PSNR per iteration
goes to benchmarks/results/demo_schedules_weights.json (the sweep's file is kept).

With ``--random N``, a random search instead (seeded): N schedules of 4 to ``--max-iterations``
iterations, σ_k / 0.05 geometric from U(2.5, 8) to U(0.8, 2.2) and the data term's weight geometric
between two draws of U(0.3, 2), the demo's schedule first for reference; ``--size`` and ``--bf16``
(the network under bf16 autocast, as the demo's tiles) as asked; the best ten by the last
iteration are printed, everything goes to benchmarks/results/demo_schedules_random_<size>.json.

    python benchmarks/bench_demo_schedules.py --random 200 --max-iterations 12             # 256²
    python benchmarks/bench_demo_schedules.py --random 105 --max-iterations 8 --size 512 --bf16
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from _common import machine, write  # noqa: E402


def main() -> None:
    import torch
    from finetune_unrolled import blur_spectra, unrolled_admm

    from daskrecon.demo import demo_problem, demo_schedule
    from daskrecon.engine.loop import psnr
    from daskrecon.models import bundled_drunet

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+", default=None, help="DRUNet state dicts to compare with the bundled one")
    p.add_argument("--random", type=int, default=0, help="a seeded random search of this many schedules")
    p.add_argument("--max-iterations", type=int, default=12)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.random:
        return random_search(args)

    torch.set_num_threads(2)
    x, ops, y = demo_problem(256)
    ys = torch.stack([y[i] for i in range(len(ops))], 1)
    spectra = blur_spectra([op.filter for op in ops], tuple(x.shape[-2:]))[None]
    model = bundled_drunet()
    best_meas = max(psnr(y[i], x) for i in range(len(ops)))
    if args.weights:
        import deepinv as dinv

        relative = [s / 0.05 for s in demo_schedule(5, 0.05)["sigma_denoiser"]]
        rows = []
        for weights in ["bundled", *args.weights]:
            model = bundled_drunet()
            if weights != "bundled":
                model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            model.eval()
            for averaged in (False, True):
                den = dinv.models.EquivariantDenoiser(model, random=False) if averaged else model
                with torch.no_grad():  # σ as a float: the averaged batch of 8 takes one σ for all
                    xs = unrolled_admm(den, torch.fft.fft2(ys), spectra, 0.05, ys.mean(1), relative, 1.0)
                values = [psnr(v, x) for v in xs]
                rows.append({"weights": weights, "averaged": averaged, "psnr": values})
                print(f"{weights} {'averaged' if averaged else 'plain'}: " + " ".join(f"{v:.3f}" for v in values),
                      flush=True)
        write("demo_schedules_weights", {"machine": machine(), "best_measurement_psnr": best_meas, "results": rows})
        return
    rows = []
    for n, s0, s1, lam in itertools.product((4, 5, 6), (0.15, 0.2, 0.3), (0.05, 0.06, 0.08), (0.7, 1.0)):
        relative = [s / 0.05 for s in demo_schedule(n, 0.05, s0, s1, lam)["sigma_denoiser"]]
        t0 = time.perf_counter()
        with torch.no_grad():
            xs = unrolled_admm(model, torch.fft.fft2(ys), spectra, torch.full((1, 1, 1, 1), 0.05), ys.mean(1),
                               relative, lam)
        values = [psnr(v, x) for v in xs]
        rows.append({"iterations": n, "sigma_from": s0, "sigma_to": s1, "lam": lam, "psnr": values,
                     "psnr_final": values[-1], "seconds": time.perf_counter() - t0})
        print(f"{n} iterations, σ {s0} → {s1}, λ {lam}: " + " ".join(f"{v:.2f}" for v in values), flush=True)
    rows.sort(key=lambda r: -r["psnr_final"])
    print(f"best measurement {best_meas:.2f} dB; the best five by the last iteration:")
    for r in rows[:5]:
        print(f"  {r['iterations']} iterations, σ {r['sigma_from']} → {r['sigma_to']}, λ {r['lam']}: "
              f"{r['psnr_final']:.2f} dB (+{r['psnr_final'] - best_meas:.2f})")
    write("demo_schedules", {"machine": machine(), "best_measurement_psnr": best_meas, "results": rows})


def random_search(args) -> None:
    """ADMM on the whole image with a σ and a weight per iteration, schedules drawn at random (see the module)."""
    import contextlib
    import random

    import torch
    from finetune_unrolled import blur_spectra, unrolled_admm

    from daskrecon.demo import demo_problem, demo_schedule
    from daskrecon.engine.loop import psnr
    from daskrecon.models import bundled_drunet

    torch.set_num_threads(2)
    x, ops, y = demo_problem(args.size)
    spectra = blur_spectra([op.filter for op in ops], tuple(x.shape[-2:]))[None]
    y_fft = torch.fft.fft2(torch.stack([y[i] for i in range(len(ops))], 1))
    x0 = sum(op.A_adjoint(y[i]) for i, op in enumerate(ops)) / len(ops)
    model = bundled_drunet().eval()
    best_meas = max(psnr(y[i], x) for i in range(len(ops)))

    def denoise(v, sigma):  # the demo's tiles: the network under bf16 autocast when asked
        with torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext():
            return model(v, sigma)

    def admm(relative: list[float], weights: list[float]) -> list[float]:
        with torch.no_grad():
            return [psnr(v, x) for v in unrolled_admm(denoise, y_fft, spectra, 0.05, x0, relative, weights)]

    demo = [s / 0.05 for s in demo_schedule(5, 0.05)["sigma_denoiser"]]
    reference = admm(demo, [1.0] * 5)
    print("the demo's schedule: " + " ".join(f"{v:.3f}" for v in reference), flush=True)
    rng, rows = random.Random(args.seed), []
    for _ in range(args.random):
        n = rng.randint(4, args.max_iterations)
        s0, s1, w0, w1 = rng.uniform(2.5, 8), rng.uniform(0.8, 2.2), rng.uniform(0.3, 2.0), rng.uniform(0.3, 2.0)
        relative = [s0 * (s1 / s0) ** (k / (n - 1)) for k in range(n)]
        weights = [w0 * (w1 / w0) ** (k / (n - 1)) for k in range(n)]
        values = admm(relative, weights)
        rows.append({"iterations": n, "relative_sigma": [s0, s1], "weight": [w0, w1], "psnr": values,
                     "psnr_final": values[-1], "psnr_best": max(values)})
    rows.sort(key=lambda r: -r["psnr_final"])
    print(f"best measurement {best_meas:.2f} dB; {len(rows)} schedules; the best ten by the last iteration:")
    for r in rows[:10]:
        print(f"  {r['iterations']} iterations, σ/0.05 {r['relative_sigma'][0]:.2f} → {r['relative_sigma'][1]:.2f}, "
              f"weight {r['weight'][0]:.2f} → {r['weight'][1]:.2f}: {r['psnr_final']:.3f} dB (best {r['psnr_best']:.3f})")
    print(f"the best at any iteration: {max(r['psnr_best'] for r in rows):.3f} dB")
    write(f"demo_schedules_random_{args.size}", {"machine": machine(), "args": vars(args), "best_measurement_psnr": best_meas,
                                                 "demo_schedule_psnr": reference, "results": rows})


if __name__ == "__main__":
    main()
