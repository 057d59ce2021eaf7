"""PnP on an image larger than the cluster's memory, streamed through Zarr.

Default: a 27648² RGB float32 image (8.5 GiB) — 4.3× the total worker memory limit of
one worker × 2 threads × 2 GiB — blurred (13×13 Gaussian, σ 1.5, reflect padding) with noise, reconstructed by
PnP with a small DnCNN (depth 4, 16 features) through ``daskrecon.reconstruct`` on
``da.from_zarr`` inputs. Reports seconds per iteration, each worker's peak RSS, and how
the workers' time splits between Zarr reads/writes, spilling and compute (from the task
stream). No baseline can run this: plain deepinv needs the image (and the network's
activations) in memory.

    python benchmarks/bench_ooc_pnp.py [--size 27648] [--chunk 1024] [--iterations 2]
"""

from __future__ import annotations

import argparse
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


def classify(key: str) -> str:
    name = key if isinstance(key, str) else str(key[0] if isinstance(key, tuple) else key)
    if name.startswith(("from-zarr", "original-array", "open_dataset")) or "from-zarr" in name:
        return "zarr read"
    if name.startswith(("store-map", "store-", "load-store")):
        return "zarr write"
    return "compute"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=27648)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-limit", default="2GiB")
    p.add_argument("--malloc", choices=("safe", "fast"), default="safe",
                   help="workers' glibc settings (DistributedContext(malloc=...)); 'fast' stalls here: the "
                        "worker keeps freed memory and pauses at 92 %% for good")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    args = p.parse_args()

    import dask
    import dask.array as da
    import numpy as np
    import torch
    from deepinv.models import DnCNN
    from deepinv.physics import Blur
    from deepinv.physics.functional.blur import gaussian_blur
    from distributed import get_task_stream

    import daskrecon as dr
    from daskrecon.context import scheduler_workers

    size, chunk = args.size, args.chunk
    nbytes = 3 * size * size * 4
    work = args.dir or tempfile.mkdtemp(prefix="daskrecon-ooc-pnp-")
    # An idle worker holds 750-900 MiB RSS (torch's CUDA build + deepinv): with 1 GiB per
    # worker only ~150 MiB would be left for data, and torch's allocator keeps what a conv
    # workspace took, so one worker with two threads shares 2 GiB instead. Spill task results
    # to disk beyond 25 % of the limit (the default 60 % plus the idle 45 % is over the pause
    # threshold), pause at 92 %; the nanny still kills a worker above 98 %.
    thresholds = {"distributed.worker.memory.target": 0.25, "distributed.worker.memory.spill": 0.8,
                  "distributed.worker.memory.pause": 0.92, "distributed.worker.memory.terminate": 0.98}
    torch.manual_seed(0)
    model = DnCNN(3, 3, depth=4, nf=16, pretrained=None).eval()
    blur = Blur(filter=gaussian_blur(sigma=(1.5, 1.5)), padding="reflect")  # 13×13 kernel
    try:
        with dask.config.set(thresholds), dr.DistributedContext(
            n_workers=args.workers, threads_per_worker=args.threads, memory_limit=args.memory_limit, dashboard_address=":0",
            malloc=args.malloc,
        ) as ctx, ctx.client.as_current():
            limit_total = sum(w["memory_limit"] for w in scheduler_workers(ctx.client).values())
            print(f"image 1x3x{size}x{size} float32 = {nbytes / 2**30:.2f} GiB = {nbytes / limit_total:.1f}x the "
                  f"total worker memory limit ({args.workers} x {args.memory_limit}); chunks {chunk}²", flush=True)
            dphys = dr.distribute([blur], ctx)
            dden = dr.distribute(model, ctx, patch_size=512, overlap=4, max_batch_size=1)

            # Measurements: y = A x_true + noise, written chunk by chunk.
            t0 = time.perf_counter()
            shape, chunks = (1, 3, size, size), (1, 3, chunk, chunk)
            done = os.path.join(work, "inputs.done")
            if not (args.dir and os.path.exists(done)):  # --dir keeps the inputs of an earlier run
                x_true = da.map_blocks(_scene, da.empty(shape, chunks=chunks, dtype=np.float32), dtype=np.float32)
                x_true.to_zarr(os.path.join(work, "x_true.zarr"), overwrite=True)
                x_true = da.from_zarr(os.path.join(work, "x_true.zarr"))
                noise = da.random.default_rng(1).standard_normal(shape, chunks=chunks, dtype=np.float32)
                (dphys.A(x_true)[0] + 0.02 * noise).to_zarr(os.path.join(work, "y.zarr"), overwrite=True)
                open(done, "w").close()
            t_setup = time.perf_counter() - t0
            y = da.from_zarr(os.path.join(work, "y.zarr"))
            print(f"wrote x_true and y in {t_setup:.0f} s", flush=True)
            ctx.client.run(lambda: __import__("gc").collect())
            idle = ctx.client.run(rss_mib)
            ctx.client.run(reset_peak_rss)  # the peak below is the reconstruction's

            stamps = [time.perf_counter()]
            with get_task_stream(ctx.client) as ts:
                out, history = dr.reconstruct(
                    dphys, [y], dden, n_iter=args.iterations, step_size=1.0, sigma_denoiser=0.02, x0=y,
                    checkpoint=os.path.join(work, "ckpt"), overwrite=True, progress=True, return_history=True,
                    callback=lambda k, x: stamps.append(time.perf_counter()))
            peak = ctx.client.run(peak_rss_mib)
            per_iter = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
            # stamps[0] precedes the input checks and the write of x0 (iteration 0): report it apart.
            totals: dict[str, float] = defaultdict(float)
            prefixes: dict[str, float] = defaultdict(float)
            for t in ts.data:
                kind = classify(t["key"])
                name = t["key"][0] if isinstance(t["key"], tuple) else str(t["key"])
                prefixes[name.rsplit("-", 1)[0]] += sum(ss["stop"] - ss["start"] for ss in t["startstops"]
                                                        if ss["action"] == "compute")
                for ss in t["startstops"]:
                    dur = ss["stop"] - ss["start"]
                    action = ss["action"]
                    if action == "compute":
                        totals[kind] += dur
                    elif action in ("disk-read", "disk-write"):
                        totals["spill " + action.split("-")[1]] += dur
                    elif action == "transfer":
                        totals["transfer"] += dur
            busy = sum(totals.values())
            shares = {k: v / busy for k, v in sorted(totals.items())}
            corner = np.asarray(out[:, :, :256, :256].compute())
            ok = bool(np.isfinite(corner).all())
        res = {
            "image": f"1x3x{size}x{size} float32 ({nbytes / 2**30:.2f} GiB)",
            "times_total_worker_memory_limit": nbytes / limit_total,
            "workers": args.workers, "threads_per_worker": args.threads, "malloc": args.malloc, "memory_limit_per_worker": args.memory_limit, "chunk": chunk,
            "operator": "Blur 13x13 Gaussian (sigma 1.5), reflect padding (chunk-wise map_overlap)",
            "denoiser": "DnCNN depth 4, 16 features, random weights, tiles 512 + overlap 4",
            "memory_thresholds": thresholds,
            "seconds_write_inputs": t_setup,
            "seconds_start_incl_x0_write": per_iter[0] if per_iter else None,
            "seconds_per_iteration": per_iter[1:] if len(per_iter) > 1 else per_iter,
            "worker_idle_rss_mib": sorted(idle.values()),
            "worker_peak_rss_mib": sorted(peak.values()),
            "worker_time_share": shares,
            "worker_busy_seconds": busy,
            "compute_seconds_by_task_prefix": dict(sorted(prefixes.items(), key=lambda kv: -kv[1])[:15]),
            "history": history,
            "result_finite": ok,
            "machine": machine(),
        }
        # The first stamp is taken before reconstruct() checks inputs and commits x0;
        # the first interval therefore includes that pass, later ones are pure iterations.
        path = write("ooc_pnp", res)
        print(f"\nseconds per iteration {['%.0f' % s for s in res['seconds_per_iteration']]} "
              f"(first interval incl. input checks and x0 write), worker peak RSS {res['worker_peak_rss_mib']} MiB "
              f"(idle {res['worker_idle_rss_mib']}), time share "
              + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()) + f" -> {path}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
