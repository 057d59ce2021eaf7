"""Driver time to build the halo exchange's graph, daskrecon's axis by axis against Dask's ``overlap``.

A volume in many small chunks (``--chunks-per-axis``³ chunks of ``--chunk``³, 5-D like daskrecon's
signals, halo 2 on the three spatial axes): how long the driver spends building the extended
blocks' graph and turning it into tasks, ``--repeats`` times, median. daskrecon's exchange
(``daskrecon.runtime.halos.exchanged``) writes its layer at once (a dict of tasks); Dask's
``dask.array.overlap.overlap(..., boundary="none")`` builds lazily and pays when the graph is
materialized (``dict(graph)``), as the scheduler's submission does. Tasks counted in the
materialized graphs of both (the extended blocks and everything under them). Nothing runs on a
cluster; the figures are quoted in docs/outofcore.md.

Writes benchmarks/results/halo_graph.json.

    python benchmarks/bench_halo_graph.py [--chunks-per-axis 40] [--chunk 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks-per-axis", type=int, default=40)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import dask.array as da
    from dask.array.overlap import overlap

    from daskrecon.runtime.halos import exchanged

    n, c = args.chunks_per_axis, args.chunk
    depth = {2: 2, 3: 2, 4: 2}
    rows = {}
    for way in ("daskrecon axis by axis", "dask overlap"):
        build, materialize, tasks = [], [], 0
        for r in range(args.repeats):
            a = da.random.default_rng(r).random((1, 1, n * c, n * c, n * c), chunks=(1, 1, c, c, c))
            t0 = time.perf_counter()
            e = exchanged(a, depth) if way.startswith("daskrecon") else overlap(a, depth, {ax: "none" for ax in depth})
            t1 = time.perf_counter()
            graph = dict(e.__dask_graph__())
            t2 = time.perf_counter()
            build.append(t1 - t0)
            materialize.append(t2 - t1)
            tasks = len(graph)
        rows[way] = {"build_s": statistics.median(build), "materialize_s": statistics.median(materialize),
                     "total_s": statistics.median([b + m for b, m in zip(build, materialize)]), "tasks": tasks,
                     "build_all_s": build, "materialize_all_s": materialize}
        print(f"{way:24s} build {rows[way]['build_s']:.2f} s, materialize {rows[way]['materialize_s']:.2f} s, "
              f"total {rows[way]['total_s']:.2f} s, {tasks} tasks ({n ** 3} chunks)", flush=True)
    ratio = rows["dask overlap"]["total_s"] / rows["daskrecon axis by axis"]["total_s"]
    print(f"dask / daskrecon driver time: {ratio:.2f}x", flush=True)
    write("halo_graph", {"machine": machine(), "args": vars(args), "chunks": n ** 3, "results": rows,
                         "dask_over_daskrecon": ratio})


if __name__ == "__main__":
    main()
