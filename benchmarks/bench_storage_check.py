"""What checking that the workers share the storage costs, on workers that do (the same machine).

Before the first write to a checkpoint or scratch folder, daskrecon writes a probe file there
and every worker reads it back (``daskrecon.runtime.storage.check_shared``). This times, in one run:

- the probe alone, on a fresh folder each time (median of ``--probes``);
- the check that every worker opens the user's Zarr inputs (``check_sources_seen``: each worker
  reads each array's metadata; three inputs of 2048² in chunks of 128² and of 16², median of ``--probes``);
- reading those inputs (their sum, 3 × 256 chunks) plainly and through the strict sources that check a
  worker which joins later (``strict_sources``: each worker process opens each array once, here anew
  before every read — the worst case), interleaved, median of ``--probes``;
- an out-of-core PnP reconstruction (3 circular blurs + DnCNN, ``storage="zarr"`` into a new
  checkpoint folder each run) with the check, and the same with ``check_shared`` replaced by a
  no-op, interleaved, median of ``--repeats``; the ratio is printed.

    python benchmarks/bench_storage_check.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import blur_problem, machine, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--out", default="storage_check")
    args = p.parse_args()

    import dask.array as da
    import torch
    from deepinv.models import DnCNN
    from fsspec.implementations.local import LocalFileSystem

    import daskrecon as dr
    from daskrecon.runtime import storage

    ops, _, y = blur_problem(3, args.size)
    ys = [da.from_array(t.numpy(), chunks=(1, 3, args.size // 2, args.size // 2)) for t in y]
    torch.manual_seed(0)
    model = DnCNN(3, 3, depth=6, nf=16, pretrained=None).eval()
    results: dict = {"workload": vars(args), "machine": machine()}
    real_check = storage.check_shared
    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx, \
            tempfile.TemporaryDirectory(prefix="daskrecon-bench-") as tmp:
        fs = LocalFileSystem()
        probes = []
        for k in range(args.probes):
            where = os.path.join(tmp, f"probe{k}")
            os.makedirs(where)
            probes.append(real_check(ctx, fs, where, where))
        results["probe_s"] = {"median_s": statistics.median(probes), "min_s": min(probes), "times_s": probes}
        results["inputs_check_s"] = {}
        for side in (128, 16):
            inputs = {}
            for i in range(3):
                where = os.path.join(tmp, f"input{side}-{i}.zarr")
                da.zeros((1, 3, 2048, 2048), chunks=(1, 3, side, side), dtype="f4").to_zarr(where)
                inputs[f"y[{i}]"] = da.from_zarr(where)
            storage.check_sources_seen(ctx, inputs)  # warm-up
            times = [storage.check_sources_seen(ctx, inputs) for _ in range(args.probes)]
            results["inputs_check_s"][f"3 inputs of {inputs['y[0]'].npartitions} chunks"] = {
                "median_s": statistics.median(times), "min_s": min(times)}
            if side == 128:
                results["inputs_read_s"] = read_times(ctx, inputs, args.probes)
        d = dr.distribute(ops, ctx)
        den = dr.distribute(model, ctx, patch_size=128, overlap=8)

        def run(tag: str) -> float:
            t0 = time.perf_counter()
            out = dr.reconstruct(d, ys, den, n_iter=args.iterations, step_size=0.5, progress=False, storage="zarr",
                                 checkpoint=os.path.join(tmp, tag))
            ctx.client.compute(out).result()
            return time.perf_counter() - t0

        run("warmup")
        timed: dict[str, list[float]] = {"with_check": [], "without_check": []}
        for k in range(args.repeats):
            timed["with_check"].append(run(f"with{k}"))
            storage.check_shared = lambda *a, **kw: 0.0  # the engine and the checkpoint call it through the module
            try:
                timed["without_check"].append(run(f"without{k}"))
            finally:
                storage.check_shared = real_check
    for name, times in timed.items():
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}
    ratio = results["with_check"]["median_s"] / results["without_check"]["median_s"]
    results["ratio_with_vs_without_check"] = ratio
    print(f"probe (write, every worker reads, remove), 2 local workers: median "
          f"{1000 * results['probe_s']['median_s']:.1f} ms of {args.probes}")
    for what, t in results["inputs_check_s"].items():
        print(f"inputs opened by every worker, {what}: median {1000 * t['median_s']:.1f} ms of {args.probes}")
    r = results["inputs_read_s"]
    print(f"3 inputs of 256 chunks read (summed): plain {1000 * r['plain']['median_s']:.1f} ms, through strict sources "
          f"opened anew {1000 * r['strict']['median_s']:.1f} ms (ratio {r['ratio_strict_vs_plain']:.3f}), median of "
          f"{args.probes}")
    print(f"out-of-core PnP {args.iterations} it., 1x3x{args.size}², new checkpoint folder, median of {args.repeats}: "
          f"with check {results['with_check']['median_s']:.3f} s, without {results['without_check']['median_s']:.3f} s "
          f"(ratio {ratio:.3f})")
    print("wrote", write(args.out, results))


def read_times(ctx, inputs: dict, repeats: int) -> dict:
    """Seconds to sum the inputs read plainly and through strict sources (each worker opening them anew)."""
    import dask.array as da

    from daskrecon.runtime import storage
    from daskrecon.tasks.storage import forget_opened

    plain = da.stack(list(inputs.values())).sum()
    strict = da.stack([storage.strict_sources(x) for x in inputs.values()]).sum()
    assert float(ctx.client.compute(plain).result()) == float(ctx.client.compute(strict).result())
    times: dict[str, list[float]] = {"plain": [], "strict": []}
    for _ in range(repeats):
        for name, x in (("plain", plain), ("strict", strict)):
            ctx.client.run(forget_opened)
            t0 = time.perf_counter()
            ctx.client.compute(x).result()
            times[name].append(time.perf_counter() - t0)
    out = {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t} for name, t in times.items()}
    out["ratio_strict_vs_plain"] = out["strict"]["median_s"] / out["plain"]["median_s"]
    return out


if __name__ == "__main__":
    main()
