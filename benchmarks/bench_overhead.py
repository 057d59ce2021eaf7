"""What daskrecon costs on a small problem, where compute is cheap and overhead shows.

4 circular blurs (σ 1 → 2.5) on 1x3x128x128. In one run:

* the L2 gradient: plain deepinv (``L2().grad`` on ``StackedLinearPhysics``), deepinv.distributed in
  one process, and daskrecon's ``distribute(L2()).grad(x, y, dphys)`` (tensor in, tensor out) on
  2 workers;
* one PnP iteration (gradient, step, a tiny DnCNN of depth 2 tiled in 64² patches): plain deepinv's
  loop, and daskrecon's engine (``reconstruct``, 30 iterations, the mean per iteration; pipelined as
  by default, and one iteration at a time as with a callback). The
  difference is the engine's overhead per iteration: graph building, one submission, the
  scheduler, one gather of the metrics.

Writes benchmarks/results/overhead.json.

    python benchmarks/bench_overhead.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import blur_problem, machine, run_deepinv_distributed, timeit, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--n-ops", type=int, default=4)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--iterations", type=int, default=30)
    args = p.parse_args()

    import torch
    from deepinv.models import DnCNN
    from deepinv.optim import L2
    from deepinv.physics import stack

    import daskrecon as dr

    ops, x, y = blur_problem(args.n_ops, args.size)
    stacked = stack(*ops)
    torch.manual_seed(0)
    model = DnCNN(3, 3, depth=2, nf=8, pretrained=None).eval()
    res: dict = {"workload": vars(args), "machine": machine()}

    plain = timeit(lambda: L2().grad(x, y, stacked), args.repeats)
    plain.pop("_out")
    res["gradient_plain_deepinv"] = plain
    res["gradient_deepinv_distributed_1proc"] = run_deepinv_distributed(
        "_deepinv_distributed_gradient.py", 1, ["--n-ops", str(args.n_ops), "--size", str(args.size),
                                                "--repeats", str(args.repeats)])

    def plain_iteration(xk):
        with torch.no_grad():
            return model(xk - 0.3 * L2().grad(xk, y, stacked))

    x0 = torch.zeros_like(x)

    def plain_loop():
        xk = x0
        for _ in range(args.iterations):
            xk = plain_iteration(xk)
        return xk

    loop = timeit(plain_loop, 3)
    loop.pop("_out")
    res["pnp_iteration_plain_deepinv_s"] = loop["median_s"] / args.iterations

    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx:
        dphys = dr.distribute(ops, ctx)
        dfid = dr.distribute(L2(), ctx)
        dfid.grad(x, y, dphys)  # places y once, as a reconstruction would
        g = timeit(lambda: dfid.grad(x, y, dphys), args.repeats)
        g.pop("_out")
        res["gradient_daskrecon"] = g
        dden = dr.distribute(model, ctx, patch_size=64, overlap=2)
        # A callback (even one doing nothing) turns the engine's pipelining off: iteration k + 1
        # is then submitted only after iteration k's metrics are back.
        run = lambda callback=None: dr.reconstruct(dphys, y, dden, n_iter=args.iterations,  # noqa: E731
                                                   step_size=0.3, x0=x0, progress=False, return_history=True,
                                                   callback=callback)
        run()  # warm-up: models and operators reach the workers
        times, serial = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run(lambda k, x: None)
            serial.append(time.perf_counter() - t0)
        res["pnp_iteration_daskrecon_s"] = sorted(times)[1] / args.iterations
        res["pnp_iteration_daskrecon_unpipelined_s"] = sorted(serial)[1] / args.iterations

    dd = res["gradient_deepinv_distributed_1proc"]["median_s"]
    res["ratio_gradient_daskrecon_vs_deepinv_distributed"] = res["gradient_daskrecon"]["median_s"] / dd
    res["ratio_gradient_daskrecon_vs_plain"] = res["gradient_daskrecon"]["median_s"] / plain["median_s"]
    res["engine_overhead_per_iteration_s"] = res["pnp_iteration_daskrecon_s"] - res["pnp_iteration_plain_deepinv_s"]
    res["ratio_pnp_iteration_daskrecon_vs_plain"] = res["pnp_iteration_daskrecon_s"] / res["pnp_iteration_plain_deepinv_s"]
    print(f"{args.n_ops} circular blurs on 1x3x{args.size}^2 (medians)")
    print(f"  L2 gradient: plain deepinv {plain['median_s'] * 1e3:.1f} ms, deepinv.distributed (1 process) "
          f"{dd * 1e3:.1f} ms, daskrecon (2 workers) {res['gradient_daskrecon']['median_s'] * 1e3:.1f} ms "
          f"= {res['ratio_gradient_daskrecon_vs_deepinv_distributed']:.2f}x deepinv.distributed")
    print(f"  one PnP iteration: plain deepinv {res['pnp_iteration_plain_deepinv_s'] * 1e3:.1f} ms, "
          f"daskrecon engine {res['pnp_iteration_daskrecon_s'] * 1e3:.1f} ms: overhead "
          f"{res['engine_overhead_per_iteration_s'] * 1e3:.1f} ms per iteration "
          f"({res['ratio_pnp_iteration_daskrecon_vs_plain']:.2f}x plain); one iteration at a time (a callback) "
          f"{res['pnp_iteration_daskrecon_unpipelined_s'] * 1e3:.1f} ms")
    print("wrote", write("overhead", res))


if __name__ == "__main__":
    main()
