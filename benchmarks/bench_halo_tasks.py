"""Tasks and seconds of a 3-D volume in many small chunks: in cluster memory against out of core.

Two iterations of PnP (a 3×3×3 box blur with reflect padding, its adjoint, a random-weight 3-D
DnCNN of depth 2 tiled in 8³ patches with overlap 2) on a ``--size``³ volume in 8³ chunks, 2
workers of one thread. In memory, each stencil's halo is Dask's ``map_overlap`` exchange (a
``getitem`` per neighbour sliver); out of core, each chunk's halo is one read of the stored
neighbours (daskrecon's ``halo-read``). A scheduler plugin counts the tasks that finish, by key
prefix; the results must be bitwise equal. Also printed: the seconds the context takes to start
(its worker interpreters import torch and deepinv) and a fresh interpreter's ``import daskrecon``.
The figures are quoted in docs/status.md.

Writes benchmarks/results/halo_tasks.json.

    python benchmarks/bench_halo_tasks.py [--size 48] [--repeats 3]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=48, help="volume side (a multiple of 8)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

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
            for storage in ("memory", "zarr"):
                ctx.client.register_plugin(CountTasks(), name=CountTasks.name)
                kw = {"storage": "zarr", "checkpoint": str(Path(tmp) / f"ooc-{rep}")} if storage == "zarr" else {}
                t0 = time.perf_counter()
                out = dr.reconstruct(dphys, [ya], dden, n_iter=2, step_size=0.5, progress=False, chunks=(8, 8, 8),
                                     **kw)
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
    for storage, row in rows.items():
        row["median_s"] = statistics.median(row["seconds"])
        print(f"{storage:7s} {row['tasks']:6d} tasks, median {row['median_s']:.1f} s over {args.repeats}: "
              f"{row['top_prefixes']}")
    ratio = rows["memory"]["median_s"] / rows["zarr"]["median_s"]
    print(f"in memory / out of core: {rows['memory']['tasks'] / rows['zarr']['tasks']:.2f}x the tasks, "
          f"{ratio:.2f}x the time; results bitwise equal")
    path = write("halo_tasks", {"workload": {"size": n, "chunks": 8, "iterations": 2, "workers": 2,
                                             "repeats": args.repeats},
                                "machine": machine(), "rows": rows, "time_ratio_memory_over_zarr": ratio,
                                "context_start_s": start_s, "import_daskrecon_s": import_s})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
