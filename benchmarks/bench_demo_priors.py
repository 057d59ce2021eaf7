"""The demo's problem: which algorithm and prior give the best reconstruction, daskrecon against plain deepinv.

The demo (``daskrecon demo``): scikit-image's astronaut at ``--size``², three circular Gaussian blurs,
Gaussian noise σ 0.05, a bundled denoiser. In one run, for each bundled 2-D denoiser (``--denoisers``:
the small DRUNet, the demo's, tiles overlapping by 32; the DnCNN, exact with an overlap of 8):

* daskrecon (2 workers): RED (the demo's settings), PnP, FISTA, HQS and ADMM, each at a step (and,
  for the non-blind DRUNet, a denoiser σ) swept here, ``--iterations`` iterations, the PSNR after
  each (the best iteration is reported too);
* plain deepinv, one process, the same problem on ``StackedLinearPhysics`` with ``L2`` and the same
  denoiser: PnP (proximal gradient, the same step and iterations), RED (gradient descent on ``L2`` +
  deepinv's ``RED`` prior, the demo's settings) and, for the DRUNet, deepinv's own ``DPIR`` (its
  8-iteration σ schedule);
* for the DRUNet, schedules (a value per iteration): DPIR's own on daskrecon's HQS, and ADMM with
  σ decreasing (``daskrecon.demo.demo_schedule``; the demo's is the first of ``ADMM_SCHEDULES``),
  plain and averaged over the 8 flips and 90° rotations (deepinv's ``EquivariantDenoiser``, the demo's);
* RED at the demo's settings for ``--long`` iterations (where it levels off), and at noise σ
  ``--low-noise``;
* once: a TV prior (``TVPrior``'s prox in proximal gradient, ``λ`` swept) and the oracle Wiener
  filter, the linear reconstruction that knows the true image's power spectrum
  (``x̂ = Σ Hᵢ* Yᵢ / (Σ |Hᵢ|² + N σ² / |X|²)``, per frequency) — a bound no linear method reaches and
  the yardstick for what a prior adds — at both noise levels.

Prints a table (PSNR, gain over the best measurement) and writes benchmarks/results/demo_priors.json.

    python benchmarks/bench_demo_priors.py [--size 256] [--iterations 30] [--denoisers drunet,dncnn]

``--demo-only`` (the demo's default, ``--size 512``: the astronaut at its own resolution) runs the
demo's scheme as ``daskrecon demo`` does — ADMM with the σ schedule and the DRUNet, plain and averaged
over the 8 flips and rotations (``daskrecon.models.FlipRotateAverage``), its tiles in the demo's
precision — against plain deepinv's ``DPIR`` and PnP with the same denoiser, the TV prior and the oracle
Wiener filter; writes benchmarks/results/demo_priors_<size>.json.

    python benchmarks/bench_demo_priors.py --demo-only --size 512
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402

#: ADMM with a decreasing σ: (iterations, first σ, last σ, λ) of ``daskrecon.demo.demo_schedule`` (the demo's
#: first), among the best three of the plain-torch sweep of 54 in ``bench_demo_schedules.py``.
ADMM_SCHEDULES = [(5, 0.2, 0.08, 1.0), (4, 0.15, 0.08, 0.7)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--long", type=int, default=150)
    p.add_argument("--low-noise", type=float, default=0.02)
    p.add_argument("--denoisers", default="drunet,dncnn")
    p.add_argument("--demo-only", action="store_true", help="the demo against deepinv's DPIR, PnP, TV and Wiener")
    args = p.parse_args()
    if args.demo_only:
        return demo_only(args)

    import deepinv as dinv
    import torch

    import daskrecon as dr
    from daskrecon.demo import demo_problem, demo_schedule
    from daskrecon.engine.loop import psnr
    from daskrecon.models import bundled_denoiser, bundled_drunet


    x_true, ops, y = demo_problem(args.size)
    x_low, ops_low, y_low = demo_problem(args.size, noise=args.low_noise)
    best_meas = max(psnr(y[i], x_true) for i in range(len(y)))
    best_low = max(psnr(y_low[i], x_low) for i in range(len(y_low)))
    n = args.iterations
    rows = []
    bundled = {"drunet": (bundled_drunet, 32, "bundled DRUNet"), "dncnn": (bundled_denoiser, 8, "bundled DnCNN")}

    def row(name, history_psnr, seconds, reference=None, denoiser=None, **settings):
        ref = best_meas if reference is None else reference
        k = max(range(len(history_psnr)), key=lambda i: history_psnr[i])
        rows.append({"variant": name, "denoiser": denoiser, "settings": settings, "psnr_final": history_psnr[-1],
                     "psnr_best": history_psnr[k], "best_iteration": k + 1, "seconds": seconds,
                     "gain_final_db": history_psnr[-1] - ref})
        print(f"{name:34s} {denoiser or '':14s} {settings}  final {history_psnr[-1]:.2f} dB "
              f"(+{history_psnr[-1] - ref:.2f}), best {history_psnr[k]:.2f} at {k + 1}, {seconds:.1f} s", flush=True)

    torch.set_num_threads(2)
    physics = dinv.physics.StackedLinearPhysics(ops)
    fid = dinv.optim.L2()
    x0 = physics.A_adjoint(y) / len(ops)
    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx:
        dphys, dphys_low = dr.distribute(ops, ctx), dr.distribute(ops_low, ctx)
        for name in args.denoisers.split(","):
            make, overlap, label = bundled[name]
            dden = dr.distribute(make(), ctx, patch_size=max(32, args.size // 2), overlap=overlap)
            # The DnCNN is blind (σ ignored); the DRUNet's RED at σ 0.08 is as good at 30 iterations as at 0.05
            # and drifts far less after its peak (the 150-iteration row).
            sigma_split = 0.08 if name == "drunet" else 0.05
            demo_kw = dict(step_size=0.5, red_weight=0.5, sigma_denoiser=0.08 if name == "drunet" else 0.05)
            sweeps = [("red", dict(step_size=0.3, red_weight=0.3, sigma_denoiser=0.05)),
                      ("red", dict(step_size=0.5, red_weight=0.5, sigma_denoiser=0.05)),
                      *([("red", demo_kw)] if name == "drunet" else []),
                      ("pnp", dict(step_size=0.3, sigma_denoiser=0.05)), ("pnp", dict(step_size=0.6, sigma_denoiser=0.05)),
                      ("fista", dict(step_size=0.3, sigma_denoiser=0.05)),
                      ("hqs", dict(step_size=2.0, sigma_denoiser=sigma_split)),
                      ("hqs", dict(step_size=8.0, sigma_denoiser=sigma_split)),
                      ("admm", dict(step_size=2.0, sigma_denoiser=sigma_split)),
                      ("admm", dict(step_size=8.0, sigma_denoiser=sigma_split))]
            for algorithm, kw in sweeps:
                t0 = time.perf_counter()
                _, hist = dr.reconstruct(dphys, y, dden, algorithm=algorithm, n_iter=n, x_true=x_true, progress=False,
                                         return_history=True, **kw)
                row(f"daskrecon {algorithm}", [h["psnr"] for h in hist], time.perf_counter() - t0, denoiser=label, **kw)
            t0 = time.perf_counter()
            _, hist = dr.reconstruct(dphys, y, dden, algorithm="red", n_iter=args.long, x_true=x_true, progress=False,
                                     return_history=True, **demo_kw)
            row(f"daskrecon red, {args.long} iterations", [h["psnr"] for h in hist], time.perf_counter() - t0,
                denoiser=label, **demo_kw)
            for kw in (demo_kw, dict(step_size=0.5, red_weight=0.2, sigma_denoiser=0.02)):
                t0 = time.perf_counter()
                _, hist = dr.reconstruct(dphys_low, y_low, dden, algorithm="red", n_iter=args.long, x_true=x_low,
                                         progress=False, return_history=True, **kw)
                row(f"daskrecon red, noise {args.low_noise}", [h["psnr"] for h in hist], time.perf_counter() - t0,
                    reference=best_low, denoiser=label, **kw)

            # plain deepinv, one process: the same problem and denoiser
            den = make()
            for tau in (0.3, 0.6):
                x, hist = x0.clone(), []
                t0 = time.perf_counter()
                with torch.no_grad():
                    for _ in range(n):
                        x = den(x - tau * fid.grad(x, y, physics), 0.05)
                        hist.append(psnr(x, x_true))
                row("deepinv PnP (plain, one process)", hist, time.perf_counter() - t0, denoiser=label,
                    step_size=tau, sigma_denoiser=0.05)
            red = dinv.optim.prior.RED(den)
            x, hist = x0.clone(), []
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(n):
                    x = x - 0.5 * (fid.grad(x, y, physics) + 0.5 * red.grad(x, sigma_denoiser=demo_kw["sigma_denoiser"]))
                    hist.append(psnr(x, x_true))
            row("deepinv RED (plain, one process)", hist, time.perf_counter() - t0, denoiser=label, **demo_kw)
            if name == "drunet":
                t0 = time.perf_counter()
                with torch.no_grad():
                    x = dinv.optim.DPIR(sigma=0.05, denoiser=den)(y, physics)
                row("deepinv DPIR (its own schedule, 8 iterations)", [psnr(x, x_true)], time.perf_counter() - t0,
                    denoiser=label)
                # Schedules (one value per iteration): DPIR's own on daskrecon's HQS, and ADMM with σ decreasing
                # to above the noise level and its step γ_k = (σ_k / σ_noise)² / λ following it, plain and with
                # the denoiser averaged over the 8 flips and 90° rotations (deepinv's EquivariantDenoiser).
                sig, steps, n_dpir = dinv.optim.dpir.get_DPIR_params(0.05)
                t0 = time.perf_counter()
                _, hist = dr.reconstruct(dphys, y, dden, algorithm="hqs", n_iter=n_dpir, sigma_denoiser=sig,
                                         step_size=steps, x_true=x_true, progress=False, return_history=True)
                row("daskrecon hqs, DPIR's schedule", [h["psnr"] for h in hist], time.perf_counter() - t0,
                    denoiser=label, schedule="deepinv.optim.dpir.get_DPIR_params(0.05)")
                eq = dr.distribute(dinv.models.EquivariantDenoiser(make(), random=False), ctx,
                                   patch_size=max(32, args.size // 2), overlap=overlap)
                for n_admm, s0, s1, lam in ADMM_SCHEDULES:
                    kw = demo_schedule(n_admm, 0.05, s0, s1, lam)
                    for tag, d in (("", dden), (", 8 flips/rotations averaged", eq)):
                        t0 = time.perf_counter()
                        _, hist = dr.reconstruct(dphys, y, d, algorithm="admm", n_iter=n_admm, x_true=x_true,
                                                 progress=False, return_history=True, **kw)
                        row(f"daskrecon admm, σ schedule{tag}", [h["psnr"] for h in hist], time.perf_counter() - t0,
                            denoiser=label, n_iter=n_admm, sigma_from=s0, sigma_to=s1, lam=lam)

    row("oracle Wiener (knows |X|², linear)", [psnr(wiener(ops, y, x_true), x_true)], 0.0)
    row(f"oracle Wiener, noise {args.low_noise}", [psnr(wiener(ops_low, y_low, x_low), x_low)], 0.0, reference=best_low)
    tv = dinv.optim.TVPrior(n_it_max=50)
    tau = 1.0 / 3  # 1 / ‖Σ AᵢᵀAᵢ‖ for three normalized blurs
    for lam in (0.01, 0.02, 0.05):
        x, hist = x0.clone(), []
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(n * 3):  # TV's proximal gradient converges slower: three times the iterations
                x = tv.prox(x - tau * fid.grad(x, y, physics), gamma=tau * lam)
                hist.append(psnr(x, x_true))
        row("deepinv TV prior", hist, time.perf_counter() - t0, step_size=tau, tv_weight=lam)
    physics_low = dinv.physics.StackedLinearPhysics(ops_low)
    x, hist = physics_low.A_adjoint(y_low) / len(ops_low), []
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n * 3):
            x = tv.prox(x - tau * fid.grad(x, y_low, physics_low), gamma=tau * 0.005)
            hist.append(psnr(x, x_low))
    row(f"deepinv TV prior, noise {args.low_noise}", hist, time.perf_counter() - t0, reference=best_low,
        step_size=tau, tv_weight=0.005)

    write("demo_priors", {"machine": machine(), "args": vars(args), "best_measurement_psnr": best_meas,
                          "best_measurement_psnr_low_noise": best_low, "results": rows})


def demo_only(args) -> None:
    """The demo's scheme on the cluster against plain deepinv on the same problem (see the module)."""
    import deepinv as dinv
    import torch

    import daskrecon as dr
    from daskrecon.demo import demo_problem, demo_schedule
    from daskrecon.engine.loop import psnr
    from daskrecon.models import FlipRotateAverage, bundled_drunet
    from daskrecon.tasks.precision import supported

    torch.set_num_threads(2)
    x_true, ops, y = demo_problem(args.size)
    best = max(psnr(y[i], x_true) for i in range(len(y)))
    precision = "bf16" if "bf16" in supported(torch.device("cpu")) else "fp32"  # as the demo chooses
    rows = []

    def row(name, history, seconds, **settings):
        rows.append({"variant": name, "settings": settings, "psnr_final": history[-1], "psnr_best": max(history),
                     "best_iteration": history.index(max(history)) + 1, "seconds": seconds,
                     "gain_final_db": history[-1] - best})
        print(f"{name:52s} final {history[-1]:.2f} dB ({history[-1] - best:+.2f}), best {max(history):.2f} at "
              f"{history.index(max(history)) + 1}, {seconds:.1f} s", flush=True)

    kw = demo_schedule(5, 0.05)
    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx:
        dphys = dr.distribute(ops, ctx)
        for tag, model in (("", bundled_drunet()), (", 8 flips/rotations averaged (the demo)",
                                                     FlipRotateAverage(bundled_drunet()))):
            for p in dict.fromkeys(["fp32", precision]):
                den = dr.distribute(model, ctx, patch_size=max(32, args.size // 2), overlap=32, precision=p)
                t0 = time.perf_counter()
                _, hist = dr.reconstruct(dphys, y, den, algorithm="admm", n_iter=5, x_true=x_true, progress=False,
                                         return_history=True, **kw)
                row(f"daskrecon admm, σ schedule{tag}, {p}", [h["psnr"] for h in hist], time.perf_counter() - t0,
                    precision=p)
    physics = dinv.physics.StackedLinearPhysics(ops)
    fid = dinv.optim.data_fidelity.L2()
    x0 = physics.A_adjoint(y) / len(ops)
    den = bundled_drunet()
    t0 = time.perf_counter()
    with torch.no_grad():
        x = dinv.optim.DPIR(sigma=0.05, denoiser=den)(y, physics)
    row("deepinv DPIR (its own schedule, 8 iterations), plain", [psnr(x, x_true)], time.perf_counter() - t0)
    x, hist = x0.clone(), []
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.iterations):
            x = den(x - 0.6 * fid.grad(x, y, physics), 0.05)
            hist.append(psnr(x, x_true))
    row("deepinv PnP (plain, one process)", hist, time.perf_counter() - t0, step_size=0.6, sigma_denoiser=0.05)
    tv = dinv.optim.TVPrior(n_it_max=50)
    for lam in (0.01, 0.02):
        x, hist = x0.clone(), []
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.iterations * 3):
                x = tv.prox(x - fid.grad(x, y, physics) / 3, gamma=lam / 3)
                hist.append(psnr(x, x_true))
        row("deepinv TV prior", hist, time.perf_counter() - t0, step_size=1 / 3, tv_weight=lam)
    row("oracle Wiener (knows |X|², linear)", [psnr(wiener(ops, y, x_true), x_true)], 0.0)
    write(f"demo_priors_{args.size}", {"machine": machine(), "args": vars(args), "best_measurement_psnr": best,
                                       "results": rows})


def wiener(ops, y, x_true):
    """The oracle Wiener filter: the linear reconstruction that knows the true image's power spectrum."""
    import torch
    from deepinv.physics.functional.convolution import filter_fft_2d

    shape = x_true.shape[-2:]
    hs = [filter_fft_2d(op.filter, shape).to(torch.complex64) for op in ops]
    num = sum(h.conj() * torch.fft.rfft2(yi) for h, yi in zip(hs, y))
    den = sum(h.abs() ** 2 for h in hs)
    sigma = ops[0].noise_model.sigma.item() if torch.is_tensor(ops[0].noise_model.sigma) else ops[0].noise_model.sigma
    power = torch.fft.rfft2(x_true).abs() ** 2
    return torch.fft.irfft2(num / (den + shape.numel() * sigma ** 2 / power.clamp_min(1e-12)), s=shape)


if __name__ == "__main__":
    main()
