"""Writing a result as an OME-Zarr pyramid against writing it as a plain Zarr array, same run, on a
volume larger than the worker's memory.

The "result" is a float32 volume in a Zarr array (as an out-of-core reconstruction's last checkpoint
slot holds it: :func:`daskrecon.reconstruct` with ``storage="zarr"`` returns exactly such a lazy
read), ``--times`` (4) times the worker's memory limit (one worker, two threads, 2 GiB — of which ~0.8 GiB
is the idle worker with torch and deepinv loaded —: a 1280³ volume, 7.8 GiB). Variants, each read from that array and written by the worker chunk by chunk:

* ``plain``: ``dask.array.to_zarr`` of level 0 (what ``daskrecon reconstruct`` writes for ``*.zarr``);
* ``ome-0.4`` / ``ome-0.5``: :func:`daskrecon.write_ome_zarr`, level 0 and the pyramid
  (``local_mean``, down to 320³: 3 levels) with NGFF 0.4 (Zarr v2) / 0.5 (Zarr v3) metadata.

Reports seconds, level-0 throughput (MiB/s of the volume), the ratio to ``plain`` and the worker's
peak RSS against its limit (reset before each variant). Writes benchmarks/results/omezarr.json.

    python benchmarks/bench_omezarr.py [--times 4] [--memory-limit 2GiB] [--chunk 128] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, peak_rss_mib, reset_peak_rss, rss_mib, write  # noqa: E402


def _source(work: str, side: int, chunk: int) -> str:
    """The volume, written chunk by chunk (smooth blobs plus noise: compresses as real images do)."""
    import dask.array as da
    import numpy as np

    where = os.path.join(work, f"source-{side}.zarr")
    if not os.path.exists(where + ".done"):
        from daskrecon.demo import demo_volume

        x = demo_volume((side, side, side), chunks=chunk, seed=3)
        noise = da.random.default_rng(1).standard_normal(x.shape, chunks=x.chunks, dtype=np.float32)
        (x + 0.01 * noise).astype(np.float32).to_zarr(where, overwrite=True)
        open(where + ".done", "w").close()
    return where


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--times", type=float, default=4.0, help="volume / the worker's memory limit")
    p.add_argument("--memory-limit", default="2GiB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="per variant")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    args = p.parse_args()

    import dask.array as da
    from dask.utils import parse_bytes

    import daskrecon as dr

    limit = parse_bytes(args.memory_limit)
    side = int(round((args.times * limit / 4) ** (1 / 3) / args.chunk)) * args.chunk
    work = args.dir or tempfile.mkdtemp(prefix="daskrecon-bench-ome-")
    os.makedirs(work, exist_ok=True)
    results = []
    try:
        with dr.DistributedContext(n_workers=1, threads_per_worker=args.threads, memory_limit=args.memory_limit,
                                   dashboard_address="127.0.0.1:0") as ctx, ctx.client.as_current():
            t0 = time.perf_counter()
            src = _source(work, side, args.chunk)
            made = time.perf_counter() - t0
            x = da.from_zarr(src)
            gib = x.nbytes / 2**30
            print(f"volume {side}³ float32 = {gib:.2f} GiB ({gib * 2**30 / limit:.1f}x the worker's "
                  f"{args.memory_limit}), chunks {args.chunk}³; made in {made:.0f} s")
            idle = list(ctx.client.run(rss_mib).values())[0]

            def plain(out):
                x.to_zarr(out, overwrite=False)

            def ome(version):
                return lambda out: dr.write_ome_zarr(x, out, version=version, ctx=ctx)

            for name, fn in [("plain", plain), ("ome-0.4", ome("0.4")), ("ome-0.5", ome("0.5"))]:
                times, peaks = [], []
                for r in range(args.repeats):
                    out = os.path.join(work, f"{name}-{r}.zarr")
                    ctx.client.run(reset_peak_rss)
                    t0 = time.perf_counter()
                    fn(out)
                    times.append(time.perf_counter() - t0)
                    peaks.append(list(ctx.client.run(peak_rss_mib).values())[0])
                    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
                    shutil.rmtree(out)
                med = statistics.median(times)
                row = {"variant": name, "median_s": med, "times_s": times, "level0_mib_per_s": x.nbytes / 2**20 / med,
                       "written_gib": written / 2**30, "worker_peak_rss_mib": max(peaks)}
                results.append(row)
                print(f"{name:8s} {med:7.1f} s  {row['level0_mib_per_s']:6.0f} MiB/s  written {row['written_gib']:.2f} GiB"
                      f"  worker peak RSS {max(peaks):.0f} MiB (limit {limit / 2**20:.0f}, idle {idle:.0f})")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    base = results[0]["median_s"]
    for row in results:
        row["ratio_to_plain"] = row["median_s"] / base
    print("ratio to plain Zarr: " + ", ".join(f"{r['variant']} {r['ratio_to_plain']:.2f}x" for r in results))
    write("omezarr", {"machine": machine(), "args": vars(args), "volume_side": side, "volume_gib": gib,
                      "worker_memory_limit_mib": limit / 2**20, "worker_idle_rss_mib": idle, "results": results})


if __name__ == "__main__":
    main()
