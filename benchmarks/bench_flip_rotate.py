"""The flip/rotation average in bf16: deepinv's ``EquivariantDenoiser`` against ``daskrecon.models.FlipRotateAverage``.

Both average the bundled DRUNet over the 8 flips and quarter turns. deepinv rotates through
torchvision's resampling on a grid of coordinates, which bf16 autocast rounds beyond 256 pixels;
``FlipRotateAverage`` uses ``torch.rot90``/``flip``. In one run, on scikit-image's astronaut at
``--size``² with Gaussian noise σ ``--noise`` (seeded):

- plain torch, two threads, the whole image: PSNR in fp32 and under bf16 autocast, the relative L2
  difference between the two, the seconds of one call;
- daskrecon's precision probe as the demo meets it (2 workers, tiles of ``--size // 2`` overlapping
  by 32, ``precision="auto"``): what it measures on its window and what it chooses.

Writes benchmarks/results/flip_rotate.json.

    python benchmarks/bench_flip_rotate.py [--size 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--noise", type=float, default=0.1)
    args = p.parse_args()

    import deepinv as dinv
    import torch

    import daskrecon as dr
    from daskrecon.demo import demo_image
    from daskrecon.engine.loop import psnr
    from daskrecon.models import FlipRotateAverage, bundled_drunet

    torch.set_num_threads(2)
    x = demo_image(args.size)
    noisy = x + args.noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    wrappers = {"deepinv EquivariantDenoiser": lambda: dinv.models.EquivariantDenoiser(bundled_drunet(), random=False),
                "daskrecon FlipRotateAverage": lambda: FlipRotateAverage(bundled_drunet())}
    results: dict = {"machine": machine(), "args": vars(args), "noisy_psnr": psnr(noisy, x), "plain": {}, "probe": {}}
    for name, make in wrappers.items():
        model = make().eval()
        out = {}
        with torch.no_grad():
            for precision in ("fp32", "bf16"):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out[precision] = model(noisy, args.noise).float()
                seconds = time.perf_counter() - t0
                results["plain"].setdefault(name, {})[precision] = {"psnr": psnr(out[precision], x), "seconds": seconds}
        rel = float((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm())
        results["plain"][name]["bf16_rel_error"] = rel
        r = results["plain"][name]
        print(f"{name}, whole {args.size}² image: fp32 {r['fp32']['psnr']:.2f} dB ({r['fp32']['seconds']:.1f} s), "
              f"bf16 {r['bf16']['psnr']:.2f} dB ({r['bf16']['seconds']:.1f} s), relative difference {rel:.2g}",
              flush=True)
    with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx:
        for name, make in wrappers.items():
            den = dr.distribute(make(), ctx, patch_size=args.size // 2, overlap=32, precision="auto")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # auto's fall-back warning: the report says it
                report = den.resolve_precision(noisy, "__call__", (), {"sigma": args.noise})
            results["probe"][name] = report
            bf16 = report["probe"].get("bf16", {})
            print(f"{name}, daskrecon's probe on a {'×'.join(map(str, report['window']))} window: bf16 relative error "
                  f"{bf16.get('rel_error', float('nan')):.2g} → {report['precision']} ({report['reason']})", flush=True)
    print("wrote", write("flip_rotate", results))


if __name__ == "__main__":
    main()
