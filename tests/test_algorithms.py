"""The step rules of daskrecon.engine.algorithms: each against deepinv or a plain loop, resumed whole, refused where it cannot run."""

import dask.array as da
import pytest
import torch
import deepinv as dinv
from deepinv.optim import L1, L2

import daskrecon as dr
from daskrecon.engine.algorithms import ADMM, HQS, OSPnP, SVRG
from daskrecon.engine.checkpoint import CheckpointMismatchError
from daskrecon.errors import DaskreconError
from daskrecon.planning.subsets import epoch_order, partition, subset_at
from daskrecon.testing import assert_allclose

from helpers import NonBlind, blurs, noisy_measurements, small_dncnn

ALL = ["pnp", "red", "fista", "fista-red", "hqs", "admm", "os-pnp", "svrg", "mlem", "osem", "sirt", "bsrem"]


@pytest.fixture(scope="module")
def problem(ctx):
    torch.manual_seed(0)
    ops = blurs(4)
    x_true = torch.rand(1, 3, 40, 36)
    y = noisy_measurements(ops, x_true, sigma=0.02)
    model = small_dncnn(3)
    return ops, x_true, y, model, dr.distribute(ops, ctx), dr.distribute(model, ctx, patch_size=16, overlap=6)


def _options(algorithm):
    return {"n_subsets": 2} if algorithm in ("os-pnp", "svrg", "osem", "bsrem") else {}


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("prox_solver", ["cg", "fourier"])
@pytest.mark.parametrize("algorithm", ["hqs", "admm"])
def test_splitting_methods_match_deepinvs(problem, algorithm, prox_solver):
    """Parity with deepinv's own HQS / ADMM on the stacked physics (CG prox, PnP prior), with our prox by
    conjugate gradient and in closed form (the blurs are circular)."""
    ops, x_true, y, model, dphys, dden = problem
    x0 = torch.zeros_like(x_true)
    out, hist = dr.reconstruct(dphys, y, dden, algorithm=algorithm, n_iter=4, step_size=0.5, x0=x0, progress=False,
                               return_history=True, cg_tol=1e-6, cg_max_iter=100, prox_solver=prox_solver)
    stacked = dinv.physics.stack(*ops)
    stacked.set_ls_solver("CG", max_iter=100, tol=1e-6)
    init = (lambda y, p: (x0.clone(), torch.zeros_like(x0))) if algorithm == "admm" else (lambda y, p: x0.clone())
    solver = dinv.optim.optim_builder(algorithm.upper(), data_fidelity=L2(), prior=dinv.optim.PnP(denoiser=model),
                                      params_algo={"stepsize": 0.5, "g_param": 0.05, "lambda": 1.0}, max_iter=4,
                                      early_stop=False, custom_init=init)
    with torch.no_grad():
        ref = solver(y, stacked)
    assert _rel(out, ref) <= 1e-4, _rel(out, ref)
    pnp = dr.reconstruct(dphys, y, dden, n_iter=4, step_size=0.5, x0=x0, progress=False)
    assert _rel(pnp, ref) > 1e-2  # a different algorithm, not PnP under another name
    if prox_solver == "cg":
        assert all(1 <= h["cg_iterations"] <= 100 and h["cg_residual"] <= 1e-6 for h in hist)
    else:
        assert all(h["cg_iterations"] == 0 for h in hist)  # one FFT, no iterations


SIGMAS, STEPS = [0.1, 0.07, 0.05, 0.03], [0.5, 0.4, 0.3, 0.2]


@pytest.fixture(scope="module")
def non_blind(problem):
    ctx = problem[4].ctx
    return NonBlind(3), dr.distribute(NonBlind(3), ctx, patch_size=16, overlap=6)


@pytest.mark.parametrize("algorithm", ["hqs", "admm"])
def test_schedules_match_deepinvs_per_iteration_lists(problem, non_blind, algorithm):
    """σ and the step size per iteration, as deepinv's ``params_algo`` lists (DPIR's way), with a non-blind denoiser."""
    ops, x_true, y, _, dphys, _ = problem
    net, dnet = non_blind
    x0 = torch.zeros_like(x_true)
    out, hist = dr.reconstruct(dphys, y, dnet, algorithm=algorithm, n_iter=4, step_size=STEPS, sigma_denoiser=SIGMAS,
                               x0=x0, progress=False, prox_solver="fourier", return_history=True)
    assert [h["sigma_denoiser"] for h in hist] == SIGMAS and [h["step_size"] for h in hist] == STEPS
    stacked = dinv.physics.stack(*ops)
    stacked.set_ls_solver("CG", max_iter=100, tol=1e-6)
    init = (lambda y, p: (x0.clone(), torch.zeros_like(x0))) if algorithm == "admm" else (lambda y, p: x0.clone())
    solver = dinv.optim.optim_builder(algorithm.upper(), data_fidelity=L2(), prior=dinv.optim.PnP(denoiser=net),
                                      params_algo={"stepsize": STEPS, "g_param": SIGMAS, "lambda": 1.0}, max_iter=4,
                                      early_stop=False, custom_init=init)
    with torch.no_grad():
        ref = solver(y, stacked)
    assert _rel(out, ref) <= 1e-4, _rel(out, ref)
    for constant in ({"step_size": STEPS, "sigma_denoiser": SIGMAS[0]}, {"step_size": STEPS[0], "sigma_denoiser": SIGMAS}):
        other = dr.reconstruct(dphys, y, dnet, algorithm=algorithm, n_iter=4, x0=x0, progress=False,
                               prox_solver="fourier", **constant)
        assert _rel(other, ref) > 1e-3, constant  # each schedule is followed, not its first value
    # A distributed prior takes σ as its prox's keyword: the same schedule reaches it
    dprior = dr.distribute(dinv.optim.PnP(denoiser=net), dphys.ctx, patch_size=16, overlap=6)
    via_prior = dr.reconstruct(dphys, y, dprior, algorithm=algorithm, n_iter=4, step_size=STEPS, sigma_denoiser=SIGMAS,
                               x0=x0, progress=False, prox_solver="fourier")
    assert _rel(via_prior, ref) <= 1e-4, _rel(via_prior, ref)


def test_deepinvs_own_dpir_runs_on_the_distributed_physics_and_denoiser(problem):
    """``dinv.optim.DPIR(sigma, denoiser=dden)(y, dphys)`` as a deepinv user writes it, against the plain objects
    (the bundled DRUNet, one tile: its U-Net is not exact under overlap tiling)."""
    from daskrecon.models import bundled_drunet

    ops, x_true, y, _, dphys, _ = problem
    net, dnet = bundled_drunet(), dr.distribute(bundled_drunet(), dphys.ctx, patch_size=64, overlap=0)
    with torch.no_grad():
        ref = dinv.optim.DPIR(sigma=0.05, denoiser=net)(y, dinv.physics.stack(*ops))
        out = dinv.optim.DPIR(sigma=0.05, denoiser=dnet)(y, dphys)
    assert _rel(out, ref) <= 1e-4, _rel(out, ref)
    assert _rel(ref, dphys.A_adjoint(y) / 4) > 1e-2  # it iterated


def test_a_resumed_schedule_continues_where_it_stopped(problem, non_blind, tmp_path):
    y, dphys = problem[2], problem[4]
    kw = {"algorithm": "admm", "n_iter": 4, "step_size": STEPS, "sigma_denoiser": SIGMAS, "progress": False}
    ref = dr.reconstruct(dphys, y, non_blind[1], **kw)
    ck = str(tmp_path / "ck")

    def crash(k, x):
        if k == 2:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        dr.reconstruct(dphys, y, non_blind[1], checkpoint=ck, checkpoint_every=1, callback=crash, **kw)
    out = dr.reconstruct(dphys, y, non_blind[1], checkpoint=ck, checkpoint_every=1, resume=True, **kw)
    assert torch.equal(out, ref)
    with pytest.raises(CheckpointMismatchError, match="sigma_denoiser"):
        dr.reconstruct(dphys, y, non_blind[1], checkpoint=ck, resume=True, **{**kw, "sigma_denoiser": SIGMAS[::-1]})


def test_a_schedule_streamed_through_zarr_gives_the_same_bits(problem, non_blind, tmp_path):
    """Out of core, each iteration's σ and step reach the chunk-wise graph: bitwise the in-memory run."""
    y, dphys = problem[2], problem[4]
    kw = {"algorithm": "admm", "n_iter": 4, "step_size": STEPS, "sigma_denoiser": SIGMAS, "progress": False}
    ref = dr.reconstruct(dphys, y, non_blind[1], **kw)
    ys = [da.from_array(t.numpy(), chunks=(1, 3, 20, 18)) for t in y]
    out = dr.reconstruct(dphys, ys, non_blind[1], storage="zarr", checkpoint=str(tmp_path / "ck"), chunks=(20, 18), **kw)
    assert torch.equal(torch.from_numpy(out.compute()), ref)


def test_schedules_too_short_or_not_positive_are_refused(problem):
    y, dphys, dden = problem[2], problem[4], problem[5]
    with pytest.raises(ValueError, match=r"sigma_denoiser has 4 values \(one per iteration\) for n_iter=5"):
        dr.reconstruct(dphys, y, dden, algorithm="hqs", n_iter=5, step_size=0.5, sigma_denoiser=SIGMAS, progress=False)
    with pytest.raises(ValueError, match=r"step_size\[1\] must be > 0"):
        dr.reconstruct(dphys, y, dden, n_iter=2, step_size=[0.5, -0.1], progress=False)
    with pytest.raises(ValueError, match="step_size has 2 values"):
        dr.reconstruct(dphys, y, dden, algorithm=HQS([0.5, 0.4]), n_iter=3, progress=False)


def test_fista_with_a_red_prior_matches_a_plain_loop(problem):
    ops, x_true, y, model, dphys, dden = problem
    x0 = torch.zeros_like(x_true)
    out = dr.reconstruct(dphys, y, dden, algorithm="fista-red", red_weight=0.5, n_iter=4, step_size=0.2, x0=x0,
                         progress=False)
    stacked, x, z = dinv.physics.stack(*ops), x0.clone(), x0.clone()
    with torch.no_grad():
        for k in range(4):
            new = z - 0.2 * (L2().grad(z, y, stacked) + 0.5 * (z - model(z)))
            z = new + (k + 2) / (k + 3) * (new - x)
            x = new
    assert_allclose(out, x, atol=1e-4)
    red = dr.reconstruct(dphys, y, dden, algorithm="red", red_weight=0.5, n_iter=4, step_size=0.2, x0=x0,
                         progress=False)
    assert float((red - out).abs().max()) > 1e-3  # the momentum matters


def _subset_grad(ops, y, x, members):
    return sum(L2().grad(x, y[i], ops[i]) for i in members)


@pytest.mark.parametrize("algorithm", ["os-pnp", "svrg"])
def test_subset_methods_match_a_plain_loop(problem, algorithm):
    ops, x_true, y, model, dphys, dden = problem
    x0 = torch.zeros_like(x_true)
    n, m, tau, seed = len(ops), 2, 0.2, 7
    out, hist = dr.reconstruct(dphys, y, dden, algorithm=algorithm, n_iter=5, step_size=tau, x0=x0, progress=False,
                               return_history=True, n_subsets=m, seed=seed)
    parts = partition(n, m)
    x, anchor, mu, subsets = x0.clone(), None, None, []
    with torch.no_grad():
        for k in range(5):
            if algorithm == "os-pnp":
                j = subset_at(seed, k, m)
                g = n / len(parts[j]) * _subset_grad(ops, y, x, parts[j])
            elif k % (m + 1) == 0:  # an epoch: the full gradient, then every subset once
                j, anchor = None, x.clone()
                g = mu = _subset_grad(ops, y, x, range(n))
            else:
                j = epoch_order(seed, k // (m + 1), m)[k % (m + 1) - 1]
                w = n / len(parts[j])
                g = w * (_subset_grad(ops, y, x, parts[j]) - _subset_grad(ops, y, anchor, parts[j])) + mu
            subsets.append(j)
            x = model(x - tau * g)
    assert_allclose(out, x, atol=1e-4)
    assert [h.get("subset") for h in hist] == subsets
    assert len(set(s for s in subsets if s is not None)) == m  # every subset was visited
    full = dr.reconstruct(dphys, y, dden, n_iter=5, step_size=tau, x0=x0, progress=False)
    assert float((full - out).abs().max()) > 1e-3  # subset steps are not the full gradient


@pytest.mark.parametrize("algorithm", ALL)
def test_every_algorithm_resumes_its_whole_state_bitwise(problem, tmp_path, algorithm):
    ops, x_true, y, model, dphys, dden = problem
    kw = dict(algorithm=algorithm, n_iter=5, step_size=0.3, progress=False, **_options(algorithm))
    if algorithm == "sirt":  # no prior
        dden = None
    full, full_hist = dr.reconstruct(dphys, y, dden, return_history=True, **kw)

    def crash(k, x):
        if k == 3:
            raise KeyboardInterrupt("simulated crash after iteration 3")

    ck = str(tmp_path / "ck")
    with pytest.raises(KeyboardInterrupt):
        dr.reconstruct(dphys, y, dden, checkpoint=ck, callback=crash, **kw)
    resumed, hist = dr.reconstruct(dphys, y, dden, checkpoint=ck, resume=True, return_history=True, **kw)
    assert torch.equal(resumed, full)
    assert hist == full_hist
    other = "mlem" if algorithm == "sirt" else "pnp" if algorithm != "pnp" else "red"
    with pytest.raises(CheckpointMismatchError, match="algorithm"):  # another algorithm's state is not resumed
        dr.reconstruct(dphys, y, dden, checkpoint=ck, resume=True, algorithm=other, n_iter=5, step_size=0.3,
                       progress=False)


@pytest.mark.parametrize("algorithm", ["admm", "svrg"])
def test_streamed_state_and_scratch_vectors_give_the_same_bits(problem, tmp_path, algorithm):
    """Out of core, the whole state (and the CG vectors) stream through Zarr: same result, and a resume too."""
    ops, x_true, y, model, dphys, dden = problem
    kw = dict(algorithm=algorithm, n_iter=4, step_size=0.3, progress=False, **_options(algorithm))
    ref = dr.reconstruct(dphys, y, dden, **kw)
    ck = str(tmp_path / "ck")

    def crash(k, x):
        if k == 2:
            raise KeyboardInterrupt("simulated crash")

    ys = [da.from_array(t.numpy(), chunks=(1, 3, 20, 18)) for t in y]  # dask inputs: a dask result
    with pytest.raises(KeyboardInterrupt):
        dr.reconstruct(dphys, ys, dden, storage="zarr", checkpoint=ck, callback=crash, chunks=(20, 18), **kw)
    out = dr.reconstruct(dphys, ys, dden, storage="zarr", checkpoint=ck, resume=True, chunks=(20, 18), **kw)
    assert torch.equal(torch.from_numpy(out.compute()), ref)


def test_bad_combinations_are_refused_with_the_fix(problem):
    ops, x_true, y, model, dphys, dden = problem
    with pytest.raises(DaskreconError, match="needs an L2 data fidelity; operator 0 has L1.*algorithm='pnp'"):
        dr.reconstruct(dphys, y, dden, algorithm="hqs", n_iter=1, step_size=0.3, progress=False,
                       data_fidelity=dr.distribute(L1(), dphys.ctx))
    with pytest.raises(ValueError, match="'os-pnp' needs n_subsets"):
        dr.reconstruct(dphys, y, dden, algorithm="os-pnp", n_iter=1, step_size=0.3, progress=False)
    with pytest.raises(ValueError, match="n_subsets applies to 'os-pnp', 'svrg', 'osem', 'bsrem', not to 'pnp'"):
        dr.reconstruct(dphys, y, dden, n_iter=1, step_size=0.3, progress=False, n_subsets=2)
    with pytest.raises(ValueError, match="between 1 and the number of operators \\(4\\)"):
        dr.reconstruct(dphys, y, dden, algorithm="svrg", n_iter=1, step_size=0.3, progress=False, n_subsets=5)
    with pytest.raises(ValueError, match="carries its own step size"):
        dr.reconstruct(dphys, y, dden, algorithm=HQS(0.5), step_size=0.3, progress=False)
    with pytest.raises(ValueError, match="beta must be > 0"):
        ADMM(0.5, beta=0)
    with pytest.raises(ValueError, match="cg_max_iter must be a positive int"):
        HQS(0.5, cg_max_iter=0)
    with pytest.raises(ValueError, match="n_subsets must be a positive int"):
        OSPnP(0.5, n_subsets=0)


def test_a_step_rule_instance_runs_as_given(problem):
    ops, x_true, y, model, dphys, dden = problem
    x0 = torch.zeros_like(x_true)
    a = dr.reconstruct(dphys, y, dden, algorithm=SVRG(0.2, n_subsets=2, seed=3), n_iter=3, x0=x0, progress=False)
    b = dr.reconstruct(dphys, y, dden, algorithm="svrg", n_subsets=2, seed=3, step_size=0.2, n_iter=3, x0=x0,
                       progress=False)
    assert torch.equal(a, b)
    c = dr.reconstruct(dphys, y, dden, algorithm=ADMM(0.5, beta=0.5), n_iter=2, x0=x0, progress=False)
    d = dr.reconstruct(dphys, y, dden, algorithm="admm", step_size=0.5, n_iter=2, x0=x0, progress=False)
    assert float((c - d).abs().max()) > 1e-4  # beta is honoured
