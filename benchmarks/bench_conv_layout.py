"""Per-pixel cost of DnCNN on one thread: memory layout (NCHW vs channels_last) and tiles per call.

Backs two defaults of the tile workers: NHWC convolutions and one tile per network call on CPU.

    python benchmarks/bench_conv_layout.py
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402


def per_pixel_us(model, n: int, size: int, channels_last: bool) -> float:
    import torch

    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)  # warm-up: oneDNN primitive creation
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[1] / (n * size * size) * 1e6


def main() -> None:
    import copy

    import torch
    from deepinv.models import DnCNN

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DnCNN(3, 3, pretrained=None).eval()
    rows = {}
    print("tiles per call | NCHW us/px | channels_last us/px   (DnCNN depth 20, 296x296 tiles, 1 thread)")
    for n in (1, 2, 4, 8):
        a = per_pixel_us(copy.deepcopy(model), n, 296, False)
        b = per_pixel_us(copy.deepcopy(model), n, 296, True)
        rows[n] = {"nchw_us_per_px": a, "channels_last_us_per_px": b}
        print(f"{n:14d} | {a:10.2f} | {b:10.2f}")
    print("wrote", write("conv_layout", {"machine": machine(), "per_pixel": rows}))


if __name__ == "__main__":
    main()
