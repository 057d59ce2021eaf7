"""Tasks and seconds of a 3-D volume in many small chunks: in cluster memory against out of core.

Two iterations of PnP (a 3×3×3 box blur with reflect padding, its adjoint, a random-weight 3-D
DnCNN of depth 2 tiled in 8³ patches with overlap 2) on a ``--size``³ volume in 8³ chunks, 2
workers of one thread, three ways: in memory with daskrecon's halo exchange axis by axis
(``daskrecon.arrays.halo-exchange: axes``, the default: two ``halo-face`` slivers and a
``halo-join`` per chunk and axis), in memory with Dask's own ``map_overlap`` exchange (``dask``:
a ``getitem`` per neighbour sliver, 26 in 3-D), and out of core, where each chunk's halo is one
read of the stored neighbours (``halo-read``). A second workload checks the other end, where
the axis-by-axis exchange's extra copies (one join per axis instead of one) would show: a cheap
stencil (``A`` then ``Aᵀ`` of a 7³ Gaussian blur) on a ``--large``³ volume in 64³ chunks, in
memory, both exchanges. A scheduler plugin counts the tasks that finish, by key
prefix; the results must be bitwise equal. Also printed: the seconds the context takes to start
(its worker interpreters import torch and deepinv) and a fresh interpreter's ``import daskrecon``.
The figures are quoted in docs/status.md.

Writes benchmarks/results/halo_tasks.json.

    python benchmarks/bench_halo_tasks.py [--size 48] [--large 192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402

from distributed.diagnostics.plugin import SchedulerPlugin  # noqa: E402


class CountTasks(SchedulerPlugin):
    """Tasks that reach memory, in all and by key prefix."""

    name = "bench-count-tasks"

    def __init__(self) -> None:
        self.total, self.prefixes = 0, {}

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "memory":
            self.total += 1
            name = key[0] if isinstance(key, tuple) else str(key)
            prefix = name.rsplit("-", 1)[0] if "-" in name else name
            self.prefixes[prefix] = self.prefixes.get(prefix, 0) + 1


def _gaussian3(sigma: float, radius: int):
    """A normalised 3-D Gaussian filter of ``2 radius + 1`` taps a side, (1, 1, k, k, k)."""
    import torch

    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-t**2 / (2 * sigma**2))
    k = g[:, None, None] * g[None, :, None] * g[None, None, :]
    return (k / k.sum())[None, None]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=48, help="volume side (a multiple of 8)")
    p.add_argument("--large", type=int, default=192, help="side of the large-chunk volume (a multiple of 64)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import dask
    import dask.array as da
    import deepinv as dinv
    import numpy as np
    import torch
    from deepinv.models import DnCNN

    import daskrecon as dr

    n = args.size
    torch.manual_seed(0)
    blur = dinv.physics.Blur(filter=torch.ones(1, 1, 3, 3, 3) / 27, padding="reflect")
    x_true = torch.rand(1, 1, n, n, n)
    y = blur(x_true) + 0.01 * torch.randn_like(x_true)
    model = DnCNN(1, 1, depth=2, nf=16, pretrained=None, dim=3).eval()
    rows: dict[str, dict] = {}
    timed_import = "import time; t = time.perf_counter(); import daskrecon; print(time.perf_counter() - t)"
    t_import = subprocess.run([sys.executable, "-c", timed_import], capture_output=True, text=True, check=True)
    import_s = float(t_import.stdout.strip().splitlines()[-1])
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, \
            dr.DistributedContext(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address="127.0.0.1:0") as ctx, ctx.client.as_current():
        start_s = time.perf_counter() - t_start
        print(f"context of 2 worker processes started in {start_s:.1f} s; `import daskrecon` takes {import_s:.1f} s "
              "in a fresh interpreter")
        da.from_array(y.numpy(), chunks=(1, 1, 8, 8, 8)).to_zarr(str(Path(tmp) / "y.zarr"))
        ya = da.from_zarr(str(Path(tmp) / "y.zarr"))
        dphys = dr.distribute([blur], ctx)
        dden = dr.distribute(model, ctx, patch_size=8, overlap=2)
        results = {}
        for rep in range(args.repeats):
            for storage in ("memory", "memory, dask halos", "zarr"):
                ctx.client.register_plugin(CountTasks(), name=CountTasks.name)
                kw = {"storage": "zarr", "checkpoint": str(Path(tmp) / f"ooc-{rep}")} if storage == "zarr" else {}
                exchange = "dask" if storage == "memory, dask halos" else "axes"
                t0 = time.perf_counter()
                with dask.config.set({"daskrecon.arrays.halo-exchange": exchange}):
                    out = dr.reconstruct(dphys, [ya], dden, n_iter=2, step_size=0.5, progress=False,
                                         chunks=(8, 8, 8), **kw)
                got = out.compute() if isinstance(out, da.Array) else out.numpy()
                seconds = time.perf_counter() - t0
                total, prefixes = ctx.client.run_on_scheduler(
                    lambda dask_scheduler: (dask_scheduler.plugins[CountTasks.name].total,
                                            dask_scheduler.plugins[CountTasks.name].prefixes))
                ctx.client.unregister_scheduler_plugin(CountTasks.name)
                row = rows.setdefault(storage, {"seconds": [], "tasks": total,
                                                "top_prefixes": dict(sorted(prefixes.items(), key=lambda kv: -kv[1])[:6])})
                row["seconds"].append(seconds)
                results[storage] = got
            np.testing.assert_array_equal(results["memory"], results["zarr"])
            np.testing.assert_array_equal(results["memory"], results["memory, dask halos"])
        # The large-chunk end: a cheap stencil, where copies weigh more than tasks.
        gauss = dinv.physics.Blur(filter=_gaussian3(1.0, 3), padding="reflect")
        big = da.random.default_rng(1).standard_normal((1, 1, args.large, args.large, args.large),
                                                        chunks=(1, 1, 64, 64, 64), dtype=np.float32)
        big = big.persist()
        dgauss = dr.distribute([gauss], ctx)
        large: dict[str, dict] = {}
        outs = {}
        for rep in range(args.repeats):
            for exchange in ("axes", "dask"):
                with dask.config.set({"daskrecon.arrays.halo-exchange": exchange}):
                    expr = dgauss.A_adjoint(dgauss.A(big))
                t0 = time.perf_counter()
                outs[exchange] = expr.compute()
                row = large.setdefault(exchange, {"seconds": [], "tasks": len(expr.__dask_graph__())})
                row["seconds"].append(time.perf_counter() - t0)
            np.testing.assert_array_equal(outs["axes"], outs["dask"])
    for storage, row in rows.items():
        row["median_s"] = statistics.median(row["seconds"])
        print(f"{storage:18s} {row['tasks']:6d} tasks, median {row['median_s']:.1f} s over {args.repeats}: "
              f"{row['top_prefixes']}")
    ratio = rows["memory"]["median_s"] / rows["zarr"]["median_s"]
    ratio_dask = rows["memory"]["median_s"] / rows["memory, dask halos"]["median_s"]
    print(f"in memory / out of core: {rows['memory']['tasks'] / rows['zarr']['tasks']:.2f}x the tasks, "
          f"{ratio:.2f}x the time; halos axis by axis / dask's: "
          f"{rows['memory']['tasks'] / rows['memory, dask halos']['tasks']:.2f}x the tasks, {ratio_dask:.2f}x the time; "
          "results bitwise equal")
    for exchange, row in large.items():
        row["median_s"] = statistics.median(row["seconds"])
        print(f"{args.large}³ in 64³ chunks, A then Aᵀ of a 7³ blur, halos {exchange:4s}: {row['tasks']} tasks in the "
              f"graph, median {row['median_s']:.2f} s over {args.repeats}")
    ratio_large = large["axes"]["median_s"] / large["dask"]["median_s"]
    print(f"large chunks, halos axis by axis / dask's: {ratio_large:.2f}x the time; results bitwise equal")
    path = write("halo_tasks", {"workload": {"size": n, "chunks": 8, "iterations": 2, "workers": 2,
                                             "repeats": args.repeats},
                                "machine": machine(), "rows": rows, "time_ratio_memory_over_zarr": ratio,
                                "time_ratio_axes_over_dask_halos": ratio_dask,
                                "large_chunks": {"workload": {"size": args.large, "chunks": 64,
                                                              "stencil": "A then A^T, 7^3 Gaussian blur, reflect"},
                                                 "rows": large, "time_ratio_axes_over_dask": ratio_large},
                                "context_start_s": start_s, "import_daskrecon_s": import_s})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
