"""Issue #29's benchmarks on one GPU: fp32, bf16 and fp16 tiles, against deepinv.distributed on the same GPU.

The CPU benchmarks' workloads, run where a CUDA device is (a lent H200 here; CI never runs this):

* **pnp** — ``bench_pnp.py``'s: PnP, 5 iterations, 3 circular blurs + DnCNN (random weights, patch
  256, overlap 20) on 1×3×512² and, to give the GPU work worth the name, 1×3×2048²:
  deepinv.distributed in one process on the GPU (its ``device_mode="gpu"``; with one GPU there is
  no second rank), plain deepinv untiled on the GPU, and ``daskrecon.reconstruct`` on one GPU
  worker (``DistributedContext(device_mode="gpu")``) with the tiles in fp32, bf16 and fp16;
* **accuracy** — the demo's problem (astronaut 512², 3 blurs, the bundled trained DnCNN, RED, 30
  iterations) reconstructed in fp32, bf16 and fp16 on the GPU worker: PSNR of each and the probe;
* **tiling** — ``bench_tiling.py``'s DRUNet on 1×3×512² (patch 256, overlap 32) and 1×3×2048²;
* **training** — ``bench_training.py``'s step (unrolled PGD, DnCNN prior, 1×3×256², patch 128,
  overlap 24) against deepinv.distributed on the GPU, in fp32, bf16 and fp16 (fp16 with the loss
  scale), with the loss over ``--curve-steps`` steps from the same start in each;
* **denoisers** — the bundled 2-D and 3-D DnCNNs called directly on the GPU in fp32, bf16, fp16:
  PSNR and error against fp32.

Every timed call ends with ``torch.cuda.synchronize()``. Results go to ``--out``
(default benchmarks/results/gpu.json), rewritten after each section, so a run cut short keeps
what it measured. ``--device-mode cpu --quick`` runs the same code on small inputs on the CPU
(a check of the script, not a measurement).

    python benchmarks/bench_gpu.py [--repeats 3] [--sections pnp,accuracy,tiling,training,denoisers]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, run_deepinv_distributed, timeit

PRECISIONS = ["fp32", "bf16", "fp16"]  # the CPU check (--device-mode cpu) drops fp16: CPUs here have no fp16 units


def _sync(out=None):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def _timed(fn, repeats: int) -> dict:
    """Median of ``repeats`` calls of ``fn`` after one warm-up, each waited for on the GPU."""
    return timeit(lambda: _sync(fn()), repeats, warmup=1)


def _ctx(args, **kw):
    import daskrecon as dr

    return dr.DistributedContext(device_mode=args.device_mode, dashboard_address="127.0.0.1:0",
                                 **({"n_workers": 1, "threads_per_worker": 1} if args.device_mode == "cpu" else {}),
                                 **kw)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _ratios(label: str, r: dict, untiled: str | None = None) -> None:
    """Each precision's time over deepinv.distributed's, into ``r`` and printed on one line."""
    best = r["deepinv_distributed_1proc"]["median_s"]
    for p in PRECISIONS:
        r[f"ratio_daskrecon_{p}_vs_deepinv_distributed"] = r[f"daskrecon_{p}"]["median_s"] / best
    plain = f", untiled {r[untiled]['median_s']:.3f} s" if untiled else ""
    print(f"{label}: deepinv.distributed {best:.3f} s{plain}, "
          + ", ".join(f"daskrecon {p} {r[f'daskrecon_{p}']['median_s']:.3f} s "
                      f"({r[f'ratio_daskrecon_{p}_vs_deepinv_distributed']:.2f}×)" for p in PRECISIONS), flush=True)


def env(args) -> dict:
    import torch

    from daskrecon.tasks.precision import supported

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, sm=p.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), supported=supported(torch.device("cuda")),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return out


def pnp(args) -> dict:
    import deepinv as dinv
    import torch
    from _pnp_problem import problem
    from deepinv.optim import L2

    import daskrecon as dr

    dev = torch.device("cuda" if args.device_mode == "gpu" else "cpu")
    res = {}
    for size in args.pnp_sizes:
        ops, y, model, x_true = problem(size)
        r: dict = {"size": size, "iterations": args.iterations}
        opts = ["--size", str(size), "--iterations", str(args.iterations), "--repeats", str(args.repeats),
                "--device-mode", args.device_mode]
        r["deepinv_distributed_1proc"] = run_deepinv_distributed("_deepinv_distributed_pnp.py", 1, opts)
        # plain deepinv, untiled, on the GPU: the same loop with the stacked physics and the bare network
        phys = dinv.physics.StackedLinearPhysics([copy.deepcopy(o).to(dev) for o in ops])
        net, yd, fid = copy.deepcopy(model).to(dev), y.to(dev), L2()

        def plain():
            x = torch.zeros_like(x_true, device=dev)
            with torch.no_grad():
                for _ in range(args.iterations):
                    x = net(x - 0.3 * fid.grad(x, yd, phys))
            return x

        t = _timed(plain, args.repeats)
        t.pop("_out")
        r["plain_deepinv_untiled"] = t
        with _ctx(args) as ctx:
            dphys = dr.distribute(ops, ctx)
            dden = dr.distribute(model, ctx, patch_size=256, overlap=20)
            outs = {}
            for p in PRECISIONS:
                run = lambda p=p: dr.reconstruct(dphys, y, dden, n_iter=args.iterations, step_size=0.3,
                                                 x0=torch.zeros_like(x_true), progress=False, precision=p)
                d = _timed(run, args.repeats)
                outs[p] = d.pop("_out").cpu()
                if p != "fp32":
                    d["rel_l2_diff_vs_fp32"] = _rel(outs[p], outs["fp32"])
                    d["max_abs_diff_vs_fp32"] = float((outs[p] - outs["fp32"]).abs().max())
                r[f"daskrecon_{p}"] = d
            x = torch.rand_like(x_true)
            dfid = dr.distribute(L2(), ctx)
            r["daskrecon_one_gradient_pass_s"] = _timed(lambda: dfid.grad(x, y, dphys), args.repeats)["median_s"]
            for p in PRECISIONS:
                dp = dr.distribute(model, ctx, patch_size=256, overlap=20, precision=p)
                with torch.no_grad():
                    r[f"daskrecon_{p}"]["one_denoiser_pass_s"] = _timed(lambda dp=dp: dp(x, 0.05),
                                                                        args.repeats)["median_s"]
                if p != "fp32":
                    r[f"daskrecon_{p}"]["probe"] = dp.precision_report
        r["checksum_diff_fp32_vs_deepinv_distributed"] = abs(float(outs["fp32"].double().sum())
                                                             - r["deepinv_distributed_1proc"]["checksum"])
        _ratios(f"pnp {size}²", r, "plain_deepinv_untiled")
        res[str(size)] = r
    return res


def accuracy(args) -> dict:
    import daskrecon as dr
    from daskrecon.demo import demo_problem
    from daskrecon.models import bundled_denoiser

    size = 512 if not args.quick else 64
    n_iter = 30 if not args.quick else 2
    x_true, ops, y = demo_problem(size)
    out = {"size": size, "algorithm": "red", "iterations": n_iter}
    with _ctx(args) as ctx:
        dphys = dr.distribute(ops, ctx)
        dden = dr.distribute(bundled_denoiser(), ctx, patch_size=256, overlap=8)
        for p in PRECISIONS:
            t0 = time.perf_counter()
            _, hist = dr.reconstruct(dphys, y, dden, algorithm="red", n_iter=n_iter, step_size=0.3, red_weight=0.3,
                                     x_true=x_true, progress=False, return_history=True, precision=p)
            out[f"seconds_{p}"] = time.perf_counter() - t0
            out[f"psnr_{p}"] = hist[-1]["psnr"]
            if p != "fp32":
                out[f"probe_rel_error_{p}"] = hist[-1].get("precision_rel_error")
    print("accuracy (demo problem, RED): " + ", ".join(f"{p} {out[f'psnr_{p}']:.2f} dB" for p in PRECISIONS), flush=True)
    return out


def tiling(args) -> dict:
    import torch
    from _models import make_model

    import daskrecon as dr

    dev = torch.device("cuda" if args.device_mode == "gpu" else "cpu")
    res = {}
    for size in args.tiling_sizes:
        model, sigma = make_model("drunet")
        patch, overlap = (256, 32) if not args.quick else (64, 8)
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        r: dict = {"size": size, "patch": patch, "overlap": overlap}
        r["deepinv_distributed_1proc"] = run_deepinv_distributed(
            "_deepinv_distributed_tiling.py", 1, ["--model", "drunet", "--size", str(size), "--patch", str(patch),
                                                  "--overlap", str(overlap), "--repeats", str(args.repeats),
                                                  "--device-mode", args.device_mode])
        net, xd = copy.deepcopy(model).to(dev), x.to(dev)
        with torch.no_grad():
            t = _timed(lambda: net(xd, sigma), args.repeats)
        ref = t.pop("_out").cpu()
        r["untiled"] = t
        with _ctx(args) as ctx:
            outs = {}
            for p in PRECISIONS:
                dp = dr.distribute(model, ctx, patch_size=patch, overlap=overlap, precision=p)
                with torch.no_grad():
                    d = _timed(lambda dp=dp: dp(x, sigma), args.repeats)
                outs[p] = d.pop("_out").cpu()
                d["max_abs_diff_vs_untiled_fp32"] = float((outs[p] - ref).abs().max())
                if p != "fp32":
                    d["rel_l2_diff_vs_fp32"] = _rel(outs[p], outs["fp32"])
                    d["probe"] = dp.precision_report
                r[f"daskrecon_{p}"] = d
        _ratios(f"tiling DRUNet {size}²", r, "untiled")
        res[str(size)] = r
    return res


def training(args) -> dict:
    import torch
    from _training_problem import problem, train_step

    import daskrecon as dr

    size, patch, overlap = (256, 128, 24) if not args.quick else (64, 32, 8)
    depth, nf = (20, 64) if not args.quick else (4, 8)
    ops, y, x_true, build = problem(size, depth, nf, 3)
    r: dict = {"size": size, "depth": depth, "nf": nf, "unroll": 3, "patch": patch, "overlap": overlap}
    r["deepinv_distributed_1proc"] = run_deepinv_distributed(
        "_deepinv_distributed_training.py", 1, ["--size", str(size), "--depth", str(depth), "--nf", str(nf),
                                                "--unroll", "3", "--patch", str(patch), "--overlap", str(overlap),
                                                "--repeats", str(args.repeats), "--device-mode", args.device_mode])
    with _ctx(args) as ctx:
        dphys = dr.distribute(ops, ctx)
        yd, xd = y.to(ctx.device), x_true.to(ctx.device)
        for p in PRECISIONS:
            model = dr.distribute(build().to(ctx.device), ctx, patch_size=patch, overlap=overlap, precision=p)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            curve = [train_step(model, opt, yd, dphys, xd) for _ in range(args.curve_steps)]
            d = timeit(lambda: train_step(model, opt, yd, dphys, xd), args.repeats, warmup=0)
            d.pop("_out")
            d["loss_curve"] = curve
            r[f"daskrecon_{p}"] = d
    _ratios(f"training step {size}²", r)
    print("  losses: " + "; ".join(f"{p} {', '.join(f'{v:.4f}' for v in r[f'daskrecon_{p}']['loss_curve'])}"
                                   for p in PRECISIONS), flush=True)
    return r


def transfers(args) -> dict:
    """What one Dask round trip of an image costs: driver → GPU worker → driver, for 1×3×S² fp32, sent as
    a torch tensor (pickled in the graph) and as a numpy array (what daskrecon places)."""
    import torch

    res = {}
    with _ctx(args) as ctx:
        cuda = args.device_mode == "gpu"

        def on_worker(a):
            t = a if isinstance(a, torch.Tensor) else torch.from_numpy(a)
            out = (t.cuda() * 2).cpu() if cuda else t * 2
            return out if isinstance(a, torch.Tensor) else out.numpy()

        for size in args.pnp_sizes:
            x = torch.rand(1, 3, size, size)
            r = {"mib": x.numel() * 4 / 2**20}
            for kind, payload in (("tensor", x), ("numpy", x.numpy())):
                d = _timed(lambda p=payload: ctx.client.submit(on_worker, p, pure=False).result(), max(args.repeats, 5))
                d.pop("_out")
                r[kind] = d
            res[str(size)] = r
            print(f"round trip of {r['mib']:.0f} MiB through a worker: tensor {r['tensor']['median_s'] * 1e3:.1f} ms, "
                  f"numpy {r['numpy']['median_s'] * 1e3:.1f} ms", flush=True)
    return res


def denoisers(args) -> dict:
    import torch

    from daskrecon.demo import demo_image, demo_volume
    from daskrecon.models import bundled_denoiser, bundled_denoiser_3d
    from daskrecon.tasks.precision import autocast

    dev = torch.device("cuda" if args.device_mode == "gpu" else "cpu")

    def psnr(u, x):
        return float(10 * torch.log10(1.0 / ((u.clamp(0, 1) - x) ** 2).mean()))

    rows = []
    vol = torch.from_numpy(demo_volume((64, 64, 64) if not args.quick else (16, 16, 16)).compute())
    cases = [("bundled DnCNN (2-D)", bundled_denoiser(), demo_image(512 if not args.quick else 64)),
             ("bundled DnCNN (3-D)", bundled_denoiser_3d(), vol)]
    for name, model, clean in cases:
        model = model.to(dev)
        clean = clean.to(dev)
        for sigma in (0.05, 0.1):
            noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1)).to(dev)
            row = {"denoiser": name, "shape": list(clean.shape), "sigma": sigma, "psnr_noisy": psnr(noisy, clean)}
            outs = {}
            for p in PRECISIONS:
                def call(p=p):
                    with torch.no_grad(), autocast(dev, p):
                        return model(noisy, sigma).float()
                t = _timed(call, args.repeats)
                outs[p] = t.pop("_out")
                row[f"psnr_{p}"], row[f"seconds_{p}"] = psnr(outs[p], clean), t["median_s"]
                if p != "fp32":
                    row[f"max_error_{p}"] = float((outs[p] - outs["fp32"]).abs().max())
                    row[f"rel_error_{p}"] = _rel(outs[p], outs["fp32"])
            rows.append(row)
            print(f"{name} σ {sigma}: " + ", ".join(f"{p} {row[f'psnr_{p}']:.2f} dB {row[f'seconds_{p}'] * 1e3:.1f} ms"
                                                    for p in PRECISIONS), flush=True)
    return {"rows": rows}


SECTIONS = {"denoisers": denoisers, "transfers": transfers, "pnp": pnp, "tiling": tiling, "training": training, "accuracy": accuracy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--curve-steps", type=int, default=4)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--device-mode", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--quick", action="store_true", help="small inputs: a check of the script, not a measurement")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu.json"))
    args = p.parse_args()
    args.pnp_sizes = [512, 2048] if not args.quick else [64]
    args.tiling_sizes = [512, 2048] if not args.quick else [192]
    import torch

    if args.device_mode == "cpu":
        PRECISIONS.remove("fp16")
    if args.device_mode == "gpu" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device here (use --device-mode cpu --quick to check the script)")
    res = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "out"}, "env": env(args)}
    print(json.dumps(res["env"]), flush=True)
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            res[name] = SECTIONS[name](args)
        except Exception as exc:  # one section's failure must not lose the others' numbers
            traceback.print_exc()
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
        res[name]["section_seconds"] = time.perf_counter() - t0
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(json.loads(json.dumps(res, default=lambda o: None)), f, indent=2)
        print(f"[{name}: {res[name]['section_seconds']:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
