"""scripts/finetune_unrolled.py: its unrolled iterations are deepinv's ADMM with the demo's schedule."""

import sys
from pathlib import Path

import deepinv as dinv
import torch
from deepinv.optim import L2

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import finetune_unrolled
from helpers import NonBlind

from daskrecon.demo import demo_problem, demo_schedule


def test_the_unrolled_iterations_are_deepinvs_admm_with_the_demos_schedule():
    """The closed-form (FFT) ADMM the script trains through, against deepinv's ADMM given the demo's lists
    (σ_k and γ_k = (σ_k / 0.05)²), on the demo's blurs at 48² with a non-blind denoiser."""
    _, ops, y = demo_problem(48)
    net = NonBlind(3)
    sched = demo_schedule(4)
    ys = torch.stack([y[i] for i in range(3)], 1)  # (1, M, C, H, W)
    spectra = finetune_unrolled.blur_spectra([op.filter for op in ops], (48, 48))[None]
    with torch.no_grad():
        ours = finetune_unrolled.unrolled_admm(net, torch.fft.fft2(ys), spectra, torch.full((1, 1, 1, 1), 0.05),
                                               ys.mean(1), [s / 0.05 for s in sched["sigma_denoiser"]], 1.0)
    x0 = ys.mean(1)
    solver = dinv.optim.optim_builder("ADMM", data_fidelity=L2(), prior=dinv.optim.PnP(denoiser=net), max_iter=4,
                                      params_algo={"stepsize": sched["step_size"], "g_param": sched["sigma_denoiser"],
                                                   "lambda": 1.0},
                                      early_stop=False, custom_init=lambda y, p: (x0.clone(), torch.zeros_like(x0)))
    physics = dinv.physics.stack(*ops)
    physics.set_ls_solver("CG", max_iter=200, tol=1e-8)
    with torch.no_grad():
        ref = solver(y, physics)
    rel = float(torch.linalg.vector_norm(ours[-1] - ref) / torch.linalg.vector_norm(ref))
    assert rel < 1e-3, rel  # deepinv solves the prox by CG, the script by FFT: 1.6e-4 here
    assert float(torch.linalg.vector_norm(ours[-1] - ours[0])) > 1e-2 * float(torch.linalg.vector_norm(ref))
