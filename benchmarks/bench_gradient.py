"""L2 gradient of N circular Gaussian blurs on a 1×3×S×S image.

Runs in one process, in this order, on the same problem:
plain deepinv (``L2().grad`` on ``StackedLinearPhysics``); deepinv.distributed in one
process; deepinv.distributed under ``torchrun --nproc_per_node=2`` (gloo); for
information, deepinv.distributed in one process with the blurs built as
``Blur(use_fft=True)``; daskrecon on a local cluster of 2 worker processes, with its
default worker-side FFT evaluation of circular blurs and with ``fast_operators=False``, and
(``--malloc-safe``) with ``DistributedContext(malloc="safe")``. Prints each median and its ratio to the best
deepinv.distributed time, checks every variant computes the same gradient, and writes
``benchmarks/results/gradient.json``.

    python benchmarks/bench_gradient.py                # the issue's workload: 16 ops, 1024²
    python benchmarks/bench_gradient.py --size 256     # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import blur_problem, machine, run_deepinv_distributed, table, timeit, write  # noqa: E402


def deepinv_distributed(nproc: int, args, use_fft: bool = False) -> dict:
    opts = ["--n-ops", str(args.n_ops), "--size", str(args.size), "--repeats", str(args.repeats)]
    return run_deepinv_distributed("_deepinv_distributed_gradient.py", nproc, opts + (["--use-fft"] if use_fft else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-ops", type=int, default=16)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="gradient")
    p.add_argument("--malloc-safe", action="store_true",
                   help="also time daskrecon on workers with DistributedContext(malloc='safe')")
    args = p.parse_args()

    import torch
    from deepinv.optim import L2
    from deepinv.physics import stack

    import daskrecon as dr

    ops, x, y = blur_problem(args.n_ops, args.size)
    results: dict = {"workload": vars(args), "machine": machine()}

    stacked = stack(*ops)
    plain = timeit(lambda: L2().grad(x, y, stacked), args.repeats)
    reference = plain.pop("_out")
    plain["torch_threads"] = torch.get_num_threads()
    results["plain_deepinv"] = plain

    results["deepinv_distributed_1proc"] = deepinv_distributed(1, args)
    results["deepinv_distributed_torchrun2"] = deepinv_distributed(2, args)

    results["deepinv_distributed_1proc_blur_use_fft"] = deepinv_distributed(1, args, use_fft=True)

    def time_daskrecon(ctx, fast: bool) -> dict:
        dphys = dr.distribute(stack(*ops), ctx, fast_operators=fast)
        dfid = dr.distribute(L2(), ctx)
        dfid.grad(x, y, dphys)  # places y on the workers once, as a reconstruction would
        d = timeit(lambda: dfid.grad(x, y, dphys), args.repeats)
        g = d.pop("_out")
        d["max_abs_diff_vs_plain"] = float((g - reference).abs().max())
        d["workers"] = ctx.num_workers
        d["torch_threads_per_worker"] = sorted(ctx.client.run(torch.get_num_threads).values())
        return d  # the operators are released with this frame, before the next variant

    with dr.DistributedContext(n_workers=args.workers, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx:
        for name, fast in (("daskrecon", True), ("daskrecon_fast_operators_off", False)):
            results[name] = time_daskrecon(ctx, fast)
    if args.malloc_safe:
        with dr.DistributedContext(n_workers=args.workers, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                                   malloc="safe") as ctx:
            results["daskrecon_malloc_safe"] = time_daskrecon(ctx, True)

    for k in ("deepinv_distributed_1proc", "deepinv_distributed_torchrun2", "deepinv_distributed_1proc_blur_use_fft"):
        results[k]["checksum_diff_vs_plain"] = abs(results[k]["checksum"] - float(reference.double().sum()))
    best = min(results["deepinv_distributed_1proc"]["median_s"], results["deepinv_distributed_torchrun2"]["median_s"])
    results["ratio_daskrecon_vs_best_deepinv_distributed"] = results["daskrecon"]["median_s"] / best
    results["ratio_daskrecon_vs_plain_deepinv"] = results["daskrecon"]["median_s"] / plain["median_s"]
    results["ratio_daskrecon_fast_operators_off_vs_best_deepinv_distributed"] = (
        results["daskrecon_fast_operators_off"]["median_s"] / best)
    results["ratio_daskrecon_vs_deepinv_distributed_blur_use_fft"] = (
        results["daskrecon"]["median_s"] / results["deepinv_distributed_1proc_blur_use_fft"]["median_s"])
    rows = [
        ("plain deepinv (1 process)", plain["median_s"]),
        ("deepinv.distributed (1 process)", results["deepinv_distributed_1proc"]["median_s"]),
        ("deepinv.distributed (torchrun x2, gloo)", results["deepinv_distributed_torchrun2"]["median_s"]),
        (f"daskrecon ({args.workers} workers)", results["daskrecon"]["median_s"]),
        (f"daskrecon ({args.workers} workers, fast_operators=False)", results["daskrecon_fast_operators_off"]["median_s"]),
        ("[info] deepinv.distributed, Blur(use_fft=True), 1 process", results["deepinv_distributed_1proc_blur_use_fft"]["median_s"]),
    ]
    if "daskrecon_malloc_safe" in results:
        rows.append((f"daskrecon ({args.workers} workers, malloc='safe')", results["daskrecon_malloc_safe"]["median_s"]))
        results["ratio_daskrecon_malloc_safe_vs_best_deepinv_distributed"] = (
            results["daskrecon_malloc_safe"]["median_s"] / best)
    print(f"L2 gradient, {args.n_ops} circular blurs, 1x3x{args.size}x{args.size}, median of {args.repeats}")
    print(table(rows, best))
    print(f"daskrecon / best deepinv.distributed = {results['ratio_daskrecon_vs_best_deepinv_distributed']:.2f}")
    print(f"max |daskrecon - plain deepinv| = {results['daskrecon']['max_abs_diff_vs_plain']:.2e} "
          f"(fast_operators=False: {results['daskrecon_fast_operators_off']['max_abs_diff_vs_plain']:.2e})")
    print("wrote", write(args.out, results))


if __name__ == "__main__":
    main()
