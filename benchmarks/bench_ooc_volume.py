"""3-D out of core: a volume 4x the workers' memory deconvolved with a 3-D DnCNN prior, against the
same iteration in memory on a volume that fits, in one run.

A synthetic microscopy-like volume (:func:`daskrecon.demo.demo_volume`), blurred by a 3-D Gaussian
(7³ kernel, sigma 1, reflect padding; deepinv's ``Blur`` with a 3-D filter, chunk-wise) with
Gaussian noise, written to Zarr, then reconstructed through ``daskrecon.reconstruct`` from
``da.from_zarr`` with the bundled 3-D DnCNN (depth 4, 8 features) tiled inside the chunks, on one
worker with two threads and a 2 GiB memory limit:

* in memory: a ``--small``³ volume (default 384³, 0.21 GiB) with ``storage="memory"``;
* out of core: a volume ``--times`` (4) times the workers' total memory limit (1312³, 8.4 GiB for one
  2 GiB worker) with ``storage="zarr"``.

Same chunks (``--chunk``³), operator, denoiser and algorithm (``--algorithm``, PnP by default).
Reports per-voxel throughput (Mvox/s; out of core one iteration by default — ~30 min on this
2-core machine —, so the ratio compares first iterations, each with its run's input check and
start; the in-memory steady figure too), the ratio, each run's peak
worker RSS against the limit, the threads' busy fraction and the driver's peak RSS (as
``bench_ooc_pnp.py``, whose measuring code this reuses). Writes benchmarks/results/ooc_volume.json.

    python benchmarks/bench_ooc_volume.py [--times 4] [--iterations 2] [--chunk 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402
from bench_ooc_pnp import _run  # noqa: E402


def _inputs(work: str, side: int, chunk: int, dphys) -> tuple[float, str]:
    import dask.array as da
    import numpy as np

    from daskrecon.demo import demo_volume

    t0 = time.perf_counter()
    where = os.path.join(work, f"y-{side}.zarr")
    if not os.path.exists(where + ".done"):
        x_true = demo_volume((side, side, side), chunks=chunk, seed=3)
        noise = da.random.default_rng(1).standard_normal(x_true.shape, chunks=x_true.chunks, dtype=np.float32)
        (dphys.A(x_true)[0] + 0.03 * noise).to_zarr(where, overwrite=True)
        open(where + ".done", "w").close()
    return time.perf_counter() - t0, where


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--times", type=float, default=4.0, help="out-of-core volume / total worker memory limit")
    p.add_argument("--small", type=int, default=384, help="side of the in-memory volume")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--iterations", type=int, default=2, help="in memory")
    p.add_argument("--ooc-iterations", type=int, default=1,
                   help="out of core (one takes ~30 min here; the ratio compares first iterations)")
    p.add_argument("--algorithm", default="pnp")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-limit", default="2GiB")
    p.add_argument("--malloc", default="fast", choices=("fast", "safe"), help="DistributedContext(malloc=)")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    args = p.parse_args()

    import dask
    import dask.array as da
    from dask.utils import parse_bytes
    from deepinv.physics import Blur
    from deepinv.physics.functional import gaussian_blur

    import daskrecon as dr
    from daskrecon.models import BUNDLED_DENOISER_3D, bundled_denoiser_3d

    limit_total = args.workers * parse_bytes(args.memory_limit)
    side = int(round((args.times * limit_total / 4) ** (1 / 3)))
    side = -(-side // 16) * 16  # at least --times x the limit
    work = args.dir or tempfile.mkdtemp(prefix="daskrecon-ooc-volume-")
    thresholds = {"distributed.worker.memory.target": 0.25, "distributed.worker.memory.spill": 0.8,
                  "distributed.worker.memory.pause": 0.92, "distributed.worker.memory.terminate": 0.98,
                  "distributed.scheduler.dashboard.tasks.task-stream-length": 1_000_000}
    blur = Blur(filter=gaussian_blur(psf_size=(7, 7, 7), sigma=(1.0, 1.0, 1.0)), padding="reflect")
    tile = args.chunk // 2
    res: dict = {"workers": args.workers, "threads_per_worker": args.threads,
                 "memory_limit_per_worker": args.memory_limit, "malloc": args.malloc, "chunk": args.chunk, "algorithm": args.algorithm,
                 "memory_thresholds": thresholds,
                 "operator": "3-D Blur 7x7x7 Gaussian (sigma 1), reflect padding (chunk-wise map_overlap, conv3d)",
                 "denoiser": f"bundled 3-D DnCNN {BUNDLED_DENOISER_3D}, tiles {tile}^3 + overlap 4",
                 "machine": machine()}
    try:
        with dask.config.set(thresholds), dr.DistributedContext(
            n_workers=args.workers, threads_per_worker=args.threads, memory_limit=args.memory_limit,
            dashboard_address="127.0.0.1:0", malloc=args.malloc,
        ) as ctx, ctx.client.as_current():
            dphys = dr.distribute([blur], ctx)
            dden = dr.distribute(bundled_denoiser_3d(), ctx, patch_size=tile, overlap=4, max_batch_size=1)
            for name, n, storage, iters in (("in_memory", args.small, "memory", args.iterations),
                                            ("out_of_core", side, "zarr", args.ooc_iterations)):
                t_in, path = _inputs(work, n, args.chunk, dphys)
                y = da.from_zarr(path)
                print(f"{name}: {n}³ = {y.nbytes / 2**30:.2f} GiB = {y.nbytes / limit_total:.2f}x the workers' total "
                      f"memory limit; inputs written in {t_in:.0f} s", flush=True)
                r = _run(ctx, dphys, dden, y, storage, iters, work, args.workers * args.threads,
                         algorithm=args.algorithm, step_size=1.0)
                r["seconds_write_inputs"] = t_in
                r["times_total_worker_memory_limit"] = y.nbytes / limit_total
                r["mvox_per_second"] = r.pop("mpx_per_second")
                r["mvox_per_second_first_iteration"] = r.pop("mpx_per_second_first_iteration")
                res[name] = r
                print(f"  {r['mvox_per_second']:.2f} Mvox/s, {r['steady_seconds_per_iteration']:.0f} s/iteration, "
                      f"peak RSS {r['worker_peak_rss_mib']} MiB (driver {r['driver_rss_before_mib']:.0f} -> peak "
                      f"{r['driver_peak_rss_mib']:.0f} MiB), threads busy {r['thread_busy_fraction']:.0%}, "
                      + ", ".join(f"{k} {v:.0%}" for k, v in r['worker_time_share'].items()), flush=True)
        # First iterations against each other: each includes its run's input check (one read pass) and
        # start; the in-memory steady figure is given too.
        res["ratio_out_of_core_vs_in_memory_throughput"] = (res["out_of_core"]["mvox_per_second_first_iteration"]
                                                            / res["in_memory"]["mvox_per_second_first_iteration"])
        print(f"out-of-core / in-memory per-voxel throughput (first iterations) = "
              f"{res['ratio_out_of_core_vs_in_memory_throughput']:.2f}")
        print("wrote", write("ooc_volume", res))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
