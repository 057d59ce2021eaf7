"""Tasks per chunk-wise operator call, and the default step's power method at two tolerances.

1. Task counts (graph keys, nothing computed) of ``A`` and ``AᵀA`` for a 5×5 blur on a
   1×3×64×56 image, in one chunk and in 2×2 chunks: circular padding with daskrecon's periodic
   halos against dask's own ``map_overlap(boundary="periodic")`` on the same kernel; the
   ``"valid"`` adjoint's zero-embedding against ``da.pad`` + ``rechunk``.
2. ``daskrecon.engine.linsolve.lipschitz`` (the default step ``1/L``) on that image with a reflect blur,
   a valid blur and a valid 2× downsampling, 2 workers: passes and seconds at ``tol=1e-5`` and
   ``1e-4`` (the default), medians of ``--repeats`` runs, each on a fresh cache.

Writes benchmarks/results/task_counts.json.

    python benchmarks/bench_task_counts.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402

SHAPE = (1, 3, 64, 56)


def _count(a) -> int:
    return len(dict(a.__dask_graph__()))


def task_counts() -> dict:
    import dask.array as da
    import deepinv as dinv
    import numpy as np
    import torch

    from daskrecon.operators.chunkwise import local_form
    from daskrecon.tasks import local_kernels

    k = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    k = k / k.sum()
    out = {}
    for label, chunks in (("one chunk", SHAPE), ("2x2 chunks", (1, 3, 32, 28))):
        x = da.from_array(np.random.default_rng(0).random(SHAPE, dtype=np.float32), chunks=chunks)
        base = _count(x)
        circ = local_form(dinv.physics.Blur(filter=k, padding="circular"))
        ours_a = circ.apply(x)
        ours_ata = circ.adjoint(ours_a, x.chunks)
        # dask's own periodic boundary on the same chunk kernel (what daskrecon ran before)
        kw = dict(dtype=x.dtype, meta=np.empty((0,) * 4, x.dtype), filt=circ._kernel(x.dtype), padding="circular",
                  radius=circ.depth, factor=1, nblocks=x.numblocks[2:], trim=False, chunks=x.chunks)
        dask_a = da.map_overlap(local_kernels.local_forward_block, x, depth={0: 0, 1: 0, 2: 2, 3: 2},
                                boundary="periodic", allow_rechunk=False, **kw)
        valid = local_form(dinv.physics.Blur(filter=k))
        y = valid.apply(x)
        padded = da.pad(y, ((0, 0), (0, 0), *valid.crop_for(SHAPE[2:])), mode="constant").rechunk(x.chunks)
        embedded = valid.adjoint(y, x.chunks)
        out[label] = {
            "circular A, daskrecon": _count(ours_a) - base,
            "circular A, dask periodic boundary": _count(dask_a) - base,
            "circular AtA, daskrecon": _count(ours_ata) - base,
            "valid AtA, daskrecon": _count(embedded) - base,
            "valid y embedded by da.pad + rechunk (the embedding alone)": _count(padded) - _count(y),
        }
    return out


def power_method(repeats: int) -> dict:
    import deepinv as dinv
    import torch

    import daskrecon as dr
    from daskrecon.engine import linsolve
    from daskrecon.frontend.reconstruct import plan_problem

    g = torch.Generator().manual_seed(4)
    k1, k2 = torch.rand(1, 1, 4, 4, generator=g), torch.rand(1, 1, 7, 5, generator=g)
    ops = [dinv.physics.Blur(filter=k2 / k2.sum(), padding="reflect"), dinv.physics.Blur(filter=k1 / k1.sum()),
           dinv.physics.Downsampling(img_size=SHAPE[1:], filter=k1 / k1.sum(), factor=2, padding="valid")]
    x = torch.rand(SHAPE, generator=g)
    y = [op.A(x) for op in ops]
    passes = {"n": 0}
    normal = linsolve._normal

    def counted(problem, v):
        passes["n"] += 1
        return normal(problem, v)

    linsolve._normal = counted
    res = {}
    try:
        with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx:
            model = dinv.models.DnCNN(3, 3, pretrained=None, depth=2, nf=8).eval()
            den = dr.distribute(model, ctx, patch_size=32, overlap=4)
            for tol in (1e-5, 1e-4):
                times, counts, values = [], [], []
                for _ in range(repeats):
                    problem, _ = plan_problem(dr.distribute(ops, ctx), y, den, data_fidelity=None, x0=None,
                                              x_true=None, sigma_denoiser=0.05)
                    passes["n"] = 0
                    t = time.perf_counter()
                    values.append(linsolve.lipschitz(problem, linsolve.Workspace(problem), tol=tol))
                    times.append(time.perf_counter() - t)
                    counts.append(passes["n"])
                res[f"tol={tol:g}"] = {"seconds_median": statistics.median(times), "seconds": times,
                                       "passes": counts[0], "L": values[0]}
    finally:
        linsolve._normal = normal
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    counts = task_counts()
    for label, row in counts.items():
        print(f"{label}:")
        for k, v in row.items():
            print(f"  {k:60s} {v:5d} tasks")
    power = power_method(args.repeats)
    a, b = power["tol=1e-05"], power["tol=0.0001"]
    for name, r in power.items():
        print(f"power method {name}: {r['passes']} passes, {r['seconds_median']:.2f} s (median), L = {r['L']:.6f}")
    print(f"ratio of seconds 1e-5 / 1e-4: {a['seconds_median'] / b['seconds_median']:.2f}x")
    write("task_counts", {"workload": {"shape": SHAPE, **vars(args)}, "machine": machine(), "task_counts": counts,
                          "power_method": power})


if __name__ == "__main__":
    main()
