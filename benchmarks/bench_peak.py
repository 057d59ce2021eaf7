"""How close the PnP benchmark's denoiser runs to what these cores can do.

One thread, the way each daskrecon worker runs torch: a 2048² float32 matrix product (SGEMM, the
best-tuned kernel there is), and the DnCNN of ``bench_pnp.py`` (deepinv's default: depth 20, 64
features) on one of its 276² windows, channels-last as the workers run it. GFLOP/s counts
2 × multiply-adds. If the DnCNN's rate is at SGEMM's, the denoiser is compute-bound at the
cores' peak and only fewer FLOPs make it faster.

Writes benchmarks/results/peak.json.

    python benchmarks/bench_peak.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, timeit, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--window", type=int, default=276, help="side of a tile window (patch 256 + overlap 20)")
    args = p.parse_args()

    import torch
    import deepinv as dinv

    torch.set_num_threads(1)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm = timeit(lambda: a @ b, args.repeats)
    mm.pop("_out")
    sgemm = 2 * n ** 3 / mm["median_s"] / 1e9

    model = dinv.models.DnCNN(in_channels=3, out_channels=3, pretrained=None).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, args.window, args.window).to(memory_format=torch.channels_last)
    flops = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d)) * args.window ** 2
    with torch.no_grad():
        dn = timeit(lambda: model(x), args.repeats)
    dn.pop("_out")
    conv = flops / dn["median_s"] / 1e9

    res = {"machine": machine(), "threads": 1, "sgemm_n": n, "sgemm": mm, "sgemm_gflops": sgemm,
           "dncnn_window": args.window, "dncnn_flops": flops, "dncnn": dn, "dncnn_gflops": conv,
           "ratio_dncnn_vs_sgemm": conv / sgemm}
    print(f"1 thread: SGEMM {n}² {sgemm:.1f} GFLOP/s; DnCNN (depth 20, 64 features) on {args.window}² "
          f"{dn['median_s']:.3f} s = {conv:.1f} GFLOP/s ({conv / sgemm:.2f}x SGEMM)")
    print("wrote", write("peak", res))


if __name__ == "__main__":
    main()
