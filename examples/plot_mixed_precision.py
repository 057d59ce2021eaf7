"""
The denoiser in bf16, with a measured error budget
==================================================

The same multi-blur PnP deblurring twice: the bundled denoiser's tiles in fp32, then in bf16
(``precision="bf16"``), which runs several times faster on CPUs with bf16 units and on GPU
tensor cores. Before the bf16 run, daskrecon probes the network on a window of the input in
both precisions on a worker and refuses bf16 if its error exceeds ``precision_tol``; the
measured error is in every history row. ``precision="auto"`` would fall back to fp32 instead
of refusing (and on hardware without bf16 units it does).
"""

import os
import time

import matplotlib.pyplot as plt
import torch

import daskrecon as dr
from daskrecon.demo import demo_problem
from daskrecon.errors import PrecisionError
from daskrecon.models import bundled_denoiser

SIZE = int(os.environ.get("DASKRECON_EXAMPLE_SIZE", 256))

if __name__ == "__main__":
    x_true, physics_list, y = demo_problem(SIZE)
    results = {}
    with dr.DistributedContext(dashboard_address="127.0.0.1:0") as ctx:
        physics = dr.distribute(physics_list, ctx)
        denoiser = dr.distribute(bundled_denoiser(), ctx, patch_size=SIZE // 2, overlap=8)
        for precision in ("fp32", "auto"):
            t0 = time.perf_counter()
            x, history = dr.reconstruct(physics, y, denoiser, algorithm="red", n_iter=20, step_size=0.3,
                                        red_weight=0.3, x_true=x_true, precision=precision, return_history=True,
                                        progress=False)
            chosen = history[-1].get("precision", "fp32")
            results[chosen] = (x, history[-1]["psnr"], time.perf_counter() - t0)
            print(f"{precision} -> {chosen}: PSNR {history[-1]['psnr']:.2f} dB in {results[chosen][2]:.1f} s"
                  + (f", probe relative error {history[-1]['precision_rel_error']:.2e}" if chosen != "fp32" else ""))
        try:  # an impossible budget: refused before any work, naming the measured error
            dr.reconstruct(physics, y, denoiser, n_iter=1, precision="bf16", precision_tol=1e-9, progress=False)
        except PrecisionError as exc:
            print("refused:", exc)
        except ValueError as exc:  # hardware without bf16: refused as well
            print("refused:", exc)
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(4 * (len(results) + 1), 4))
    axes[0].imshow(y[0][0].permute(1, 2, 0).clamp(0, 1))
    axes[0].set_title("one blurred view")
    for ax, (name, (x, psnr, seconds)) in zip(axes[1:], results.items()):
        ax.imshow(x[0].permute(1, 2, 0).clamp(0, 1))
        ax.set_title(f"{name}: {psnr:.2f} dB, {seconds:.1f} s")
    for ax in axes:
        ax.axis("off")
    plt.tight_layout()
    plt.savefig("mixed_precision.png")
    if torch.cuda.is_available():
        print("on this machine's GPU, precision='fp16' and 'bf16' use its tensor cores")
