"""Tiled denoising: untiled model, deepinv.distributed and daskrecon on the same image.

Cases (``--case``):

* ``drunet``: DRUNet (random weights) on 1×3×512×512, patch 256, overlap 32;
* ``dncnn``: DnCNN (random weights, depth 20) on 1×3×1024×1024, patch 256, overlap 20
  (its receptive radius: exact tiling);
* ``ooc``: out of core: a 1×1×16384×16384 float32 Zarr image (1 GiB) denoised by a small
  CNN into another Zarr array by 2 workers limited to 1 GiB each; reports the workers'
  peak memory.

For the first two, every variant runs in this one command: the untiled model call (one
process, all cores), deepinv.distributed in one process and under torchrun ×2 (gloo), and
daskrecon on 2 worker processes, in fp32 and with the tiles in bf16 (``precision="bf16"``,
its error against fp32 reported). Printed: medians, ratio to the best deepinv.distributed
time, and efficiency = untiled time ÷ daskrecon time. Results: benchmarks/results/tiling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, peak_rss_mib, reset_peak_rss, rss_mib, run_deepinv_distributed, table, timeit, write  # noqa: E402
from _models import make_model  # noqa: E402

CASES = {"drunet": dict(size=512, patch=256, overlap=32), "dncnn": dict(size=1024, patch=256, overlap=20)}


def deepinv_distributed(nproc: int, model: str, size: int, patch: int, overlap: int, repeats: int) -> dict:
    opts = ["--model", model, "--size", str(size), "--patch", str(patch), "--overlap", str(overlap),
            "--repeats", str(repeats)]
    return run_deepinv_distributed("_deepinv_distributed_tiling.py", nproc, opts)


def run_case(name: str, repeats: int, workers: int) -> dict:
    import torch

    import daskrecon as dr

    cfg = CASES[name]
    model, sigma = make_model(name)
    args = () if sigma is None else (sigma,)
    x = torch.rand(1, 3, cfg["size"], cfg["size"], generator=torch.Generator().manual_seed(0))
    res: dict = {"config": cfg}
    with torch.no_grad():
        model(x[..., :64, :64], *args)
        untiled = timeit(lambda: model(x, *args), repeats, warmup=0)
    ref = untiled.pop("_out")
    res["untiled"] = untiled
    res["deepinv_distributed_1proc"] = deepinv_distributed(1, name, **cfg, repeats=repeats)
    res["deepinv_distributed_torchrun2"] = deepinv_distributed(2, name, **cfg, repeats=repeats)
    with dr.DistributedContext(n_workers=workers, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx:
        dden = dr.distribute(model, ctx, patch_size=cfg["patch"], overlap=cfg["overlap"])
        dden(x[..., : 2 * cfg["patch"], : 2 * cfg["patch"]].contiguous(), *args)  # loads the model on the workers
        d = timeit(lambda: dden(x, *args), repeats, warmup=0)
        out = d.pop("_out")
        d["max_abs_diff_vs_untiled"] = float((out - ref).abs().max())
        strategy = dden.strategy_for(x.shape)
        d["tiles"] = strategy.get_num_patches()
        d["processed_pixels_over_image_pixels"] = strategy.processed_pixels() / (cfg["size"] ** 2)
        res["daskrecon"] = d
        d16 = dr.distribute(model, ctx, patch_size=cfg["patch"], overlap=cfg["overlap"], precision="bf16")
        d16(x[..., : 2 * cfg["patch"], : 2 * cfg["patch"]].contiguous(), *args)  # the probe, the model loaded
        b = timeit(lambda: d16(x, *args), repeats, warmup=0)
        out16 = b.pop("_out")
        b["max_abs_diff_vs_fp32"] = float((out16 - out).abs().max())
        b["rel_l2_diff_vs_fp32"] = float((out16 - out).norm() / out.norm())
        b["probe"] = d16.precision_report["probe"]
        res["daskrecon_bf16"] = b
    for k in ("deepinv_distributed_1proc", "deepinv_distributed_torchrun2"):
        res[k]["max_abs_checksum_diff_vs_untiled"] = abs(res[k]["checksum"] - float(ref.double().sum()))
    best = min(res["deepinv_distributed_1proc"]["median_s"], res["deepinv_distributed_torchrun2"]["median_s"])
    res["ratio_daskrecon_vs_best_deepinv_distributed"] = d["median_s"] / best
    res["ratio_daskrecon_bf16_vs_best_deepinv_distributed"] = b["median_s"] / best
    res["efficiency_untiled_over_daskrecon"] = untiled["median_s"] / d["median_s"]
    # Halo cost removed: the untiled model's time for as many pixels as daskrecon processes.
    res["efficiency_after_halo"] = res["efficiency_untiled_over_daskrecon"] * d["processed_pixels_over_image_pixels"]
    rows = [("untiled model call (1 process)", untiled["median_s"]),
            ("deepinv.distributed (1 process)", res["deepinv_distributed_1proc"]["median_s"]),
            ("deepinv.distributed (torchrun x2, gloo)", res["deepinv_distributed_torchrun2"]["median_s"]),
            (f"daskrecon ({workers} workers)", d["median_s"]),
            (f"daskrecon ({workers} workers), tiles in bf16", b["median_s"])]
    print(f"\n{name}: 1x3x{cfg['size']}^2, patch {cfg['patch']}, overlap {cfg['overlap']}, median of {repeats}")
    print(table(rows, best))
    print(f"daskrecon / best deepinv.distributed = {res['ratio_daskrecon_vs_best_deepinv_distributed']:.2f}; "
          f"efficiency (untiled / daskrecon) = {res['efficiency_untiled_over_daskrecon']:.2f}, "
          f"{res['efficiency_after_halo']:.2f} after halo cost ({d['processed_pixels_over_image_pixels']:.2f}x pixels); "
          f"max |daskrecon - untiled| = {d['max_abs_diff_vs_untiled']:.1e}")
    print(f"bf16: {res['ratio_daskrecon_bf16_vs_best_deepinv_distributed']:.2f}x best deepinv.distributed; vs fp32: "
          f"max {b['max_abs_diff_vs_fp32']:.1e}, relative L2 {b['rel_l2_diff_vs_fp32']:.1e}")
    return res


def run_out_of_core(size: int, workers: int, memory_limit: str, chunk: int) -> dict:
    import dask.array as da
    import zarr

    import daskrecon as dr

    import dask

    model, _ = make_model("tiny")
    tmp = tempfile.mkdtemp(prefix="daskrecon-ooc-")
    # An idle worker already holds ~740 MiB RSS (torch's CUDA build), above dask's default
    # pause threshold (80 % of 1 GiB): workers would pause for good. Keep the hard limit
    # (the nanny kills a worker above 98 % of 1 GiB) but pause at 92 %.
    thresholds = {"distributed.worker.memory.pause": 0.92, "distributed.worker.memory.terminate": 0.98}
    try:
        with dask.config.set(thresholds), dr.DistributedContext(n_workers=workers, threads_per_worker=1, memory_limit=memory_limit,
                                   dashboard_address="127.0.0.1:0") as ctx, ctx.client.as_current():
            src, dst = os.path.join(tmp, "in.zarr"), os.path.join(tmp, "out.zarr")
            t0 = time.perf_counter()
            noisy = da.random.default_rng(0).random((1, 1, size, size), chunks=(1, 1, chunk, chunk), dtype="f4")
            noisy.to_zarr(src)
            t_write = time.perf_counter() - t0
            ctx.client.run(lambda: __import__("gc").collect())
            base = ctx.client.run(rss_mib)
            ctx.client.run(reset_peak_rss)  # the peak below is the denoising pass's
            dden = dr.distribute(model, ctx, patch_size=512, overlap=8, max_batch_size=1)
            t0 = time.perf_counter()
            lazy = dden(da.from_zarr(src))
            lazy.to_zarr(dst)
            t_denoise = time.perf_counter() - t0
            peak = ctx.client.run(peak_rss_mib)
            z = zarr.open_array(dst)
            corner = z[0, 0, :256, :256]
            with __import__("torch").no_grad():
                import torch

                ref = model(torch.from_numpy(zarr.open_array(src)[:, :, :300, :300]))[0, 0, :256, :256].numpy()
            err = float(abs(corner - ref).max())
        res = {
            "image": f"1x1x{size}x{size} float32 ({size * size * 4 / 2**30:.2f} GiB)",
            "workers": workers, "memory_limit_per_worker": memory_limit, "chunk": chunk,
            "seconds_write_input": t_write, "seconds_denoise_to_zarr": t_denoise,
            "megapixels_per_s": size * size / 1e6 / t_denoise,
            "worker_peak_rss_mib": sorted(peak.values()), "worker_rss_before_denoising_mib": sorted(base.values()),
            "memory_thresholds": thresholds,
            "corner_max_abs_diff_vs_untiled": err,
        }
        print(f"\nout of core: {res['image']} -> Zarr, {workers} workers x {memory_limit}: "
              f"{t_denoise:.1f} s ({res['megapixels_per_s']:.1f} Mpx/s), worker peak RSS {res['worker_peak_rss_mib']} MiB, "
              f"corner error {err:.1e}")
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["drunet", "dncnn", "ooc", "all"], default="all")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ooc-size", type=int, default=16384)
    p.add_argument("--ooc-chunk", type=int, default=1024)
    p.add_argument("--memory-limit", default="1GiB")
    p.add_argument("--out", default="tiling")
    args = p.parse_args()
    results: dict = {"machine": machine()}
    path = os.path.join(os.path.dirname(__file__), "results", f"{args.out}.json")
    if os.path.exists(path):
        results.update(json.load(open(path)))  # keep the other cases of an earlier run
    for case in ("drunet", "dncnn"):
        if args.case in (case, "all"):
            results[case] = run_case(case, args.repeats, args.workers)
    if args.case in ("ooc", "all"):
        results["out_of_core"] = run_out_of_core(args.ooc_size, args.workers, args.memory_limit, args.ooc_chunk)
    print("wrote", write(args.out, results))


if __name__ == "__main__":
    main()
