"""CT: SIRT and OSEM per iteration — daskrecon (2 workers) against plain deepinv (one process) and ASTRA's CPU SIRT.

A parallel-beam CT "volume" of ``--slices`` axial slices of ``--size``² (the astronaut's grey
levels, shifted per slice), ``--angles`` angles over 180°, noiseless sinograms. Every variant
runs ``--iterations`` iterations on the same data, in the same run:

* **daskrecon** (2 workers, 1 thread each): the slices in deepinv's batch axis, the angles held as
  ``--operators`` interleaved ``Tomography`` operators (whole-image, each on its worker);
  ``algorithm="sirt"`` (τ 1) and ``algorithm="osem"`` (one subset per operator);
* **daskrecon slice by slice**: the same slices as a volume ``(1, 1, D, n, n)``, each operator
  ``dr.slicewise(Tomography(...))``, the volume in slabs of ``--slab`` slices spread over the workers
  (SIRT: one operator with every angle; OSEM: the ``--operators`` subsets);
* **plain deepinv**, one process, 2 threads: ``deepinv.optim.SIRT`` on one ``Tomography`` with every
  angle (its own object, as it ships), and ``deepinv.optim.OSEM`` on the same operators pre-split;
* **ASTRA toolbox**, CPU (``astra-toolbox``; its 2-D ``linear`` parallel-beam projector), SIRT run
  slice by slice, one thread (ASTRA's CPU SIRT is single-threaded).

deepinv's ``Tomography`` (a rotation-and-sum projector on the torch side) and ASTRA's (a line-integral
projector in C++) are different implementations of the same geometry: the comparison is seconds for
the same problem size and iterations, not bit-for-bit work. Reports seconds per iteration, voxels
per second and the ratios; writes benchmarks/results/ct_sirt.json.

    pip install astra-toolbox   # for the ASTRA variant (skipped, with a note, without it)
    python benchmarks/bench_ct_sirt.py [--size 256] [--slices 8] [--angles 180] [--iterations 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--angles", type=int, default=180)
    p.add_argument("--operators", type=int, default=12)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--slab", type=int, default=4, help="slices per chunk (slice-by-slice variants)")
    args = p.parse_args()

    import deepinv as dinv
    import numpy as np
    import torch

    import daskrecon as dr
    from daskrecon.demo import demo_image

    n, d, k = args.size, args.slices, args.iterations
    base = demo_image(n).mean(1, keepdim=True)
    x_true = torch.cat([(base + 0.02 * s) / (1 + 0.02 * d) for s in range(d)])  # (D, 1, n, n)
    angles = torch.linspace(0, 180, args.angles + 1)[:-1]

    def ops():
        return [dinv.physics.Tomography(angles=angles[j::args.operators], img_width=n, circle=False)
                for j in range(args.operators)]

    with torch.no_grad():
        y = dinv.utils.TensorList([op.A(x_true) for op in ops()])
    voxels = x_true.numel()
    results = []

    def row(name, seconds, iterations, **extra):
        per_it = seconds / iterations
        results.append({"variant": name, "seconds": seconds, "iterations": iterations, "seconds_per_iteration": per_it,
                        "mvox_per_s": voxels / per_it / 1e6, **extra})
        print(f"{name:48s} {per_it:7.3f} s/iteration  {voxels / per_it / 1e6:7.2f} Mvox/s", flush=True)

    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx:
        dphys = dr.distribute(ops(), ctx)
        for algorithm, kw in (("sirt", {}), ("osem", {"n_subsets": args.operators})):
            dr.reconstruct(dphys, y, None, algorithm=algorithm, n_iter=1, progress=False, **kw)  # warm: operators built
            stamps = []
            t0 = time.perf_counter()
            dr.reconstruct(dphys, y, None, algorithm=algorithm, n_iter=k + 1, progress=False,
                           callback=lambda i, x: stamps.append(time.perf_counter()), **kw)
            # iterations after the first (the first includes the start: sensitivities, column sums)
            row(f"daskrecon {algorithm}, 2 workers", stamps[-1] - stamps[0], k,
                first_s=stamps[0] - t0)
        # slice by slice: the slices as a volume, slabs over the workers
        volume = x_true.transpose(0, 1).unsqueeze(0)  # (1, 1, D, n, n)
        for algorithm, sw_ops, kw in (
                ("sirt", [dr.slicewise(dinv.physics.Tomography(angles=angles, img_width=n, circle=False))], {}),
                ("osem", [dr.slicewise(op) for op in ops()], {"n_subsets": args.operators})):
            with torch.no_grad():
                y_sw = [op.A(volume) for op in sw_ops]
            dsw = dr.distribute(sw_ops, ctx)
            opts = dict(algorithm=algorithm, progress=False, chunks=(args.slab, n, n), **kw)
            dr.reconstruct(dsw, y_sw, None, n_iter=1, **opts)  # warm: operators built on the workers
            stamps = []
            t0 = time.perf_counter()
            dr.reconstruct(dsw, y_sw, None, n_iter=k + 1, callback=lambda i, x: stamps.append(time.perf_counter()),
                           **opts)
            row(f"daskrecon {algorithm}, slice by slice, 2 workers", stamps[-1] - stamps[0], k,
                first_s=stamps[0] - t0)

    torch.set_num_threads(2)
    full = dinv.physics.Tomography(angles=angles, img_width=n, circle=False)
    with torch.no_grad():
        y_full = full.A(x_true)
        dinv.optim.SIRT(max_iter=1)(y_full, full)
        t0 = time.perf_counter()
        dinv.optim.SIRT(max_iter=k)(y_full, full)
        row("plain deepinv SIRT (one operator, all angles)", time.perf_counter() - t0, k)
        split = dinv.physics.StackedLinearPhysics(ops())
        osem = dinv.optim.OSEM(max_iter=k // args.operators or 1)
        t0 = time.perf_counter()
        osem(y, split)
        # deepinv's OSEM iteration is an epoch over every subset; ours one subset: per subset update
        row("plain deepinv OSEM (per subset update)", time.perf_counter() - t0,
            (k // args.operators or 1) * args.operators)

    try:
        import astra
    except ImportError:
        print("ASTRA: not installed (pip install astra-toolbox); its variant is left out")
    else:
        vol = astra.create_vol_geom(n, n)
        proj = astra.create_proj_geom("parallel", 1.0, int(np.ceil(n * np.sqrt(2))), np.deg2rad(angles.numpy()))
        pid = astra.create_projector("linear", proj, vol)
        total = 0.0
        for s in range(d):
            sid, _ = astra.create_sino(x_true[s, 0].numpy(), pid)
            rid = astra.data2d.create("-vol", vol, 0)
            cfg = astra.astra_dict("SIRT")
            cfg.update(ProjectorId=pid, ProjectionDataId=sid, ReconstructionDataId=rid)
            aid = astra.algorithm.create(cfg)
            t0 = time.perf_counter()
            astra.algorithm.run(aid, k)
            total += time.perf_counter() - t0
            astra.algorithm.delete(aid)
            astra.data2d.delete([sid, rid])
        astra.projector.delete(pid)
        row("ASTRA CPU SIRT, slice by slice (1 thread)", total, k)
    ref = next(r for r in results if r["variant"].startswith("plain deepinv SIRT"))["seconds_per_iteration"]
    for r in results:
        r["ratio_to_deepinv_sirt"] = r["seconds_per_iteration"] / ref
    print("÷ plain deepinv SIRT per iteration: " + ", ".join(f"{r['variant']} {r['ratio_to_deepinv_sirt']:.2f}"
                                                              for r in results))
    write("ct_sirt", {"machine": machine(), "args": vars(args), "voxels": voxels, "results": results})


if __name__ == "__main__":
    main()
