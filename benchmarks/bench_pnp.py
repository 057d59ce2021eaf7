"""PnP, 5 iterations, 3 circular blurs + DnCNN (random weights, patch 256, overlap 20) on 1x3x512x512.

deepinv.distributed (its demo's loop: distributed L2 gradient, then PnP prox with the tiled
denoiser) in one process and under torchrun x2, against ``daskrecon.reconstruct`` on 2 workers,
in one run; then daskrecon with the denoiser's tiles in bf16 (``precision="bf16"``, issue #29)
on the same workload, and — for the accuracy — the demo's problem (the astronaut at 512², three
blurs, the bundled trained DnCNN, RED) reconstructed in fp32 and in bf16, PSNR of each.
Writes benchmarks/results/pnp.json.

    python benchmarks/bench_pnp.py
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, run_deepinv_distributed, table, timeit, write  # noqa: E402
from _pnp_problem import problem  # noqa: E402


def deepinv_distributed(nproc: int, args) -> dict:
    opts = ["--size", str(args.size), "--iterations", str(args.iterations), "--repeats", str(args.repeats)]
    return run_deepinv_distributed("_deepinv_distributed_pnp.py", nproc, opts)


def _time_with_malloc(malloc: str, ops, y, model, x_true, args) -> float:
    """daskrecon's PnP with the workers' glibc settings ``malloc`` ("safe" or "fast")."""
    import torch

    import daskrecon as dr

    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0", malloc=malloc) as ctx:
        dphys = dr.distribute(ops, ctx)
        dden = dr.distribute(model, ctx, patch_size=256, overlap=20)
        run = lambda: dr.reconstruct(dphys, y, dden, n_iter=args.iterations, step_size=0.3,  # noqa: E731
                                     x0=torch.zeros_like(x_true), progress=False)
        run()  # warm-up
        return timeit(run, args.repeats, warmup=0)["median_s"]


def _accuracy(args) -> dict:
    """The demo's problem at 512² with the bundled trained DnCNN: PSNR in fp32 and with the denoiser in bf16."""
    import daskrecon as dr
    from daskrecon.demo import demo_problem
    from daskrecon.models import bundled_denoiser

    x_true, ops, y = demo_problem(512)
    out = {"size": 512, "algorithm": "red", "iterations": 30}
    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx:
        dphys = dr.distribute(ops, ctx)
        dden = dr.distribute(bundled_denoiser(), ctx, patch_size=256, overlap=8)
        for p in ("fp32", "bf16"):
            _, hist = dr.reconstruct(dphys, y, dden, algorithm="red", n_iter=30, step_size=0.3, red_weight=0.3,
                                     x_true=x_true, progress=False, return_history=True, precision=p)
            out[f"psnr_{p}"] = hist[-1]["psnr"]
            if p == "bf16":
                out["probe_rel_error"] = hist[-1]["precision_rel_error"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--malloc-safe", action="store_true",
                   help="also time daskrecon with DistributedContext(malloc='safe')")
    args = p.parse_args()
    import torch

    import daskrecon as dr

    ops, y, model, x_true = problem(args.size)
    res = {"workload": vars(args), "machine": machine()}
    res["deepinv_distributed_1proc"] = deepinv_distributed(1, args)
    res["deepinv_distributed_torchrun2"] = deepinv_distributed(2, args)
    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx:
        dphys = dr.distribute(ops, ctx)
        dden = dr.distribute(model, ctx, patch_size=256, overlap=20)
        dr.reconstruct(dphys, y, dden, n_iter=1, step_size=0.3, x0=torch.zeros_like(x_true), progress=False)  # warm-up
        d = timeit(lambda: dr.reconstruct(dphys, y, dden, n_iter=args.iterations, step_size=0.3,
                                          x0=torch.zeros_like(x_true), progress=False), args.repeats, warmup=0)
        out = d.pop("_out")
        d["checksum_diff_vs_deepinv_1proc"] = abs(float(out.double().sum()) - res["deepinv_distributed_1proc"]["checksum"])
        # Where an iteration's time goes: one gradient pass, one denoiser pass.
        from deepinv.optim import L2

        x = torch.rand_like(x_true)
        dfid = dr.distribute(L2(), ctx)
        d["one_gradient_pass_s"] = timeit(lambda: dfid.grad(x, y, dphys), 3)["median_s"]
        d["one_denoiser_pass_s"] = timeit(lambda: dden(x, 0.05), 3)["median_s"]
        res["daskrecon"] = d
        # The same reconstruction with the denoiser's tiles in bf16 (probed once, in the warm-up).
        run16 = lambda: dr.reconstruct(dphys, y, dden, n_iter=args.iterations, step_size=0.3,  # noqa: E731
                                       x0=torch.zeros_like(x_true), progress=False, precision="bf16")
        run16()
        b = timeit(run16, args.repeats, warmup=0)
        out16 = b.pop("_out")
        b["rel_diff_vs_fp32"] = float((out16 - out).norm() / out.norm())
        d16 = dr.distribute(model, ctx, patch_size=256, overlap=20, precision="bf16")
        d16(x, 0.05)  # the probe
        b["one_denoiser_pass_s"] = timeit(lambda: d16(x, 0.05), 3)["median_s"]
        b["probe"] = d16.precision_report["probe"]
        res["daskrecon_bf16"] = b
    res["accuracy_bundled_denoiser"] = _accuracy(args)
    if args.malloc_safe:
        res["daskrecon_malloc_safe"] = {"median_s": _time_with_malloc("safe", ops, y, model, x_true, args)}
        res["ratio_daskrecon_malloc_safe_vs_best_deepinv_distributed"] = (
            res["daskrecon_malloc_safe"]["median_s"] / min(res["deepinv_distributed_1proc"]["median_s"],
                                                           res["deepinv_distributed_torchrun2"]["median_s"]))
    best = min(res["deepinv_distributed_1proc"]["median_s"], res["deepinv_distributed_torchrun2"]["median_s"])
    res["ratio_daskrecon_vs_best_deepinv_distributed"] = d["median_s"] / best
    res["ratio_daskrecon_bf16_vs_best_deepinv_distributed"] = res["daskrecon_bf16"]["median_s"] / best
    print(f"PnP {args.iterations} iterations, 3 blurs + DnCNN, 1x3x{args.size}^2")
    print(table([("deepinv.distributed (1 process)", res["deepinv_distributed_1proc"]["median_s"]),
                 ("deepinv.distributed (torchrun x2, gloo)", res["deepinv_distributed_torchrun2"]["median_s"]),
                 ("daskrecon reconstruct (2 workers)", d["median_s"]),
                 ("daskrecon reconstruct, denoiser in bf16", res["daskrecon_bf16"]["median_s"])], best))
    print(f"daskrecon / best deepinv.distributed = {res['ratio_daskrecon_vs_best_deepinv_distributed']:.2f}; "
          f"bf16: {res['ratio_daskrecon_bf16_vs_best_deepinv_distributed']:.2f} "
          f"(output vs fp32: relative {res['daskrecon_bf16']['rel_diff_vs_fp32']:.2e})")
    acc = res["accuracy_bundled_denoiser"]
    print(f"bundled DnCNN, astronaut 512², RED {acc['iterations']} iterations: PSNR fp32 {acc['psnr_fp32']:.2f} dB, "
          f"bf16 {acc['psnr_bf16']:.2f} dB (difference {acc['psnr_bf16'] - acc['psnr_fp32']:+.3f} dB)")
    print(f"one gradient pass {d['one_gradient_pass_s']:.3f} s, one denoiser pass {d['one_denoiser_pass_s']:.3f} s")
    if "daskrecon_malloc_safe" in res:
        print(f"daskrecon with malloc='safe': {res['daskrecon_malloc_safe']['median_s']:.2f} s = "
              f"{res['ratio_daskrecon_malloc_safe_vs_best_deepinv_distributed']:.2f}x")
    print("wrote", write("pnp", res))


if __name__ == "__main__":
    main()
