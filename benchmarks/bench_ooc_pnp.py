"""The same PnP iteration in cluster memory and out of core (4x the workers' memory), in one run.

A blurred (13x13 Gaussian, reflect padding) noisy synthetic RGB scene, reconstructed by PnP
with a small DnCNN (depth 4, 16 features, random weights: throughput and memory, not image
quality) through ``daskrecon.reconstruct`` on ``da.from_zarr`` inputs, on one worker with two
threads and a 2 GiB memory limit:

* in memory: a ``--small`` image (default 6144², 0.42 GiB) with ``storage="memory"``;
* out of core: an image ``--times`` (4) times the workers' total memory limit (26624², 7.9 GiB for
  one 2 GiB worker) with ``storage="zarr"``, streamed from one Zarr slot to the other.

Both use the same chunks (``--chunk``), operator and denoiser. Reports per-pixel throughput of
each (Mpx/s, iterations after the first), their ratio, each run's peak worker RSS against the
limit, and the worker threads' busy fraction (task compute time / threads x wall time) with the
split between compute, Zarr reads and spilling, and the driver's peak RSS (it holds the scheduler:
it must not grow with the image). Writes benchmarks/results/ooc_pnp.json.

    python benchmarks/bench_ooc_pnp.py [--times 4] [--iterations 2] [--chunk 512]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, peak_rss_mib, reset_peak_rss, rss_mib, write  # noqa: E402


def _scene(block, block_info=None):
    """A deterministic synthetic RGB scene (smooth shading, edges, texture), chunk by chunk."""
    import numpy as np

    (b0, b1), (c0, c1), (r0, r1), (q0, q1) = block_info[None]["array-location"]
    r = np.arange(r0, r1, dtype=np.float32)[:, None]
    q = np.arange(q0, q1, dtype=np.float32)[None, :]
    out = np.empty(block.shape, dtype=np.float32)
    for c in range(c0, c1):
        shade = 0.5 + 0.25 * np.sin(r / (900 + 150 * c)) * np.cos(q / (700 + 100 * c))
        squares = ((r // 512 + q // 512 + c) % 2) * 0.2
        texture = 0.05 * np.sin(r / 7.0 + c) * np.sin(q / 5.0)
        out[:, c - c0] = np.clip(shade + squares + texture, 0, 1)
    return out


def classify(key) -> str:
    name = key if isinstance(key, str) else str(key[0] if isinstance(key, tuple) else key)
    if "from-zarr" in name or name.startswith(("original-array", "array-", "halo-read")):
        return "zarr read"
    if name.startswith(("store-map", "store-", "load-store")):
        return "zarr write"
    return "compute"


def _inputs(work: str, size: int, chunk: int, dphys) -> tuple[float, str]:
    import dask.array as da
    import numpy as np

    t0 = time.perf_counter()
    shape, chunks = (1, 3, size, size), (1, 3, chunk, chunk)
    where = os.path.join(work, f"y-{size}.zarr")
    if not os.path.exists(os.path.join(where, "zarr.json")) or not os.path.exists(where + ".done"):
        x_true = da.map_blocks(_scene, da.empty(shape, chunks=chunks, dtype=np.float32), dtype=np.float32)
        noise = da.random.default_rng(1).standard_normal(shape, chunks=chunks, dtype=np.float32)
        (dphys.A(x_true)[0] + 0.02 * noise).to_zarr(where, overwrite=True)
        open(where + ".done", "w").close()
    return time.perf_counter() - t0, where


def _run(ctx, dphys, dden, y, storage: str, iterations: int, work: str, threads: int, **options) -> dict:
    """One reconstruction of ``y`` (started from ``y``), measured; ``options`` go to ``reconstruct``."""
    import dask.array as da
    from distributed import get_task_stream

    import daskrecon as dr

    ctx.client.run(lambda: __import__("gc").collect())
    idle = ctx.client.run(rss_mib)
    ctx.client.run(reset_peak_rss)
    driver_idle = rss_mib()
    reset_peak_rss()  # the driver (and the scheduler in it) must not grow with the image
    stamps = [time.perf_counter()]
    with get_task_stream(ctx.client) as ts:
        out, history = dr.reconstruct(
            dphys, [y], dden, n_iter=iterations, **{"step_size": 1.0, "sigma_denoiser": 0.02, **options}, x0=y,
            storage=storage,
            checkpoint=os.path.join(work, f"ckpt-{storage}") if storage == "zarr" else None, overwrite=True,
            progress=True, return_history=True, callback=lambda k, x: stamps.append(time.perf_counter()))
    peak = ctx.client.run(peak_rss_mib)
    driver_peak = peak_rss_mib()
    per_iter = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    steady = per_iter[1:] or per_iter  # the first includes the input check and the start
    # Busy fraction and time shares over the steady iterations only, from the tasks that started in
    # that window (task-stream times are wall-clock seconds; the stamps are perf_counter's).
    offset = time.time() - time.perf_counter()
    window = (stamps[-len(steady) - 1] + offset, stamps[-1] + offset)
    totals: dict[str, float] = defaultdict(float)
    for t in ts.data:
        for ss in t["startstops"]:
            start, stop = ss["start"], ss["stop"]
            if start < window[0] or start > window[1]:
                continue
            dur = stop - start
            if ss["action"] == "compute":
                totals[classify(t["key"])] += dur
            elif ss["action"] in ("disk-read", "disk-write"):
                totals["spill " + ss["action"].split("-")[1]] += dur
            elif ss["action"] == "transfer":
                totals["transfer"] += dur
    wall = window[1] - window[0]
    busy = sum(v for k, v in totals.items() if k != "transfer")
    pixels = math.prod(y.shape[2:])  # voxels for a volume
    assert isinstance(out, da.Array)
    return {
        "storage": storage,
        "image": f"{'x'.join(map(str, y.shape))} float32 ({y.nbytes / 2**30:.2f} GiB)",
        "seconds_per_iteration": per_iter,
        "steady_seconds_per_iteration": sum(steady) / len(steady),
        "mpx_per_second": pixels / 1e6 / (sum(steady) / len(steady)),
        "mpx_per_second_first_iteration": pixels / 1e6 / per_iter[0],  # input check and start included
        "worker_idle_rss_mib": sorted(idle.values()),
        "worker_peak_rss_mib": sorted(peak.values()),
        "driver_rss_before_mib": driver_idle,
        "driver_peak_rss_mib": driver_peak,
        "thread_busy_fraction": busy / (threads * wall) if wall else None,
        "worker_time_share": {k: v / max(sum(totals.values()), 1e-9) for k, v in sorted(totals.items())},
        "history": history,
        "window_s": wall,
        "tasks_in_window": sum(1 for t in ts.data if window[0] <= t["startstops"][0]["start"] <= window[1])
        if ts.data else 0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--times", type=float, default=4.0, help="out-of-core image / total worker memory limit")
    p.add_argument("--small", type=int, default=6144, help="side of the in-memory image")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-limit", default="2GiB")
    p.add_argument("--malloc", choices=("fast", "safe"), default="fast", help="the workers' glibc settings")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    args = p.parse_args()

    import dask
    import dask.array as da
    import torch
    from dask.utils import parse_bytes
    from deepinv.models import DnCNN
    from deepinv.physics import Blur
    from deepinv.physics.functional.blur import gaussian_blur

    import daskrecon as dr

    limit_total = args.workers * parse_bytes(args.memory_limit)
    size = int(math.sqrt(args.times * limit_total / 12) // args.chunk * args.chunk)  # 3 channels x 4 bytes
    work = args.dir or tempfile.mkdtemp(prefix="daskrecon-ooc-pnp-")
    # An idle worker holds ~750 MiB (torch + deepinv). Spill task results to disk beyond 25 % of
    # the limit (the default 60 % plus the idle share is over the pause threshold), pause at 92 %.
    thresholds = {"distributed.worker.memory.target": 0.25, "distributed.worker.memory.spill": 0.8,
                  "distributed.worker.memory.pause": 0.92, "distributed.worker.memory.terminate": 0.98,
                  # an out-of-core iteration is ~40 tasks per chunk: keep every record of the run
                  "distributed.scheduler.dashboard.tasks.task-stream-length": 1_000_000}
    torch.manual_seed(0)
    model = DnCNN(3, 3, depth=4, nf=16, pretrained=None).eval()
    blur = Blur(filter=gaussian_blur(sigma=(1.5, 1.5)), padding="reflect")  # 13×13 kernel
    res: dict = {"workers": args.workers, "threads_per_worker": args.threads,
                 "memory_limit_per_worker": args.memory_limit, "chunk": args.chunk, "memory_thresholds": thresholds,
                 "operator": "Blur 13x13 Gaussian (sigma 1.5), reflect padding (chunk-wise map_overlap)",
                 "denoiser": "DnCNN depth 4, 16 features, random weights, tiles 512 + overlap 4",
                 "malloc": args.malloc, "machine": machine()}
    try:
        with dask.config.set(thresholds), dr.DistributedContext(
            n_workers=args.workers, threads_per_worker=args.threads, memory_limit=args.memory_limit,
            malloc=args.malloc, dashboard_address="127.0.0.1:0",
        ) as ctx, ctx.client.as_current():
            dphys = dr.distribute([blur], ctx)
            dden = dr.distribute(model, ctx, patch_size=512, overlap=4, max_batch_size=1)
            for name, side, storage in (("in_memory", args.small, "memory"), ("out_of_core", size, "zarr")):
                t_in, path = _inputs(work, side, args.chunk, dphys)
                y = da.from_zarr(path)
                print(f"{name}: {y.nbytes / 2**30:.2f} GiB = {y.nbytes / limit_total:.2f}x the workers' total memory "
                      f"limit; inputs written in {t_in:.0f} s", flush=True)
                r = _run(ctx, dphys, dden, y, storage, args.iterations, work, args.workers * args.threads)
                r["seconds_write_inputs"] = t_in
                r["times_total_worker_memory_limit"] = y.nbytes / limit_total
                res[name] = r
                print(f"  {r['mpx_per_second']:.2f} Mpx/s, peak RSS {r['worker_peak_rss_mib']} MiB (driver "
                      f"{r['driver_rss_before_mib']:.0f} -> peak {r['driver_peak_rss_mib']:.0f} MiB), threads busy "
                      f"{r['thread_busy_fraction']:.0%}, " + ", ".join(f"{k} {v:.0%}"
                                                                     for k, v in r['worker_time_share'].items()),
                      flush=True)
        res["ratio_out_of_core_vs_in_memory_throughput"] = (res["out_of_core"]["mpx_per_second"]
                                                            / res["in_memory"]["mpx_per_second"])
        print(f"out-of-core / in-memory per-pixel throughput = {res['ratio_out_of_core_vs_in_memory_throughput']:.2f}")
        print("wrote", write("ooc_pnp", res))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
