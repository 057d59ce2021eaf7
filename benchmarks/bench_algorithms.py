"""Iterations and wall time to a target PSNR, per algorithm, on two problems, in one run.

1. Multi-blur (the demo's astronaut at ``--size``², three blurs, noise 0.05, bundled DnCNN):
   daskrecon's PnP, FISTA, HQS and ADMM on 2 workers, and the same PnP / FISTA / HQS loops
   written with plain deepinv objects (``StackedLinearPhysics``, ``L2``, the denoiser) in one
   process, the baseline. Target: daskrecon PnP's PSNR after ``--iterations`` iterations.
2. Tomography (the astronaut at ``--ct-size``², 360 angles held as 12 ``Tomography`` operators of
   30 interleaved angles, noise 5 %): daskrecon's full-gradient PnP, OS-PnP with 4 and 12 subsets
   and SVRG with 4, and plain deepinv PnP and OS-PnP loops. Target: daskrecon PnP's PSNR after
   ``--iterations`` iterations.

Every variant starts from ``Aᵀy / N`` with the step ``1/L`` (``L`` by the power method). For each,
the iterations and seconds to reach the target (time from the call, setup included), and the
ratio of that time to daskrecon PnP's and to plain deepinv PnP's. Writes
``benchmarks/results/algorithms.json`` and the PSNR-against-time plot
``docs/_static/algorithms-psnr-time.png``.

    python benchmarks/bench_algorithms.py
"""

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402


def blur_problem(size):
    from daskrecon.demo import demo_problem

    return demo_problem(size)


def ct_problem(size, n_ops=12, n_angles=360):
    import deepinv as dinv
    import torch

    from daskrecon.demo import demo_image

    x_true = demo_image(size)
    angles = torch.linspace(0, 180, n_angles + 1)[:-1]
    ops = [dinv.physics.Tomography(angles=angles[j::n_ops], img_width=size, circle=False) for j in range(n_ops)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clean = [op.A(x_true) for op in ops]
        scale = 0.05 * float(sum(c.abs().mean() for c in clean) / len(clean))
        y = dinv.utils.TensorList([c + scale * torch.randn(c.shape, generator=g) for c in clean])
    return x_true, ops, y


def psnr(x, ref):
    from daskrecon.engine.loop import psnr as _psnr

    return _psnr(x, ref)


def plain(kind, ops, y, model, x0, x_true, tau, n_iter, n_subsets=None):
    """The same iterations with deepinv's own objects in this process: (seconds, PSNR) per iteration."""
    import deepinv as dinv
    import torch
    from deepinv.optim import L2

    from daskrecon.planning.subsets import partition, subset_at

    stacked = dinv.physics.stack(*ops)
    stacked.set_ls_solver("CG", max_iter=50, tol=1e-5)
    x, z, out = x0.clone(), x0.clone(), []
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(n_iter):
            if kind == "pnp":
                x = model(x - tau * L2().grad(x, y, stacked))
            elif kind == "fista":
                new = model(z - tau * L2().grad(z, y, stacked))
                z = new + (k + 2) / (k + 3) * (new - x)
                x = new
            elif kind == "hqs":
                x = model(L2().prox(x, y, stacked, gamma=tau))
            elif kind == "os-pnp":
                members = partition(len(ops), n_subsets)[subset_at(0, k, n_subsets)]
                g = sum(L2().grad(x, y[i], ops[i]) for i in members)
                x = model(x - tau * len(ops) / len(members) * g)
            out.append((time.perf_counter() - t0, psnr(x, x_true)))
    return out


def daskrecon_run(ctx, ops, y, model, x0, x_true, tau, algorithm, n_iter, patch, **kw):
    import daskrecon as dr

    stamps = []
    t0 = time.perf_counter()
    _, hist = dr.reconstruct(dr.distribute(ops, ctx), y, dr.distribute(model, ctx, patch_size=patch, overlap=8),
                             algorithm=algorithm, n_iter=n_iter, step_size=tau, x0=x0, x_true=x_true,
                             progress=False, return_history=True,
                             callback=lambda k, x: stamps.append(time.perf_counter() - t0), **kw)
    return [(t, h["psnr"]) for t, h in zip(stamps, hist)], hist


def to_target(curve, target):
    """First (iteration, seconds) at the target PSNR, within 0.01 dB (tiled and whole denoisers differ by ~1e-4)."""
    for k, (t, p) in enumerate(curve):
        if p >= target - 0.01:
            return k + 1, t
    return None, None


def study(name, ctx, x_true, ops, y, model, patch, variants, n_iter):
    import deepinv as dinv
    import torch

    # daskrecon gets copies made before deepinv runs them: some deepinv operators stop being picklable
    # once used (compute_norm leaves autograd wrappers in Tomography).
    dr_ops = copy.deepcopy(ops)
    stacked = dinv.physics.stack(*ops)
    with torch.no_grad():
        x0 = sum(op.A_adjoint(t) for op, t in zip(ops, y)) / len(ops)
        L = float(stacked.compute_norm(torch.rand_like(x0), max_iter=200, tol=1e-6, verbose=False))
    tau = 1.0 / L
    curves, extra = {}, {}
    for label, (where, algorithm, iters, kw) in variants.items():
        if where == "plain":
            curves[label] = plain(algorithm, ops, y, model, x0, x_true, tau, iters, kw.get("n_subsets"))
        else:
            curves[label], hist = daskrecon_run(ctx, dr_ops, y, model, x0, x_true, tau, algorithm, iters, patch, **kw)
            if "cg_iterations" in hist[0]:
                extra[label] = {"cg_iterations": [h["cg_iterations"] for h in hist]}
        t, p = curves[label][-1]
        print(f"  {name:5s} {label:30s} {iters:4d} it  {t:7.2f} s  PSNR {p:6.2f} dB", flush=True)
    target = curves["daskrecon pnp"][n_iter - 1][1]
    base_t = to_target(curves["daskrecon pnp"], target)[1]
    plain_t = to_target(curves["deepinv pnp (1 process)"], target)[1]
    rows = {}
    for label, curve in curves.items():
        k, t = to_target(curve, target)
        rows[label] = {"iterations_to_target": k, "seconds_to_target": t, "final_psnr": curve[-1][1],
                       "iterations": len(curve), "seconds": curve[-1][0], "curve": curve, **extra.get(label, {}),
                       "time_to_target_vs_daskrecon_pnp": None if t is None else t / base_t,
                       "time_to_target_vs_deepinv_pnp": None if (t is None or plain_t is None) else t / plain_t}
    print(f"  target {target:.2f} dB (daskrecon PnP after {n_iter} iterations); step 1/L = {tau:.4g}")
    print(f"  {'variant':30s} {'it→target':>9s} {'s→target':>9s} {'÷ dr PnP':>9s} {'÷ deepinv PnP':>14s}")
    for label, r in rows.items():
        k, t = r["iterations_to_target"], r["seconds_to_target"]
        fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        print(f"  {label:30s} {fmt(k, 'd'):>9s} {fmt(t, '.2f'):>9s} {fmt(r['time_to_target_vs_daskrecon_pnp'], '.2f'):>9s}"
              f" {fmt(r['time_to_target_vs_deepinv_pnp'], '.2f'):>14s}")
    return {"target_psnr": target, "step_size": tau, "variants": rows}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (name, res) in zip(axes, results.items()):
        for label, r in res["variants"].items():
            t, p = zip(*r["curve"])
            ax.plot(t, p, marker="o", ms=2.5, lw=1.2, ls="--" if label.startswith("deepinv") else "-", label=label)
        ax.axhline(res["target_psnr"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel("wall-clock time (s)")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(res["title"], fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--ct-size", type=int, default=128)
    p.add_argument("--iterations", type=int, default=20)
    args = p.parse_args()
    import torch

    import daskrecon as dr
    from daskrecon.models import bundled_denoiser

    torch.set_num_threads(1)  # the plain loops: one process, one thread, as each daskrecon worker
    model = bundled_denoiser()
    n = args.iterations
    results = {}
    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0", seed=0) as ctx:
        x_true, ops, y = blur_problem(args.size)
        blur = {
            "daskrecon pnp": ("dr", "pnp", n, {}),
            "daskrecon fista": ("dr", "fista", n, {}),
            "daskrecon hqs": ("dr", "hqs", n, {}),
            "daskrecon admm": ("dr", "admm", n, {}),
            "deepinv pnp (1 process)": ("plain", "pnp", n, {}),
            "deepinv fista (1 process)": ("plain", "fista", n, {}),
            "deepinv hqs (1 process)": ("plain", "hqs", n, {}),
        }
        print(f"multi-blur {args.size}², 3 blurs, bundled DnCNN")
        results["multiblur"] = study("blur", ctx, x_true, ops, y, model, args.size // 2, blur, n)
        results["multiblur"]["title"] = f"{args.size}² astronaut, three blurs"
        x_true, ops, y = ct_problem(args.ct_size)
        ct = {
            "daskrecon pnp": ("dr", "pnp", n, {}),
            "daskrecon os-pnp (4 subsets)": ("dr", "os-pnp", 3 * n, {"n_subsets": 4}),
            "daskrecon os-pnp (12 subsets)": ("dr", "os-pnp", 4 * n, {"n_subsets": 12}),
            "daskrecon svrg (4 subsets)": ("dr", "svrg", 2 * n, {"n_subsets": 4}),
            "deepinv pnp (1 process)": ("plain", "pnp", n, {}),
            "deepinv os-pnp (4 subsets, 1 process)": ("plain", "os-pnp", 3 * n, {"n_subsets": 4}),
        }
        print(f"tomography {args.ct_size}², 360 angles in 12 operators, bundled DnCNN")
        results["tomography"] = study("ct", ctx, x_true, ops, y, model, args.ct_size, ct, n)
        results["tomography"]["title"] = f"{args.ct_size}² CT, 360 angles in 12 operators"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    figure = os.path.join(root, "docs", "_static", "algorithms-psnr-time.png")
    plot(results, figure)
    path = write("algorithms", {"benchmark": "algorithms", "args": vars(args), "machine": machine(), **results})
    print(f"wrote {path} and {figure}")


if __name__ == "__main__":
    main()
