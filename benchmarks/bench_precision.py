"""The bundled denoisers in fp32 and in bf16 (issue #29): PSNR and time, the error budget's measurements.

For each bundled denoiser — the 2-D DnCNN on scikit-image's astronaut (512², RGB) and the 3-D
DnCNN on the bundled microscopy-like volume (64³) — at noise σ 0.05 and 0.1 (fixed seeds):
the PSNR of the noisy input, of the fp32 output and of the bf16-autocast output against the
clean image, the largest and relative L2 difference between the two outputs, and one call's
time in each precision (one process, one thread, median of --repeats), so the ratio is the
cores' own — autocast with fp32 weights (what daskrecon runs) and, for the record, the weights
cast to bf16 once. Also deepinv's default-size DnCNN (depth 20, 64 features, random weights) on a
276² window, the issue's measurement. Writes benchmarks/results/precision.json.

    python benchmarks/bench_precision.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, timeit, write  # noqa: E402


def _psnr(u, x) -> float:
    import torch

    return float(10 * torch.log10(1.0 / ((u.clamp(0, 1) - x) ** 2).mean()))


def _compare(model, clean, sigma: float, repeats: int, args=()) -> dict:
    import torch

    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    if clean.dim() == 4:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)

    def call(p):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=p == "bf16"):
            return model(noisy, *args).float()

    out = {"sigma": sigma, "psnr_noisy": _psnr(noisy, clean)}
    results = {}
    for p in ("fp32", "bf16"):
        t = timeit(lambda: call(p), repeats)
        results[p] = t.pop("_out")
        out[f"psnr_{p}"] = _psnr(results[p], clean)
        out[f"seconds_{p}"] = t["median_s"]
    # the other way to hold the weights: cast to bf16 once (what "cast once per worker" would do)
    import copy

    cast = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        t = timeit(lambda: cast(noisy.to(torch.bfloat16), *args).float(), repeats)
    out["seconds_bf16_weights_cast_once"] = t["median_s"]
    d = (results["bf16"] - results["fp32"]).double()
    out["max_error"] = float(d.abs().max())
    out["rel_error"] = float(d.norm() / results["fp32"].double().norm())
    out["speedup_bf16"] = out["seconds_fp32"] / out["seconds_bf16"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import deepinv as dinv
    import torch

    from daskrecon.demo import demo_image, demo_volume
    from daskrecon.models import bundled_denoiser, bundled_denoiser_3d

    torch.set_num_threads(1)
    res = {"machine": machine(), "threads": 1, "rows": []}
    img = demo_image(512)
    vol = torch.from_numpy(demo_volume((64, 64, 64)).compute())
    for sigma in (0.05, 0.1):
        res["rows"].append({"denoiser": "bundled DnCNN (2-D)", "image": "astronaut 512²",
                            **_compare(bundled_denoiser(), img, sigma, args.repeats, (sigma,))})
        res["rows"].append({"denoiser": "bundled DnCNN (3-D)", "image": "demo volume 64³",
                            **_compare(bundled_denoiser_3d(), vol, sigma, args.repeats, (sigma,))})
    torch.manual_seed(0)
    big = dinv.models.DnCNN(3, 3, pretrained=None).eval()
    res["rows"].append({"denoiser": "deepinv DnCNN 20x64 (random weights)", "image": "astronaut crop 276²",
                        **_compare(big, img[..., :276, :276], 0.1, args.repeats)})
    print(f"{'denoiser':40s} {'image':22s} {'σ':>5s} {'noisy':>7s} {'fp32':>7s} {'bf16':>7s} "
          f"{'max err':>8s} {'rel err':>8s} {'fp32 s':>7s} {'bf16 s':>7s} {'speed':>6s}")
    for r in res["rows"]:
        print(f"{r['denoiser']:40s} {r['image']:22s} {r['sigma']:5.2f} {r['psnr_noisy']:7.2f} {r['psnr_fp32']:7.2f} "
              f"{r['psnr_bf16']:7.2f} {r['max_error']:8.1e} {r['rel_error']:8.1e} {r['seconds_fp32']:7.3f} "
              f"{r['seconds_bf16']:7.3f} {r['speedup_bf16']:5.1f}x  (bf16 weights cast once: "
              f"{r['seconds_bf16_weights_cast_once']:.3f} s)")
    print("wrote", write("precision", res))


if __name__ == "__main__":
    main()
