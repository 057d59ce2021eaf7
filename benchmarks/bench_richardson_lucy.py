"""Richardson–Lucy (``algorithm="mlem"``) on a fluorescence-like volume: in memory, out of core, plain deepinv.

The volume of ``examples/plot_richardson_lucy_volume.py``: the bundled 3-D generator
(:func:`daskrecon.demo.demo_volume`) plus a dim background, blurred by an anisotropic 3-D Gaussian PSF
(9×7×7, sigma (2, 1.2, 1.2), reflect padding; deepinv's ``Blur``, chunk-wise), Poisson counts at
``--photons`` at full brightness, written to Zarr. Then, in the same run, ``--iterations`` MLEM
iterations (after one warm-up) by:

* plain deepinv: ``dinv.optim.MLEM`` on the whole volume in this process (torch with the workers'
  thread count);
* daskrecon in memory: ``storage="memory"`` on ``--workers`` × ``--threads``;
* daskrecon out of core: ``storage="zarr"`` (iterate, sensitivity and halos through Zarr).

Reports seconds per iteration, Mvox/s and the ratios, and what bounds plain deepinv: its ``Blur.A`` and
``Blur.A_adjoint`` on the whole volume, timed apart (medians of 3). Writes
benchmarks/results/richardson_lucy.json.

    python benchmarks/bench_richardson_lucy.py [--size 192] [--chunk 96] [--iterations 4]
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


def _counts(block, photons, block_info=None):
    import numpy as np

    rng = np.random.default_rng([11, *block_info[0]["chunk-location"]])
    return (rng.poisson(photons * np.clip(block, 0, None)) / photons).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--chunk", type=int, default=96)
    p.add_argument("--photons", type=float, default=200.0)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import dask.array as da
    import deepinv as dinv
    import numpy as np
    import torch
    from deepinv.physics.functional import gaussian_blur

    import daskrecon as dr
    from daskrecon.demo import demo_volume

    n = args.size
    voxels = n ** 3
    psf = gaussian_blur(psf_size=(9, 7, 7), sigma=(2.0, 1.2, 1.2))
    blur = dinv.physics.Blur(filter=psf, padding="reflect")
    work = tempfile.mkdtemp(prefix="daskrecon-rl-bench-")
    res: dict = {"volume": f"{n}^3 float32 ({voxels * 4 / 2**20:.0f} MiB)", "chunk": args.chunk,
                 "operator": "3-D Blur 9x7x7 Gaussian, reflect padding", "photons": args.photons,
                 "workers": args.workers, "threads_per_worker": args.threads, "machine": machine()}
    try:
        with dr.DistributedContext(n_workers=args.workers, threads_per_worker=args.threads,
                                   dashboard_address="127.0.0.1:0") as ctx, ctx.client.as_current():
            physics = dr.distribute([blur], ctx)
            x_true = demo_volume((n, n, n), chunks=args.chunk, seed=3) + 0.02
            path = os.path.join(work, "counts.zarr")
            physics.A(x_true)[0].map_blocks(_counts, args.photons, dtype=np.float32).to_zarr(path)
            y = da.from_zarr(path)
            y_t = torch.from_numpy(y.compute())

            torch.set_num_threads(args.workers * args.threads)
            t0 = time.perf_counter()
            dinv.optim.MLEM(max_iter=1)(y_t, blur)
            t1 = time.perf_counter()
            dinv.optim.MLEM(max_iter=1 + args.iterations)(y_t, blur)
            t2 = time.perf_counter()
            # each call computes the sensitivity once: the difference is the iterations alone
            s = ((t2 - t1) - (t1 - t0)) / args.iterations
            res["plain_deepinv"] = {"seconds_per_iteration": s, "mvox_per_second": voxels / 1e6 / s}
            print(f"plain deepinv MLEM, one process: {s:.2f} s/iteration, {voxels / 1e6 / s:.2f} Mvox/s", flush=True)
            x_t = torch.from_numpy(x_true.compute())
            for method in ("A", "A_adjoint"):
                runs = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    getattr(blur, method)(x_t)
                    runs.append(time.perf_counter() - t0)
                res["plain_deepinv"][f"seconds_{method}"] = sorted(runs)[1]
            print(f"  its Blur.A: {res['plain_deepinv']['seconds_A']:.2f} s, Blur.A_adjoint: "
                  f"{res['plain_deepinv']['seconds_A_adjoint']:.2f} s on the whole volume", flush=True)

            for name, storage in (("in_memory", "memory"), ("out_of_core", "zarr")):
                stamps = [time.perf_counter()]
                dr.reconstruct(physics, [y], None, algorithm="mlem", n_iter=1 + args.iterations, storage=storage,
                               chunks=(args.chunk,) * 3, progress=False,
                               checkpoint=os.path.join(work, "ck") if storage == "zarr" else None, overwrite=True,
                               callback=lambda k, x: stamps.append(time.perf_counter()))
                steady = [b - a for a, b in zip(stamps[1:-1], stamps[2:])]  # after the first (start + warm-up)
                s = sum(steady) / len(steady)
                res[name] = {"seconds_per_iteration": s, "mvox_per_second": voxels / 1e6 / s, "iterations": steady}
                print(f"daskrecon {name}: {s:.2f} s/iteration, {voxels / 1e6 / s:.2f} Mvox/s", flush=True)
        res["ratio_out_of_core_vs_in_memory"] = res["out_of_core"]["mvox_per_second"] / res["in_memory"]["mvox_per_second"]
        res["ratio_in_memory_vs_plain_deepinv"] = (res["in_memory"]["mvox_per_second"]
                                                   / res["plain_deepinv"]["mvox_per_second"])
        print(f"out of core / in memory = {res['ratio_out_of_core_vs_in_memory']:.2f}; "
              f"in memory / plain deepinv = {res['ratio_in_memory_vs_plain_deepinv']:.2f} (throughput)")
        print("wrote", write("richardson_lucy", res))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
