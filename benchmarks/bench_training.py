"""One training step of an unrolled network through the distributed operators, in one run.

The model: deepinv's unfolded proximal gradient (``PGD(..., unfold=True)``, ``--unroll`` (3)
iterations, trainable step sizes) with a DnCNN prior (random weights; ``--depth`` 20,
``--nf`` 64: deepinv's default DnCNN), on 3 circular blurs + noise of a 1x3x``--size``² image;
a step is forward, MSE against the ground truth, backward, Adam step. Timed (median of
``--repeats``, after one warm-up step) for:

* plain deepinv (no tiling, one process);
* deepinv.distributed 0.5 (``distribute(model, ctx, patch_size, overlap, max_batch_size=1)``,
  its unrolled-training demo's call) in one process and under ``torchrun`` x2;
* daskrecon (``dr.distribute(model, ctx, ...)``, 2 workers x 1 thread), with each process's peak
  RSS (workers for daskrecon, ranks for deepinv.distributed);
* daskrecon with the tiles' forward and backward in bf16 autocast (``precision="bf16"``, fp32
  master weights), and the loss curve of ``--curve-steps`` steps from the same start in fp32
  and in bf16.

Then the memory check: one step on a ``--mem-size``² image (``--mem-depth``/``--mem-nf`` DnCNN,
one unrolled iteration) whose untiled backward needs more than a daskrecon worker's
``--memory-limit``: plain deepinv's peak RSS for that step is measured in this process, and the
daskrecon step runs on 2 workers with that limit; their peak RSS is reported against it.
Writes benchmarks/results/training.json.

    python benchmarks/bench_training.py [--size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, peak_rss_mib, reset_peak_rss, rss_mib, run_deepinv_distributed, table, timeit, write  # noqa: E402,E501
from _training_problem import add_arguments, problem, train_step  # noqa: E402

import _common  # noqa: E402
import cloudpickle  # noqa: E402

cloudpickle.register_pickle_by_value(_common)  # the workers run its peak-RSS probes without importing it


def _plain(ops, y, x_true, build, repeats: int) -> dict:
    import torch
    from deepinv.optim.data_fidelity import L2, StackedPhysicsDataFidelity
    from deepinv.physics import StackedLinearPhysics

    model = build()
    model.data_fidelity[0] = StackedPhysicsDataFidelity([L2()] * len(ops))  # deepinv's L2 on a stack
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    phys = StackedLinearPhysics(ops)
    train_step(model, opt, y, phys, x_true)  # warm-up
    base = rss_mib()
    reset_peak_rss()
    r = timeit(lambda: train_step(model, opt, y, phys, x_true), repeats, warmup=0)
    r["loss"] = r.pop("_out")
    r["peak_rss_mib"] = peak_rss_mib()
    r["peak_rss_above_start_mib"] = r["peak_rss_mib"] - base
    return r


def _plain_fresh(args) -> dict:
    """One plain deepinv step on the memory workload in a fresh process: its peak RSS above the process's
    RSS just before the step (after a warm-up the allocator keeps its pages, hiding the step's need)."""
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--plain-memory-only", "--mem-size", str(args.mem_size), "--mem-depth",
           str(args.mem_depth), "--mem-nf", str(args.mem_nf)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("RESULT ")][0][7:])


def _plain_memory_only(args) -> None:
    import json
    import time

    import torch
    from deepinv.optim.data_fidelity import L2, StackedPhysicsDataFidelity
    from deepinv.physics import StackedLinearPhysics

    ops, y, x_true, build = problem(args.mem_size, args.mem_depth, args.mem_nf, unroll=1)
    model = build()
    model.data_fidelity[0] = StackedPhysicsDataFidelity([L2()] * len(ops))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    base = rss_mib()
    reset_peak_rss()
    t0 = time.perf_counter()
    loss = train_step(model, opt, y, StackedLinearPhysics(ops), x_true)
    r = {"median_s": time.perf_counter() - t0, "loss": loss, "rss_before_mib": base, "peak_rss_mib": peak_rss_mib()}
    r["peak_rss_above_start_mib"] = r["peak_rss_mib"] - base
    print("RESULT " + json.dumps(r), flush=True)


def _daskrecon(ops, y, x_true, build, repeats: int, patch: int, overlap: int, memory_limit=None,
               warmup: int = 1, precision: str = "fp32", curve_steps: int = 0) -> dict:
    import torch

    import daskrecon as dr

    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                               memory_limit=memory_limit) as ctx:
        dphys = dr.distribute(ops, ctx)
        if curve_steps:  # the loss curve from the model's initial weights, then the timing
            torch.manual_seed(0)
            model = dr.distribute(build(), ctx, patch_size=patch, overlap=overlap, precision=precision)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            curve = [train_step(model, opt, y, dphys, x_true) for _ in range(curve_steps)]
        model = dr.distribute(build(), ctx, patch_size=patch, overlap=overlap, precision=precision)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        for _ in range(warmup):
            train_step(model, opt, y, dphys, x_true)
        ctx.client.run(reset_peak_rss)
        r = timeit(lambda: train_step(model, opt, y, dphys, x_true), repeats, warmup=0)
        r["loss"] = r.pop("_out")
        r["peak_rss_mib_per_worker"] = sorted(ctx.client.run(peak_rss_mib).values())
        r["restarts"] = len(ctx.client.run(lambda: 0)) != 2
        if curve_steps:
            r["loss_curve"] = curve
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--mem-size", type=int, default=1536)
    p.add_argument("--mem-depth", type=int, default=10)
    p.add_argument("--mem-nf", type=int, default=32)
    p.add_argument("--memory-limit", default="2GiB")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--curve-steps", type=int, default=6, help="training steps of the fp32/bf16 loss curves")
    p.add_argument("--plain-memory-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_memory_only:
        return _plain_memory_only(args)

    ops, y, x_true, build = problem(args.size, args.depth, args.nf, args.unroll)
    res = {"workload": vars(args), "machine": machine()}
    opts = ["--size", str(args.size), "--depth", str(args.depth), "--nf", str(args.nf), "--unroll", str(args.unroll),
            "--patch", str(args.patch), "--overlap", str(args.overlap), "--repeats", str(args.repeats)]
    res["plain_deepinv"] = _plain(ops, y, x_true, build, args.repeats)
    res["deepinv_distributed_1proc"] = run_deepinv_distributed("_deepinv_distributed_training.py", 1, opts)
    res["deepinv_distributed_torchrun2"] = run_deepinv_distributed("_deepinv_distributed_training.py", 2, opts)
    res["daskrecon"] = _daskrecon(ops, y, x_true, build, args.repeats, args.patch, args.overlap,
                                  curve_steps=args.curve_steps)
    res["daskrecon_bf16"] = _daskrecon(ops, y, x_true, build, args.repeats, args.patch, args.overlap,
                                       precision="bf16", curve_steps=args.curve_steps)
    best = min(res["deepinv_distributed_1proc"]["median_s"], res["deepinv_distributed_torchrun2"]["median_s"])
    res["ratio_daskrecon_vs_best_deepinv_distributed"] = res["daskrecon"]["median_s"] / best
    res["ratio_daskrecon_bf16_vs_best_deepinv_distributed"] = res["daskrecon_bf16"]["median_s"] / best
    c32, c16 = res["daskrecon"].get("loss_curve", []), res["daskrecon_bf16"].get("loss_curve", [])
    res["loss_curve_max_rel_diff_bf16_vs_fp32"] = max((abs(a - b) / abs(a) for a, b in zip(c32, c16)), default=None)
    # "noise": how much the fp32 loss moves from one step to the next
    res["loss_curve_fp32_step_to_step_rel"] = [abs(b - a) / abs(a) for a, b in zip(c32, c32[1:])]
    res["loss_first_timed_step"] = {k: res[k]["loss"] for k in
                                    ("plain_deepinv", "deepinv_distributed_1proc", "deepinv_distributed_torchrun2",
                                     "daskrecon")}
    print(f"one training step: unrolled PGD x{args.unroll}, DnCNN depth {args.depth} nf {args.nf}, 3 blurs, "
          f"1x3x{args.size}^2, patch {args.patch} overlap {args.overlap}")
    print(table([("plain deepinv (1 process, untiled)", res["plain_deepinv"]["median_s"]),
                 ("deepinv.distributed (1 process)", res["deepinv_distributed_1proc"]["median_s"]),
                 ("deepinv.distributed (torchrun x2, gloo)", res["deepinv_distributed_torchrun2"]["median_s"]),
                 ("daskrecon (2 workers)", res["daskrecon"]["median_s"]),
                 ("daskrecon (2 workers), tiles in bf16 autocast", res["daskrecon_bf16"]["median_s"])], best))
    print(f"daskrecon / best deepinv.distributed = {res['ratio_daskrecon_vs_best_deepinv_distributed']:.2f}; "
          f"bf16: {res['ratio_daskrecon_bf16_vs_best_deepinv_distributed']:.2f}")
    if c32:
        print("loss curve fp32: " + ", ".join(f"{v:.5f}" for v in c32))
        print("loss curve bf16: " + ", ".join(f"{v:.5f}" for v in c16))
        print(f"largest relative difference {res['loss_curve_max_rel_diff_bf16_vs_fp32']:.2e}; fp32 step-to-step "
              f"changes {', '.join(f'{v:.1e}' for v in res['loss_curve_fp32_step_to_step_rel'])}")
    print(f"peak RSS MiB: plain {res['plain_deepinv']['peak_rss_mib']:.0f}; deepinv.distributed 1 proc "
          f"{res['deepinv_distributed_1proc']['peak_rss_mib_per_process']}, torchrun "
          f"{res['deepinv_distributed_torchrun2']['peak_rss_mib_per_process']}; daskrecon workers "
          f"{[round(v) for v in res['daskrecon']['peak_rss_mib_per_worker']]}")

    if not args.skip_memory:
        from dask.utils import parse_bytes

        ops_m, y_m, x_m, build_m = problem(args.mem_size, args.mem_depth, args.mem_nf, unroll=1)
        plain = _plain_fresh(args)
        ours = _daskrecon(ops_m, y_m, x_m, build_m, 1, args.patch, args.overlap, memory_limit=args.memory_limit,
                          warmup=0)
        limit_mib = parse_bytes(args.memory_limit) / 2**20
        res["memory"] = {"plain_deepinv": plain, "daskrecon": ours, "worker_limit_mib": limit_mib,
                         "plain_step_above_limit": plain["peak_rss_mib"] > limit_mib,
                         "daskrecon_under_limit": max(ours["peak_rss_mib_per_worker"]) < limit_mib}
        print(f"memory: 1x3x{args.mem_size}^2, DnCNN depth {args.mem_depth} nf {args.mem_nf}, 1 unrolled iteration: "
              f"plain deepinv step {plain['median_s']:.1f} s, peak RSS {plain['peak_rss_mib']:.0f} MiB "
              f"({plain['peak_rss_above_start_mib']:.0f} above its start); "
              f"daskrecon step {ours['median_s']:.1f} s, workers' peak RSS "
              f"{[round(v) for v in ours['peak_rss_mib_per_worker']]} MiB under a {limit_mib:.0f} MiB limit")
    print("wrote", write("training", res))


if __name__ == "__main__":
    main()
