"""Parallel-beam CT of a volume streamed slab by slab (``dr.slicewise``): out of core against in memory, one run.

A synthetic volume (:func:`daskrecon.demo.demo_volume`, made chunk by chunk) of ``--width``² slices
is projected slice by slice by deepinv's ``Tomography`` (``--angles`` angles over 180°,
``normalize=True``) into sinograms written to Zarr, chunked by slabs of ``--slab`` slices, then
reconstructed by ``daskrecon.reconstruct`` with ``algorithm=--algorithm`` (SIRT by default) from
``da.from_zarr``, on ``--workers`` worker(s) with ``--threads`` threads and a ``--memory-limit``:

* in memory: a ``--small``-slice volume with ``storage="memory"``, timed after its first iteration;
* out of core: a volume ``--times`` the workers' total memory limit with ``storage="zarr"``: the start and
  the first iteration, then one more iteration in a resumed run (timed: the steady iteration);
* plain deepinv: ``SIRT`` iterations on the in-memory volume in this process (one worker's threads),
  through the same ``Slicewise`` physics (deepinv's projector on every slice, no Dask) — for
  ``--algorithm sirt`` only.

``--denoiser 3d`` gives the reconstruction the bundled 3-D DnCNN (tiles of one slab, or of ``--patch-depth`` slices, overlap 4;
``--one-task-per-worker``: one tile task at a time per worker, with both threads' torch threads), for
``--algorithm pnp`` / ``fista`` / ``os-pnp``. ``--angle-subsets K`` splits the angles into ``K``
interleaved subsets (subset ``k``: angles ``k, k + K, …``), one slice-wise operator and one sinogram
array each — the ordered subsets of ``--algorithm osem`` / ``os-pnp`` (``n_subsets=K``).

The workers release the pages of the CUDA libraries that torch's CUDA build maps and a CPU worker
never uses (``daskrecon.context.release-gpu-libraries``, 233 MiB each here); ``--keep-gpu-libraries``
keeps them resident, as before that release existed.

Reports seconds per iteration, Mvox/s, each run's peak worker RSS against the limit, and the
ratios. Writes benchmarks/results/ct_ooc.json.

    python benchmarks/bench_ct_ooc.py [--times 4] [--memory-limit 1.5GiB] [--width 128] [--angles 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write
from bench_ooc_pnp import peak_rss_mib, reset_peak_rss, rss_mib


def _released_gpu_pages(dask_worker=None) -> int | None:
    from daskrecon.runtime.memory_trim import ReleaseGpuLibraries

    return getattr(dask_worker.plugins.get(ReleaseGpuLibraries.name), "released", None)


def _operators(args) -> list:
    """One slice-wise parallel-beam projector per angle subset (all the angles when there is one subset)."""
    import deepinv as dinv
    import torch

    import daskrecon as dr

    angles = torch.linspace(0, 180, steps=args.angles + 1)[:-1]
    k = args.angle_subsets
    return [dr.slicewise(dinv.physics.Tomography(angles=angles[s::k].clone(), img_width=args.width, circle=False,
                                                 normalize=True)) for s in range(k)]


def _sinograms(work: str, depth: int, args, op, subset: int = 0) -> tuple[float, str]:

    from daskrecon.demo import demo_volume
    from daskrecon.operators.chunkwise import local_form

    t0 = time.perf_counter()
    where = os.path.join(work, f"sino-{depth}x{args.width}-{args.angles}-{subset}of{args.angle_subsets}.zarr")
    if not os.path.exists(where + ".done"):
        x_true = demo_volume((depth, args.width, args.width), chunks=(args.slab, args.width, args.width), seed=5)
        local_form(op).apply(x_true).to_zarr(where, overwrite=True)
        open(where + ".done", "w").close()
    return time.perf_counter() - t0, where


def _reconstruct(ctx, dphys, dden, y, storage: str, args, work: str) -> dict:
    """In memory: ``--iterations`` iterations, timed after the first. Out of core: the start and the first
    iteration in one run, then the next in a resumed run — its time is one iteration (plus the resume:
    planning, the inputs' NaN check), so the start (two back-projections) is not averaged in."""
    import daskrecon as dr

    ctx.client.run(lambda: __import__("gc").collect())
    idle = ctx.client.run(rss_mib)
    ctx.client.run(reset_peak_rss)
    kw = dict(algorithm=args.algorithm, storage=storage, chunks=(args.slab, args.width, args.width), progress=False,
              return_history=True)
    if args.n_subsets:
        kw["n_subsets"] = args.n_subsets
    stamps = [time.perf_counter()]
    if storage == "memory":
        _, history = dr.reconstruct(dphys, y, dden, n_iter=args.iterations, **kw,
                                    callback=lambda k, x: stamps.append(time.perf_counter()))
        per_iter = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
        steady = per_iter[1:] or per_iter
        extra = {}
    else:
        ck = os.path.join(work, "ckpt-zarr")
        dr.reconstruct(dphys, y, dden, n_iter=1, checkpoint=ck, overwrite=True, **kw)
        t1 = time.perf_counter()
        _, history = dr.reconstruct(dphys, y, dden, n_iter=2, checkpoint=ck, resume=True, **kw)
        t2 = time.perf_counter()
        per_iter, steady = [t1 - stamps[0], t2 - t1], [t2 - t1]
        extra = {"seconds_start_and_first_iteration": t1 - stamps[0],
                 "seconds_resumed_second_iteration": t2 - t1}
    peak = ctx.client.run(peak_rss_mib)
    depth = y[0].shape[2]  # y: one (1, 1, D, detectors, angles) sinogram per operator
    voxels = depth * args.width ** 2
    s = sum(steady) / len(steady)
    return {"storage": storage, "volume": f"{depth}x{args.width}x{args.width} float32 "
                                          f"({voxels * 4 / 2**30:.2f} GiB)",
            "seconds_per_iteration": per_iter, "steady_seconds_per_iteration": s, "mvox_per_second": voxels / 1e6 / s,
            "worker_idle_rss_mib": sorted(idle.values()), "worker_peak_rss_mib": sorted(peak.values()), **extra,
            "history": [{k: v for k, v in h.items() if k in ("iteration", "data_fidelity", "relative_change")}
                        for h in history]}


def _plain_deepinv(op, depth: int, args, threads: int) -> dict:
    import deepinv as dinv
    import torch

    from daskrecon.demo import demo_volume

    torch.set_num_threads(threads)
    x_true = torch.from_numpy(demo_volume((depth, args.width, args.width),
                                          chunks=(args.slab, args.width, args.width), seed=5).compute())
    y = op.A(x_true)
    t = []
    for _ in range(3):  # SIRT computes its normalizers once per call: the difference of two calls is 2 iterations
        t0 = time.perf_counter()
        dinv.optim.SIRT(max_iter=1)(y, op)
        t1 = time.perf_counter()
        dinv.optim.SIRT(max_iter=3)(y, op)
        t.append(((time.perf_counter() - t1) - (t1 - t0)) / 2)
    s = sorted(t)[1]
    return {"seconds_per_iteration": s, "mvox_per_second": depth * args.width ** 2 / 1e6 / s, "runs": t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--times", type=float, default=4.0, help="out-of-core volume / total worker memory limit")
    p.add_argument("--small", type=int, default=512, help="slices of the in-memory volume")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--angles", type=int, default=16)
    p.add_argument("--slab", type=int, default=64, help="slices per chunk")
    p.add_argument("--patch-depth", type=int, default=None,
                   help="slices per tile of the 3-D denoiser (default: the slab); a thinner tile holds fewer activations")
    p.add_argument("--one-task-per-worker", action="store_true",
                   help="the 3-D denoiser's tile tasks one at a time per worker, with both threads' torch threads")
    p.add_argument("--keep-gpu-libraries", action="store_true",
                   help="workers keep the CUDA libraries' pages resident (daskrecon.context.release-gpu-libraries)")
    p.add_argument("--algorithm", default="sirt")
    p.add_argument("--denoiser", choices=("none", "3d"), default="none")
    p.add_argument("--n-subsets", type=int, default=None)
    p.add_argument("--angle-subsets", type=int, default=1, help="operators, each an interleaved subset of the angles")
    p.add_argument("--iterations", type=int, default=3, help="in memory (timed after the first)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-limit", default="2GiB")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*normalize.*")

    import dask
    import dask.array as da
    from dask.utils import parse_bytes

    import daskrecon as dr

    limit_total = args.workers * parse_bytes(args.memory_limit)
    patch_depth = args.patch_depth or args.slab
    depth = -(-int(args.times * limit_total / (4 * args.width ** 2)) // args.slab) * args.slab
    if args.angle_subsets < 1 or args.angles % args.angle_subsets:
        p.error("--angle-subsets must divide --angles")
    ops = _operators(args)
    work = args.dir or tempfile.mkdtemp(prefix="daskrecon-ct-ooc-")
    thresholds = {"distributed.worker.memory.target": 0.25, "distributed.worker.memory.spill": 0.8,
                  "distributed.worker.memory.pause": 0.92, "distributed.worker.memory.terminate": 0.98}
    res: dict = {"workers": args.workers, "threads_per_worker": args.threads, "memory_limit_per_worker": args.memory_limit,
                 "operator": f"dr.slicewise(Tomography(angles={args.angles}, img_width={args.width}, normalize=True))"
                             + (f", angles in {args.angle_subsets} interleaved subsets (one operator each)"
                                if args.angle_subsets > 1 else ""),
                 "algorithm": args.algorithm, "denoiser": args.denoiser, "slab": args.slab,
                 **({"denoiser_tile_depth": patch_depth, "denoiser_one_task_per_worker": args.one_task_per_worker}
                    if args.denoiser != "none" else {}), "machine": machine()}
    try:
        if args.algorithm == "sirt" and len(ops) == 1:
            res["plain_deepinv_in_memory"] = r = _plain_deepinv(ops[0], args.small, args, args.workers * args.threads)
            print(f"plain deepinv SIRT, {args.small} slices in one process: {r['seconds_per_iteration']:.2f} "
                  f"s/iteration, {r['mvox_per_second']:.2f} Mvox/s", flush=True)
        release = {"daskrecon.context.release-gpu-libraries": not args.keep_gpu_libraries}
        with dask.config.set({**thresholds, **release}), dr.DistributedContext(
            n_workers=args.workers, threads_per_worker=args.threads, memory_limit=args.memory_limit,
            dashboard_address="127.0.0.1:0",
        ) as ctx, ctx.client.as_current():
            res["gpu_library_pages_released_mib"] = sorted(
                round((v or 0) / 2**20) for v in ctx.client.run(_released_gpu_pages).values())
            dphys = dr.distribute(ops, ctx)
            dden = None
            if args.denoiser == "3d":
                from daskrecon.models import bundled_denoiser_3d
                dden = dr.distribute(bundled_denoiser_3d(), ctx, patch_size=(patch_depth, args.width, args.width),
                                     overlap=4, max_batch_size=1, one_task_per_worker=args.one_task_per_worker)
            for name, d, storage in (("in_memory", args.small, "memory"), ("out_of_core", depth, "zarr")):
                t_in, paths = 0.0, []
                for k, op in enumerate(ops):
                    t, path = _sinograms(work, d, args, op, k)
                    t_in, paths = t_in + t, [*paths, path]
                y = [da.from_zarr(path) for path in paths]
                vol = d * args.width ** 2 * 4
                print(f"{name}: {d} slices of {args.width}² = {vol / 2**30:.2f} GiB = {vol / limit_total:.2f}x the "
                      f"workers' memory limit; sinograms written in {t_in:.0f} s", flush=True)
                r = _reconstruct(ctx, dphys, dden, y, storage, args, work)
                r["seconds_write_sinograms"] = t_in
                r["times_total_worker_memory_limit"] = vol / limit_total
                res[name] = r
                print(f"  {r['steady_seconds_per_iteration']:.1f} s/iteration, {r['mvox_per_second']:.2f} Mvox/s, "
                      f"peak worker RSS {r['worker_peak_rss_mib']} MiB (idle {r['worker_idle_rss_mib']}) of "
                      f"{args.memory_limit}", flush=True)
        res["ratio_out_of_core_vs_in_memory"] = res["out_of_core"]["mvox_per_second"] / res["in_memory"]["mvox_per_second"]
        print(f"out of core / in memory per-voxel throughput = {res['ratio_out_of_core_vs_in_memory']:.2f}")
        if "plain_deepinv_in_memory" in res:
            res["ratio_in_memory_vs_plain_deepinv"] = (res["in_memory"]["mvox_per_second"]
                                                       / res["plain_deepinv_in_memory"]["mvox_per_second"])
            print(f"in memory / plain deepinv = {res['ratio_in_memory_vs_plain_deepinv']:.2f}")
        name = "ct_ooc" if args.algorithm == "sirt" and args.denoiser == "none" else f"ct_ooc_{args.algorithm}"
        name += f"_{args.angle_subsets}subsets" if args.angle_subsets > 1 else ""
        name += "_one_task" if args.one_task_per_worker else ""
        name += "_keep_gpu_libraries" if args.keep_gpu_libraries else ""
        name += f"_times{args.times:g}" if args.times != 4 else ""  # the size (4×) keeps the plain name
        print("wrote", write(name, res))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
