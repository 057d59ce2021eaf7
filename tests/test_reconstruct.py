import pytest
import torch
import deepinv as dinv
from deepinv.optim import L2

import daskrecon as dr
from daskrecon.engine.algorithms import FISTA
from daskrecon.engine.checkpoint import Checkpoint, CheckpointMismatchError
from daskrecon.errors import DaskreconError, MeasurementError
from daskrecon.testing import assert_allclose

from helpers import NonBlind, blurs, noisy_measurements, small_dncnn, snapshot


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
    with pytest.warns(UserWarning, match=r"holds iteration 6, past n_iter=4: its iterate \(and history\) is returned") \
            as rec:
        past, hist = dr.reconstruct(dphys, y, dden, n_iter=4, step_size=0.3, progress=False,
                                    checkpoint=str(tmp_path / "ck"), resume=True, return_history=True)
    assert [r.filename for r in rec if "past n_iter" in str(r.message)] == [__file__]  # points at the user's call
    assert torch.equal(past, full) and len(hist) == 6  # said, not silently more iterations than asked
    with pytest.raises(CheckpointMismatchError, match="step_size differ"):
        dr.reconstruct(dphys, y, dden, n_iter=6, step_size=0.2, progress=False, checkpoint=str(tmp_path / "ck"),
                       resume=True)
    with pytest.raises(DaskreconError, match="already holds a checkpoint"):
        dr.reconstruct(dphys, y, dden, n_iter=6, step_size=0.3, progress=False, checkpoint=str(tmp_path / "ck"))


def test_fista_matches_deepinvs_fista(problem):
    """Parity with deepinv's own, non-distributed FISTA (stacked physics, L2, PnP prior)."""
    ops, x_true, y, model, dphys, dden = problem
    x0 = torch.zeros_like(x_true)
    out, hist = dr.reconstruct(dphys, y, dden, algorithm="fista", n_iter=5, step_size=0.3, x0=x0, progress=False,
                               return_history=True)
    solver = dinv.optim.FISTA(data_fidelity=L2(), prior=dinv.optim.PnP(denoiser=model), stepsize=0.3, g_param=0.05,
                              max_iter=5, early_stop=False, custom_init=lambda y, physics: (x0.clone(), x0.clone()))
    with torch.no_grad():
        ref = solver(y, dinv.physics.stack(*ops))
    # The bound: 1e-4 relative. The denoiser runs tiled here (16² tiles, overlap 6), the
    # plain one whole: the tile seams differ by ~1e-4 at a few pixels, which the momentum carries.
    rel = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
    assert rel <= 1e-4, rel
    assert_allclose(out, ref, atol=5e-4)
    pnp = plain_loop(ops, y, model, x0, 5, 0.3)
    assert float((ref - pnp).abs().max()) > 1e-2  # the momentum matters: not PnP under another name
    assert [h["iteration"] for h in hist] == [1, 2, 3, 4, 5]


def test_fista_refuses_a_momentum_parameter_without_convergence():
    with pytest.raises(ValueError, match="a must be > 2"):
        FISTA(0.3, a=2)


def test_tol_is_deepinvs_residual_criterion_and_stops_where_deepinv_does(problem, ctx):
    """``relative_change`` is deepinv's ``crit_conv="residual"``: per batch element ‖x_k − x_{k+1}‖ /
    (‖x_{k+1}‖ + 1e-6), averaged over the batch; ``tol`` stops where deepinv's ``thres_conv`` does (on a
    run that converges: deepinv checks from its third iteration on, daskrecon from the first)."""
    ops = problem[0]
    model = NonBlind(3)  # at σ 0.005 a mild contraction: PnP converges, the changes decrease
    torch.manual_seed(1)
    x_true = torch.rand(2, 3, 40, 36)
    x_true[1] *= 0.3  # elements of other norms: an average of ratios, not a ratio of sums
    y = noisy_measurements(ops, x_true, sigma=0.02)
    x0 = torch.zeros_like(x_true)  # from zero: the first change is ~1, not a division by ‖x0‖ = 0

    def deepinv_pgd(**stop):
        solver = dinv.optim.optim_builder("PGD", data_fidelity=L2(), prior=dinv.optim.PnP(denoiser=model),
                                          params_algo={"stepsize": 0.3, "g_param": 0.005}, max_iter=8,
                                          custom_init=lambda y, p: x0.clone(), **stop)
        with torch.no_grad():
            _, m = solver(y, dinv.physics.stack(*ops), compute_metrics=True)
        return [sum(r) / len(r) for r in zip(*m["residual"])]

    dphys, dden = problem[4], dr.distribute(model, ctx, patch_size=16, overlap=6)
    kw = dict(n_iter=8, step_size=0.3, sigma_denoiser=0.005, x0=x0, progress=False, return_history=True)
    ref = deepinv_pgd(early_stop=False)
    _, hist = dr.reconstruct(dphys, y, dden, **kw)
    got = [h["relative_change"] for h in hist]
    assert abs(got[0] - 1) < 1e-3 and all(abs(g - r) <= 1e-3 * r for g, r in zip(got, ref)), (got, ref)
    assert all(a > b for a, b in zip(ref, ref[1:5]))
    tol = (ref[3] * ref[4]) ** 0.5  # between the 4th and 5th changes
    stops = len(deepinv_pgd(early_stop=True, thres_conv=tol, crit_conv="residual"))
    _, hist = dr.reconstruct(dphys, y, dden, tol=tol, **kw)
    assert len(hist) == stops == 5 and hist[-1]["stop"] == "tol", (ref, tol, stops)


def test_stopping_rules_end_the_run_and_commit_where_it_stopped(problem, tmp_path):
    ops, x_true, y, model, dphys, dden = problem
    _, full = dr.reconstruct(dphys, y, dden, n_iter=8, step_size=0.3, progress=False, return_history=True)
    changes = [h["relative_change"] for h in full]
    tol = changes[2]
    stop_at = next(i for i, c in enumerate(changes) if c <= tol) + 1  # at most 3, fewer if it dips earlier
    ck = str(tmp_path / "ck")
    x, hist = dr.reconstruct(dphys, y, dden, n_iter=8, step_size=0.3, progress=False, return_history=True, tol=tol,
                             checkpoint=ck, checkpoint_every=5)
    assert len(hist) == stop_at < 8 and hist[-1]["stop"] == "tol"
    assert torch.equal(x, dr.reconstruct(dphys, y, dden, n_iter=stop_at, step_size=0.3, progress=False))
    assert Checkpoint(ck).meta()["iteration"] == stop_at  # committed although checkpoint_every=5
    seen = []
    again = dr.reconstruct(dphys, y, dden, n_iter=stop_at, step_size=0.3, progress=False, checkpoint=ck, resume=True,
                           callback=lambda k, x: seen.append(k))
    assert seen == [] and torch.equal(again, x)

    _, hist1 = dr.reconstruct(dphys, y, dden, n_iter=8, step_size=0.3, progress=False, return_history=True,
                              max_time=1e-6)
    assert len(hist1) == 1 and hist1[-1]["stop"] == "max_time"  # the budget is spent after one iteration
    with pytest.raises(ValueError, match="max_time must be > 0"):
        dr.reconstruct(dphys, y, dden, n_iter=2, step_size=0.3, progress=False, max_time=0)
    with pytest.raises(ValueError, match="tol must be >= 0"):
        dr.reconstruct(dphys, y, dden, n_iter=2, step_size=0.3, progress=False, tol=-1.0)


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
    with pytest.raises(TypeError, match=r"x0 is torch.float64 but the denoiser's weights are torch.float32; "
                                        r"convert x0 \(x0.to\(torch.float32\)\)"):
        dr.reconstruct(dphys, y, dden, n_iter=1, progress=False, x0=torch.zeros_like(x_true, dtype=torch.float64),
                       checkpoint=ck, overwrite=True)
    with pytest.raises(TypeError, match="y\\[0\\] is torch.float64 but the denoiser's weights"):  # named, not "x"
        dr.reconstruct(dphys, [t.double() for t in y], dden, n_iter=1, progress=False, checkpoint=ck, overwrite=True)
    assert snapshot(tmp_path) == before  # refused runs leave the existing checkpoint as it was
    with pytest.raises(MeasurementError, match="y has 2 entries"):
        dr.reconstruct(dphys, dinv.utils.TensorList([y[0], y[1]]), dden, n_iter=1, progress=False)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        dr.reconstruct(dphys, y, dden, algorithm="lbfgs", progress=False)
    # an x0 narrower than every blur's circular padding fails inside deepinv: the error says on what x
    from daskrecon.errors import WorkerTaskError

    said = r"\(operator \d was applied to x of shape \(1, 3, 40, 2\); its measurement y\[\d\] has shape \(1, 3, 40, 36\)\)"
    with pytest.raises(WorkerTaskError, match=said):
        dr.reconstruct(dphys, y, dden, n_iter=1, step_size=0.3, progress=False, x0=x_true[..., :2])


def test_objects_of_two_contexts_are_refused_naming_both(problem, ctx, ctx1):
    """A notebook that opened a second context and mixed its objects with the first's failed deep in
    distributed (a model "not on this worker", futures of another client, a scheduler assertion)."""
    from daskrecon.errors import ContextMismatchError

    ops, x_true, y, model, dphys, dden = problem
    other_den = dr.distribute(model, ctx1, patch_size=16, overlap=6)
    other_fid = dr.distribute(L2(), ctx1)
    for kwargs, names in [(dict(denoiser=other_den), "physics and denoiser"),
                          (dict(denoiser=dden, data_fidelity=other_fid), "physics and data_fidelity")]:
        with pytest.raises(ContextMismatchError, match=f"{names} were distributed with different DistributedContexts"):
            dr.reconstruct(dphys, y, n_iter=1, step_size=0.3, progress=False, **kwargs)
    with pytest.raises(ContextMismatchError, match="data_fidelity and physics were distributed with different"):
        other_fid.grad(x_true, y, dphys)  # deepinv's call, as optim_builder makes it
    measured = dr.DistributedMeasurements(ctx1, list(y))  # measurements held by the other cluster
    with pytest.raises(ContextMismatchError, match="physics and y were"):
        dphys.A_adjoint(measured)
    with pytest.raises(ContextMismatchError, match="physics and y were"):
        dr.reconstruct(dphys, measured, dden, n_iter=1, step_size=0.3, progress=False)
    # the same objects, each with its own context's partners, still run
    assert torch.isfinite(dr.reconstruct(dphys, y, dden, n_iter=1, step_size=0.3, progress=False)).all()


def test_the_default_step_size_follows_an_update_of_the_operators(problem, ctx):
    """``L`` is cached with the physics: after ``update_parameters`` it must be the new operators'."""
    from deepinv.physics.functional.blur import gaussian_blur

    ops, x_true, y, model, dphys, dden = problem
    run = dict(n_iter=1, progress=False, return_history=True)
    d = dr.distribute(blurs(3), ctx)
    dr.reconstruct(d, y, dden, **run)  # the default step size of the first filters, cached
    sharper = 2.0 * gaussian_blur(sigma=(0.8, 0.8))  # ‖A_i‖ doubles or more: L four times or more
    d.update_parameters(filter=sharper)
    fresh = dr.distribute([dinv.physics.Blur(filter=sharper, padding="circular") for _ in range(3)], ctx)
    (got, got_h), (want, want_h) = dr.reconstruct(d, y, dden, **run), dr.reconstruct(fresh, y, dden, **run)
    assert torch.equal(got, want) and got_h[0]["data_fidelity"] == want_h[0]["data_fidelity"]


DRIVER = """
import sys, time
sys.path.insert(0, {tests!r})
import daskrecon as dr
from helpers import run_solver
if __name__ == "__main__":
    with dr.DistributedContext(n_workers=2, dashboard_address="127.0.0.1:0", torch_threads=1) as ctx:
        run_solver(ctx, checkpoint={ckpt!r}, callback=lambda k, x: time.sleep(0.5))
"""


def test_driver_killed_mid_run_resumes_bitwise_equal(ctx, tmp_path):
    import os

    from helpers import kill_driver_after_commit, run_solver

    ckpt = tmp_path / "ck"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=os.path.dirname(__file__), ckpt=str(ckpt)))
    orphans = []
    done = kill_driver_after_commit(script, ckpt, 3, orphans=orphans)  # the driver dies between or during iterations
    assert 3 <= done < 8
    resumed = run_solver(ctx, checkpoint=str(ckpt), resume=True)
    assert torch.equal(resumed, run_solver(ctx))
    # its local cluster's workers (in sessions of their own, out of reach of a terminal's signals) went
    # with their scheduler: none is left running for ever
    import psutil

    assert len(orphans) >= 2 and not psutil.wait_procs(orphans, timeout=30)[1]
