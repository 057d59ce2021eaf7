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
    args = p.parse_args()

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


if __name__ == "__main__":
    main()
