"""Print the performance page's (docs/performance.md) benchmark tables (markdown) from benchmarks/results/*.json.

    python benchmarks/report.py
"""

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _variants(d: dict, rows: list[tuple[str, str]]) -> str:
    """Median time of each variant present in ``d`` and its ratio to the best deepinv.distributed run."""
    best = min(d["deepinv_distributed_1proc"]["median_s"], d["deepinv_distributed_torchrun2"]["median_s"])
    out = ["| variant | median s | ÷ best deepinv.distributed |", "|---|---|---|"]
    out += [f"| {name} | {d[k]['median_s']:.2f} | {d[k]['median_s'] / best:.2f} |" for name, k in rows if k in d]
    return "\n".join(out)


def gradient() -> str:
    d = json.loads((RESULTS / "gradient.json").read_text())
    rows = [("plain deepinv, 1 process", "plain_deepinv"),
            ("deepinv.distributed, 1 process", "deepinv_distributed_1proc"),
            ("deepinv.distributed, torchrun ×2 (gloo)", "deepinv_distributed_torchrun2"),
            ("**daskrecon, 2 workers**", "daskrecon"),
            ("daskrecon, 2 workers, `fast_operators=False`", "daskrecon_fast_operators_off"),
            ("daskrecon, 2 workers, `malloc=\"safe\"`", "daskrecon_malloc_safe"),
            ("*(info)* deepinv.distributed with `Blur(use_fft=True)`, 1 process",
             "deepinv_distributed_1proc_blur_use_fft")]
    return _variants(d, rows)


def tiling() -> str:
    d = json.loads((RESULTS / "tiling.json").read_text())
    out = ["| case | untiled call | deepinv.distributed 1 proc | torchrun ×2 | **daskrecon 2 workers** | "
           "÷ best deepinv.distributed | efficiency (after halo) | max error vs untiled |",
           "|---|---|---|---|---|---|---|---|"]
    names = {"drunet": "DRUNet 1×3×512², patch 256, overlap 32", "dncnn": "DnCNN 1×3×1024², patch 256, overlap 20"}
    for case, name in names.items():
        if case not in d:
            continue
        c = d[case]
        out.append(
            f"| {name} | {c['untiled']['median_s']:.2f} s | {c['deepinv_distributed_1proc']['median_s']:.2f} s | "
            f"{c['deepinv_distributed_torchrun2']['median_s']:.2f} s | **{c['daskrecon']['median_s']:.2f} s** | "
            f"{c['ratio_daskrecon_vs_best_deepinv_distributed']:.2f} | {c['efficiency_untiled_over_daskrecon']:.2f} "
            f"({c.get('efficiency_after_halo', float('nan')):.2f}) | {c['daskrecon']['max_abs_diff_vs_untiled']:.1e} |")
    return "\n".join(out)


def pnp() -> str:
    d = json.loads((RESULTS / "pnp.json").read_text())
    rows = [("deepinv.distributed, 1 process", "deepinv_distributed_1proc"),
            ("deepinv.distributed, torchrun ×2 (gloo)", "deepinv_distributed_torchrun2"),
            ("**daskrecon `reconstruct`, 2 workers**", "daskrecon"),
            ("daskrecon, 2 workers, `malloc=\"safe\"`", "daskrecon_malloc_safe")]
    return _variants(d, rows)


def overhead() -> str:
    d = json.loads((RESULTS / "overhead.json").read_text())
    ms = lambda v: f"{v * 1e3:.1f} ms"  # noqa: E731
    return "\n".join([
        "| | plain deepinv | deepinv.distributed, 1 process | **daskrecon, 2 workers** |", "|---|---|---|---|",
        f"| L2 gradient | {ms(d['gradient_plain_deepinv']['median_s'])} | "
        f"{ms(d['gradient_deepinv_distributed_1proc']['median_s'])} | **{ms(d['gradient_daskrecon']['median_s'])}** "
        f"({d['ratio_gradient_daskrecon_vs_deepinv_distributed']:.2f}× deepinv.distributed, "
        f"{d['ratio_gradient_daskrecon_vs_plain']:.2f}× plain) |",
        f"| one PnP iteration (mean of {d['workload']['iterations']}) | {ms(d['pnp_iteration_plain_deepinv_s'])} | — | "
        f"**{ms(d['pnp_iteration_daskrecon_s'])}**: the engine costs "
        f"{ms(d['engine_overhead_per_iteration_s'])} per iteration |"])


def ooc() -> str:
    d = json.loads((RESULTS / "ooc_pnp.json").read_text())
    out = ["| run | image | s / iteration | Mpx/s | worker peak RSS (limit " + d["memory_limit_per_worker"]
           + ") | threads busy |", "|---|---|---|---|---|---|"]
    for name in ("in_memory", "out_of_core"):
        r = d[name]
        out.append(f"| {name.replace('_', ' ')} | {r['image']} | {r['steady_seconds_per_iteration']:.0f} | "
                   f"{r['mpx_per_second']:.2f} | {max(r['worker_peak_rss_mib']):.0f} MiB | "
                   f"{r['thread_busy_fraction']:.0%} |")
    out.append(f"\nout of core ÷ in memory, per-pixel throughput: {d['ratio_out_of_core_vs_in_memory_throughput']:.2f}")
    return "\n".join(out)


def denoiser() -> str:
    d = json.loads((Path(__file__).parents[1] / "daskrecon" / "data" / "dncnn_small.json").read_text())
    out = ["| noise σ | noisy PSNR | denoised PSNR | gain |", "|---|---|---|---|"]
    for k, v in d["held_out_psnr"].items():
        out.append(f"| {k.split('=')[1]} | {v['noisy_psnr']:.2f} dB | {v['denoised_psnr']:.2f} dB | "
                   f"+{v['denoised_psnr'] - v['noisy_psnr']:.2f} dB |")
    return "\n".join(out)


def gpu() -> str:
    """bench_gpu.py's tables: one GPU, deepinv.distributed (one process) against daskrecon in each precision."""
    path = RESULTS / "gpu.json"
    if not path.exists():
        return "(no GPU run: benchmarks/results/gpu.json is absent)"
    d = json.loads(path.read_text())
    out = [f"{d['env'].get('gpu', '?')}, torch {d['env']['torch']}",
           "", "| workload | plain deepinv (untiled) | deepinv.distributed | daskrecon fp32 | bf16 | fp16 | "
           "÷ deepinv.distributed (fp32 / bf16 / fp16) |", "|---|---|---|---|---|---|---|"]
    rows = [(f"PnP 5 it., 3 blurs + DnCNN, 1×3×{s}²", d.get("pnp", {}).get(s), "plain_deepinv_untiled")
            for s in ("512", "2048")]
    rows += [(f"tiled DRUNet, 1×3×{s}²", d.get("tiling", {}).get(s), "untiled") for s in ("512", "2048")]
    rows += [("training step, unrolled PGD + DnCNN, 1×3×256²", d.get("training"), None)]
    for name, c, plain in rows:
        if not c or "error" in c:
            continue
        ratios = " / ".join(f"{c[f'ratio_daskrecon_{p}_vs_deepinv_distributed']:.2f}" for p in ("fp32", "bf16", "fp16"))
        out.append(f"| {name} | {c[plain]['median_s'] * 1e3:.0f} ms | " if plain else f"| {name} | — | ")
        out[-1] += (f"{c['deepinv_distributed_1proc']['median_s'] * 1e3:.0f} ms | "
                    + " | ".join(f"{c[f'daskrecon_{p}']['median_s'] * 1e3:.0f} ms" for p in ("fp32", "bf16", "fp16"))
                    + f" | {ratios} |")
    return "\n".join(out)


if __name__ == "__main__":
    for title, fn in (("gradient", gradient), ("tiling", tiling), ("pnp", pnp), ("overhead", overhead),
                      ("out-of-core pnp", ooc), ("bundled denoiser", denoiser), ("one GPU", gpu)):
        print(f"## {title}\n\n{fn()}\n")
