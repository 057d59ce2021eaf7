import pytest
import torch
import deepinv as dinv
from deepinv.optim import L2

import daskrecon as dr
from daskrecon.checkpoint import CheckpointMismatchError
from daskrecon.errors import DaskreconError, MeasurementError
from daskrecon.testing import assert_allclose

from helpers import blurs, noisy_measurements, small_dncnn, snapshot


@pytest.fixture(scope="module")
def problem(ctx):
    torch.manual_seed(0)
    ops = blurs(3)
    x_true = torch.rand(1, 3, 40, 36)
    y = noisy_measurements(ops, x_true, sigma=0.02)
    model = small_dncnn(3)
    return ops, x_true, y, model, dr.distribute(ops, ctx), dr.distribute(model, ctx, patch_size=16, overlap=6)


def plain_loop(ops, y, model, x, n, tau, algorithm="pnp", lam=1.0):
    stacked = dinv.physics.stack(*ops)
    with torch.no_grad():
        for _ in range(n):
            g = L2().grad(x, y, stacked)
            x = model(x - tau * g) if algorithm == "pnp" else x - tau * (g + lam * (x - model(x)))
    return x


@pytest.mark.parametrize("algorithm", ["pnp", "red"])
def test_matches_a_plain_deepinv_loop(problem, algorithm):
    ops, x_true, y, model, dphys, dden = problem
    x0 = torch.zeros_like(x_true)
    out, hist = dr.reconstruct(dphys, y, dden, algorithm=algorithm, n_iter=4, step_size=0.3, x0=x0, progress=False,
                               x_true=x_true, return_history=True)
    assert_allclose(out, plain_loop(ops, y, model, x0, 4, 0.3, algorithm), atol=1e-4)
    assert [h["iteration"] for h in hist] == [1, 2, 3, 4] and all("psnr" in h for h in hist)
    assert all(h["data_fidelity"] > 0 for h in hist)  # recorded even without a progress bar
    # the value is f at the start of each iteration, from the gradient pass
    f0 = float(sum(L2().fn(x0, t, op) for t, op in zip(y, ops)))
    assert abs(hist[0]["data_fidelity"] - f0) <= 1e-4 * f0


def test_resume_after_a_crash_is_bitwise_equal(problem, tmp_path):
    ops, x_true, y, model, dphys, dden = problem
    full, full_hist = dr.reconstruct(dphys, y, dden, n_iter=6, step_size=0.3, progress=False, return_history=True)

    def crash(k, x):
        if k == 3:
            raise KeyboardInterrupt("simulated crash after iteration 3")

    seen = []
    with pytest.raises(KeyboardInterrupt):
        dr.reconstruct(dphys, y, dden, n_iter=6, step_size=0.3, progress=False, checkpoint=str(tmp_path / "ck"),
                       callback=crash)
    resumed, hist = dr.reconstruct(dphys, y, dden, n_iter=6, step_size=0.3, progress=False,
                                   checkpoint=str(tmp_path / "ck"), resume=True, callback=lambda k, x: seen.append(k),
                                   return_history=True)
    assert seen == [4, 5, 6]
    assert hist == full_hist and len(hist) == 6  # the checkpointed rows come back with the run
    assert torch.equal(resumed, full)
    with pytest.raises(CheckpointMismatchError, match="step_size differ"):
        dr.reconstruct(dphys, y, dden, n_iter=6, step_size=0.2, progress=False, checkpoint=str(tmp_path / "ck"),
                       resume=True)
    with pytest.raises(DaskreconError, match="already holds a checkpoint"):
        dr.reconstruct(dphys, y, dden, n_iter=6, step_size=0.3, progress=False, checkpoint=str(tmp_path / "ck"))


def test_bad_input(problem, tmp_path):
    ops, x_true, y, model, dphys, dden = problem
    ck = str(tmp_path / "ck")
    dr.reconstruct(dphys, y, dden, n_iter=1, step_size=0.3, progress=False, checkpoint=ck)  # an earlier run
    before = snapshot(tmp_path)
    bad = dinv.utils.TensorList([y[0], y[1].clone(), y[2]])
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"y\[1\] has 1 non-finite values"):
        dr.reconstruct(dphys, bad, dden, n_iter=1, progress=False, checkpoint=ck, overwrite=True)
    with pytest.raises(ValueError, match="x0 has"):
        dr.reconstruct(dphys, y, dden, n_iter=1, progress=False, x0=torch.full_like(x_true, float("inf")),
                       checkpoint=ck, overwrite=True)
    with pytest.raises(TypeError, match="x is torch.float64 but the denoiser's weights are torch.float32"):
        dr.reconstruct(dphys, y, dden, n_iter=1, progress=False, x0=torch.zeros_like(x_true, dtype=torch.float64),
                       checkpoint=ck, overwrite=True)
    assert snapshot(tmp_path) == before  # refused runs leave the existing checkpoint as it was
    with pytest.raises(MeasurementError, match="y has 2 entries"):
        dr.reconstruct(dphys, dinv.utils.TensorList([y[0], y[1]]), dden, n_iter=1, progress=False)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        dr.reconstruct(dphys, y, dden, algorithm="admm", progress=False)


DRIVER = """
import sys, time
sys.path.insert(0, {tests!r})
import daskrecon as dr
from helpers import run_solver
if __name__ == "__main__":
    with dr.DistributedContext(n_workers=2, dashboard_address=":0", torch_threads=1) as ctx:
        run_solver(ctx, checkpoint={ckpt!r}, callback=lambda k, x: time.sleep(0.5))
"""


def test_driver_killed_mid_run_resumes_bitwise_equal(ctx, tmp_path):
    import os

    from helpers import kill_driver_after_commit, run_solver

    ckpt = tmp_path / "ck"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=os.path.dirname(__file__), ckpt=str(ckpt)))
    done = kill_driver_after_commit(script, ckpt, 3)  # the driver dies between or during iterations
    assert 3 <= done < 8
    resumed = run_solver(ctx, checkpoint=str(ckpt), resume=True)
    assert torch.equal(resumed, run_solver(ctx))
