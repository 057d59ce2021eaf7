"""Conjugate gradient and power method on the cluster, against dense linear algebra and deepinv."""

import dask.array as da
import pytest
import torch
import deepinv as dinv
from deepinv.optim import L2

import daskrecon as dr
from daskrecon.engine import linsolve
from daskrecon.runtime import halos as staging
from daskrecon.engine.checkpoint import Checkpoint
from daskrecon.engine.linsolve import Workspace, lipschitz, prox_data
from daskrecon.engine.problem import with_stager
from daskrecon.frontend.reconstruct import plan_problem
from daskrecon.frontend.reconstruct import default_step_size, step_size_bound
from daskrecon.runtime.waiting import compute

from helpers import heterogeneous, noisy_measurements, small_dncnn


@pytest.fixture(scope="module")
def planned(ctx):
    torch.manual_seed(0)
    ops = heterogeneous()  # blur, downsampling, inpainting: different outputs, a non-trivial Σ AᵢᵀAᵢ
    x_true = torch.rand(1, 3, 36, 30)
    y = noisy_measurements(ops, x_true, sigma=0.05)
    dphys = dr.distribute(ops, ctx)
    dden = dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=4)

    def plan(storage="memory", sigma=1.0):
        fid = dr.distribute(L2(sigma=sigma), ctx)
        return plan_problem(dphys, y, dden, data_fidelity=fid, x0=torch.zeros_like(x_true), x_true=None,
                            sigma_denoiser=0.05, storage=storage, chunks=(18, 15))[0]

    return ops, x_true, y, dphys, plan


def _dense_normal(ops, shape, sigma=1.0):
    """Σ AᵢᵀAᵢ / σ² as a dense matrix (n × n), column by column."""
    n = torch.Size(shape).numel()
    basis = torch.eye(n).reshape(n, *shape[1:])
    return sum(op.A_adjoint(op.A(basis)).reshape(n, n) for op in ops) / sigma ** 2


def _value(ctx, arr):
    return torch.from_numpy(compute([arr], client=ctx.client, what="test")[0])


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_prox_solves_the_normal_equations(planned, ctx, sigma):
    ops, x_true, y, dphys, plan = planned
    problem = plan(sigma=sigma)
    v = torch.rand(x_true.shape)
    gamma = 0.7
    u, f_v, info = prox_data(problem, da.from_array(v.numpy(), chunks=problem.chunks), gamma, Workspace(problem), max_iter=200, tol=1e-6)
    u = _value(ctx, u)
    # dense: (I + γ H) u = v + γ Σ Aᵢᵀyᵢ / σ²
    H = _dense_normal(ops, x_true.shape, sigma)
    b = v.reshape(-1) + gamma * sum(op.A_adjoint(t).reshape(-1) for op, t in zip(ops, y)) / sigma ** 2
    exact = torch.linalg.solve(torch.eye(H.shape[0]) + gamma * H.double().float(), b)
    rel = float(torch.linalg.vector_norm(u.reshape(-1) - exact) / torch.linalg.vector_norm(exact))
    assert rel <= 1e-5, rel
    assert info.relative_residual <= 1e-6 and 2 <= info.iterations <= 200
    ref = L2(sigma=sigma).prox(v, y, dinv.physics.stack(*ops), gamma=gamma)  # deepinv's own prox (its CG)
    assert float(torch.linalg.vector_norm(u - ref) / torch.linalg.vector_norm(ref)) <= 1e-3
    f_ref = sum(float(L2(sigma=sigma).fn(v, t, op)) for op, t in zip(ops, y))
    assert abs(f_v - f_ref) <= 1e-5 * f_ref  # the data term at v, from the first pass
    assert float((u - v).abs().max()) > 1e-2  # the prox moved v


def test_prox_in_scratch_zarr_is_bitwise_the_in_memory_one(planned, ctx, tmp_path):
    ops, x_true, y, dphys, plan = planned
    problem = plan()
    v = da.from_array(torch.rand(x_true.shape).numpy(), chunks=problem.chunks)
    u1, f1, i1 = prox_data(problem, v, 0.5, Workspace(problem), max_iter=30, tol=1e-5)
    store = Checkpoint(str(tmp_path / "s"))
    stager = staging.Stager(store)  # as the engine runs it out of core: halos through Zarr
    staged = with_stager(problem, stager)
    u2, f2, i2 = prox_data(staged, v, 0.5, Workspace(staged, store, streamed=True), max_iter=30, tol=1e-5)
    L2 = lipschitz(staged, Workspace(staged, store, streamed=True), seed=1)
    assert torch.equal(_value(ctx, u1), _value(ctx, u2)) and f1 == f2 and i1 == i2
    assert i2.iterations > 3
    problem.physics.__dict__.pop("_lipschitz_cache")  # computed again, in memory
    assert L2 == lipschitz(problem, Workspace(problem), seed=1)
    # every pass of CG and of the power method reuses the last one's scratch arrays
    assert 0 < len(stager._made) <= 4 * problem.num_operators + 2, sorted(stager._made)
    assert (tmp_path / "s" / "scratch_cg-ur").exists()


def test_power_method_finds_the_largest_eigenvalue_once_and_sets_the_default_step(planned, monkeypatch):
    ops, x_true, y, dphys, plan = planned
    problem = plan(sigma=0.5)
    L = lipschitz(problem, Workspace(problem))
    exact = float(torch.linalg.eigvalsh(_dense_normal(ops, x_true.shape, 0.5).double()).max())
    assert abs(L - exact) <= 1e-3 * exact, (L, exact)
    assert step_size_bound(problem) >= exact * (1 - 1e-3)  # the closed-form bound holds (with 1/σ²)...
    assert step_size_bound(problem) > 1.05 * exact  # ...and is looser
    monkeypatch.setattr(linsolve.graph, "gradient", lambda *a, **k: pytest.fail("cached: no pass over the data"))
    assert default_step_size(problem) == 1 / L  # computed once per problem, cached with the physics




@pytest.mark.parametrize("storage", ["memory", "zarr"])
def test_fourier_prox_solves_the_normal_equations_for_circular_blurs(ctx, tmp_path, storage):
    """The closed form (one FFT of the assembled image) against the dense solution; CG agrees; a mask
    (not a convolution) is refused with the operator's index."""
    from daskrecon.engine.linsolve import fourier_diagonal

    from helpers import blurs

    torch.manual_seed(0)
    ops = blurs(3)
    x_true = torch.rand(1, 3, 20, 18)
    y = noisy_measurements(ops, x_true, sigma=0.05)
    sigma, gamma = 0.5, 0.7
    fid = dr.distribute(L2(sigma=sigma), ctx)
    problem = plan_problem(dr.distribute(ops, ctx), y, dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=4),
                           data_fidelity=fid, x0=torch.zeros_like(x_true), x_true=None, sigma_denoiser=0.05,
                           storage=storage, chunks=(10, 9))[0]
    assert fourier_diagonal(problem) is None
    v = torch.rand(x_true.shape)
    store = Checkpoint(str(tmp_path / "ws")) if storage == "zarr" else None
    ws = Workspace(problem, store, streamed=storage == "zarr")
    u, f_v, info = prox_data(problem, da.from_array(v.numpy(), chunks=problem.chunks), gamma, ws, solver="fourier")
    assert info.iterations == 0
    u = _value(ctx, u)
    H = _dense_normal(ops, x_true.shape, sigma)
    b = v.reshape(-1) + gamma * sum(op.A_adjoint(t).reshape(-1) for op, t in zip(ops, y)) / sigma ** 2
    exact = torch.linalg.solve(torch.eye(H.shape[0]) + gamma * H, b)
    assert float(torch.linalg.vector_norm(u.reshape(-1) - exact) / torch.linalg.vector_norm(exact)) < 1e-5
    u_cg, f_cg, info_cg = prox_data(problem, da.from_array(v.numpy(), chunks=problem.chunks), gamma, ws,
                                    solver="cg", max_iter=200, tol=1e-7)
    assert info_cg.iterations > 3
    assert abs(float(compute([f_v], client=ctx.client, what="test")[0]) - f_cg) <= 1e-5 * abs(f_cg)

    masked = heterogeneous()  # blur, downsampling, inpainting
    problem = plan_problem(dr.distribute(masked, ctx), noisy_measurements(masked, torch.rand(1, 3, 36, 30)),
                           dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=4), data_fidelity=fid,
                           x0=torch.zeros(1, 3, 36, 30), x_true=None, sigma_denoiser=0.05, chunks=(18, 15))[0]
    assert fourier_diagonal(problem) == "operator 2 is not a circular convolution (subsampled or not)"
    with pytest.raises(ValueError, match="operator 2 is not a circular convolution"):
        prox_data(problem, da.zeros((1, 3, 36, 30), chunks=problem.chunks), gamma, Workspace(problem), solver="fourier")


@pytest.mark.parametrize("storage", ["memory", "zarr"])
def test_fourier_prox_in_closed_form_for_subsampled_circular_blurs(ctx, tmp_path, storage):
    """Downsampling (factor 2) and circular blurs: H is block diagonal in Fourier (4×4 blocks); the
    closed form equals the dense solution and CG, at a non-zero residual."""
    from daskrecon.engine.linsolve import fourier_period

    from helpers import blurs

    torch.manual_seed(1)
    shape = (1, 2, 24, 20)
    ops = [dinv.physics.Downsampling(img_size=shape[1:], factor=2, filter="gaussian", padding="circular"),
           blurs(1)[0],
           dinv.physics.Downsampling(img_size=shape[1:], factor=2, filter="bicubic", padding="circular")]
    x_true = torch.rand(shape)
    y = noisy_measurements(ops, x_true, sigma=0.05)
    sigma, gamma = 0.5, 0.7
    problem = plan_problem(dr.distribute(ops, ctx), y, dr.distribute(small_dncnn(2), ctx, patch_size=12, overlap=4),
                           data_fidelity=dr.distribute(L2(sigma=sigma), ctx), x0=torch.zeros(shape), x_true=None,
                           sigma_denoiser=0.05, storage=storage, chunks=(12, 10))[0]
    assert fourier_period(problem) == (2, None)
    v = torch.rand(shape)
    store = Checkpoint(str(tmp_path / "ws")) if storage == "zarr" else None
    ws = Workspace(problem, store, streamed=storage == "zarr")
    u, f_v, info = prox_data(problem, da.from_array(v.numpy(), chunks=problem.chunks), gamma, ws, solver="fourier")
    assert info.iterations == 0
    u = _value(ctx, u)
    H = _dense_normal(ops, shape, sigma)
    b = v.reshape(-1) + gamma * sum(op.A_adjoint(t).reshape(-1) for op, t in zip(ops, y)) / sigma ** 2
    exact = torch.linalg.solve(torch.eye(H.shape[0]) + gamma * H, b)
    assert float(torch.linalg.vector_norm(b - exact) / torch.linalg.vector_norm(b)) > 0.05  # the prox moves b
    assert float(torch.linalg.vector_norm(u.reshape(-1) - exact) / torch.linalg.vector_norm(exact)) < 1e-5
    u_cg, f_cg, _ = prox_data(problem, da.from_array(v.numpy(), chunks=problem.chunks), gamma, ws,
                              solver="cg", max_iter=300, tol=1e-8)
    assert abs(float(compute([f_v], client=ctx.client, what="test")[0]) - f_cg) <= 1e-5 * abs(f_cg)
    u_cg = _value(ctx, u_cg)
    assert float(torch.linalg.vector_norm(u_cg - u) / torch.linalg.vector_norm(u)) < 1e-4


@pytest.mark.parametrize("sides", [(6, 4, 8), (12, 10)])
def test_polyphase_solve_is_the_dense_solve_in_2d_and_3d(sides):
    """The polyphase kernel against a dense solve, for H = Σ KᵢᵀSᵀSKᵢ (circular filters, 2× subsampling
    along every axis), built here from its definition, not from deepinv."""
    import numpy as np

    from daskrecon.tasks.linsolve import polyphase_solve

    rng = np.random.default_rng(4)
    d, n = len(sides), int(np.prod(sides))
    filters = [np.fft.fftn(rng.standard_normal(sides) * (rng.random(sides) < 0.2)) for _ in range(2)]

    def normal(x):  # Σ Kᵀ Sᵀ S K x for one channel
        out = np.zeros(sides)
        keep = np.zeros(sides)
        keep[(slice(None, None, 2),) * d] = 1
        for f in filters:
            kx = np.fft.ifftn(f * np.fft.fftn(x)).real * keep
            out += np.fft.ifftn(np.conj(f) * np.fft.fftn(kx)).real
        return out

    H = np.stack([normal(e.reshape(sides)).ravel() for e in np.eye(n)], axis=1)
    responses = []
    for p in np.ndindex(*(2,) * d):
        delta = np.zeros(sides)
        delta[p] = 1
        responses.append(np.stack([normal(delta)] * 2)[None])  # (1, 2 channels, *sides)
    rhs = rng.standard_normal((1, 2, *sides))
    c = 0.3
    got = polyphase_solve(rhs, c, *responses)
    for ch in range(2):
        exact = np.linalg.solve(np.eye(n) + c * H, rhs[0, ch].ravel())
        assert np.linalg.norm(got[0, ch].ravel() - exact) <= 1e-10 * np.linalg.norm(exact)
    with pytest.raises(ValueError, match="do not tile a period cell"):
        polyphase_solve(rhs, c, *responses[:3])
