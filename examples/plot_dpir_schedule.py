"""
Schedules: a denoiser σ and a step per iteration (DPIR on the cluster)
======================================================================

Plug-and-play splitting works best when the denoiser starts strong and ends near the noise level:
deepinv's DPIR runs HQS with σ decreasing over 8 iterations and the step following it
(``deepinv.optim.dpir.get_DPIR_params``). In daskrecon, ``step_size`` and ``sigma_denoiser`` take
such lists — one value per iteration, indexed as deepinv indexes ``params_algo`` — for every
algorithm, checkpointed and resumed with the run. On the demo's problem (three blurred, noisy views
of the astronaut, the bundled DRUNet), this example runs deepinv's own ``DPIR`` in one process, the
same schedule on daskrecon's HQS, the demo's ADMM schedule (``daskrecon.demo.demo_schedule``: σ from
0.2 to 0.08 over 5 iterations) and, for contrast, ADMM at a fixed σ, and plots the PSNR per
iteration to ``schedules.png``.
"""

import os

import deepinv as dinv
import matplotlib.pyplot as plt
import torch

import daskrecon as dr
from daskrecon.demo import demo_problem, demo_schedule
from daskrecon.engine.loop import psnr
from daskrecon.models import bundled_drunet

SIZE = int(os.environ.get("DASKRECON_EXAMPLE_SIZE", "256"))

if __name__ == "__main__":
    x_true, physics_list, y = demo_problem(SIZE)
    with torch.no_grad():
        reference = dinv.optim.DPIR(sigma=0.05, denoiser=bundled_drunet())(y, dinv.physics.stack(*physics_list))
    print(f"deepinv DPIR (one process): {psnr(reference, x_true):.2f} dB")
    sigmas, steps, n_dpir = dinv.optim.dpir.get_DPIR_params(0.05)
    runs = {"HQS, DPIR's schedule": dict(algorithm="hqs", n_iter=n_dpir, sigma_denoiser=sigmas, step_size=steps),
            "ADMM, the demo's schedule": dict(algorithm="admm", n_iter=5, **demo_schedule(5)),
            "ADMM, fixed σ 0.08, γ 8": dict(algorithm="admm", n_iter=8, sigma_denoiser=0.08, step_size=8.0)}
    curves = {}
    with dr.DistributedContext() as ctx:
        physics = dr.distribute(physics_list, ctx)
        denoiser = dr.distribute(bundled_drunet(), ctx, patch_size=max(32, SIZE // 2), overlap=32)
        for label, kw in runs.items():
            _, history = dr.reconstruct(physics, y, denoiser, x_true=x_true, progress=False, return_history=True, **kw)
            curves[label] = [h["psnr"] for h in history]
            print(f"{label}: {' '.join(f'{p:.2f}' for p in curves[label])} dB")

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=label)
    ax.axhline(psnr(reference, x_true), color="grey", ls="--", lw=1, label="deepinv DPIR (one process)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"{SIZE}x{SIZE}, three blurs: schedules")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("schedules.png", dpi=120)
    print("wrote schedules.png")
