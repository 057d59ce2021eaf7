"""engine.problem: a reconstruction planned once — shapes, chunks from the problem alone, storage, forms."""

import pytest
import torch

import daskrecon as dr
from daskrecon.engine import problem as problem_module
from daskrecon.errors import ShapeError
from daskrecon.frontend.reconstruct import plan_problem

from helpers import blurs, noisy_measurements, small_dncnn


def _plan(ctx, y=None, ops=None, **kw):
    torch.manual_seed(0)
    ops = blurs(2) if ops is None else ops
    x = torch.rand(1, 3, 64, 48)
    y = noisy_measurements(ops, x) if y is None else y
    args = dict(data_fidelity=None, x0=None, x_true=None, sigma_denoiser=0.05)
    args.update(kw)
    return plan_problem(dr.distribute(ops, ctx), y, dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=6), **args)


def test_the_plan_depends_on_the_problem_not_on_the_cluster(ctx1, ctx3):
    (p1, _), (p3, _) = _plan(ctx1), _plan(ctx3)
    assert p1.shape == p3.shape == (1, 3, 64, 48) and p1.chunks == p3.chunks
    assert p1.record == {**p3.record, "operators": p1.record["operators"], "denoiser": p1.record["denoiser"]}
    assert p1.storage == p3.storage == "memory" and p1.denoise_method == "__call__"


def test_storage_streams_when_the_working_set_exceeds_the_cluster(ctx, monkeypatch):
    monkeypatch.setattr(problem_module, "_WORKING_COPIES", 10**9)
    problem, _ = _plan(ctx)
    assert problem.storage == "zarr"
    problem, _ = _plan(ctx, storage="memory")
    assert problem.storage == "memory"  # asked for: kept


def test_given_chunks_and_a_given_start(ctx):
    problem, x0 = _plan(ctx, chunks=(32, 24), x0=torch.zeros(1, 3, 64, 48))
    assert problem.chunks[2:] == ((32, 32), (24, 24)) and x0.chunks == problem.chunks
    with pytest.raises(ValueError, match=r"chunks must be \(height, width\)"):
        _plan(ctx, chunks=(32,))


def test_asked_chunks_too_small_for_the_denoisers_tiles_are_named_in_its_terms(ctx):
    """chunks=(10, 10) with reflect blurs and a denoiser of overlap 16 failed inside dask at the first
    iteration ("Shapes do not align"); then in the tiled pass's words for a dask array ("rechunk")."""
    import deepinv as dinv
    from deepinv.physics.functional.blur import gaussian_blur

    ops = [dinv.physics.Blur(filter=gaussian_blur(sigma=(s, s)), padding="reflect") for s in (1.0, 1.5)]
    y = noisy_measurements(ops, torch.rand(1, 3, 67, 93))
    den = dr.distribute(small_dncnn(3), ctx, patch_size=32, overlap=16)

    def planned(chunks):
        return plan_problem(dr.distribute(ops, ctx), y, den, data_fidelity=None, x0=None, x_true=None,
                            sigma_denoiser=0.05, storage="zarr", chunks=chunks)[0]

    with pytest.raises(ShapeError, match=r"chunks=\(10, 10\) makes chunks of 13-15 px along axis 2 .* the "
                                         r"denoiser's tiles need at least its overlap, 16 px: pass chunks of at least 16 px"):
        planned((10, 10))
    assert planned((16, 16)).chunks[2:] == ((16, 16, 16, 19), (16, 16, 16, 16, 16, 13))  # a short remainder: folded


def test_measurements_of_the_wrong_shape_are_named_when_planned(ctx):
    import deepinv as dinv
    from deepinv.physics.functional.blur import gaussian_blur

    # chunk-wise operators: their output shape is known when planning (whole ones check in their task)
    ops = [dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0, 1.0)), padding="reflect") for _ in range(2)]
    y = noisy_measurements(ops, torch.rand(1, 3, 64, 48))
    y[1] = y[1][..., :40]
    with pytest.raises(ShapeError, match=r"y\[1\] has shape \(1, 3, 64, 40\)"):
        _plan(ctx, y=y, ops=ops, x0=torch.zeros(1, 3, 64, 48))


def test_a_prior_is_called_through_its_prox(ctx):
    from deepinv.optim import PnP

    torch.manual_seed(0)
    ops = blurs(2)
    y = noisy_measurements(ops, torch.rand(1, 3, 64, 48))
    prior = dr.distribute(PnP(small_dncnn(3)), ctx, patch_size=16, overlap=6)
    problem, _ = plan_problem(dr.distribute(ops, ctx), y, prior, data_fidelity=None, x0=None, x_true=None,
                              sigma_denoiser=0.1)
    assert problem.denoise_method == "prox" and problem.denoise_kwargs == {"sigma_denoiser": 0.1}
    with pytest.raises(TypeError, match="denoiser must be a DistributedProcessing or DistributedPrior"):
        plan_problem(dr.distribute(ops, ctx), y, small_dncnn(3), data_fidelity=None, x0=None, x_true=None,
                     sigma_denoiser=0.1)
    from deepinv.optim import L2

    for fidelity in ("l2", L2()):  # a name, or deepinv's object not distributed: said, not an AttributeError
        with pytest.raises(TypeError, match=r"data_fidelity must be a DistributedDataFidelity: dr.distribute"):
            plan_problem(dr.distribute(ops, ctx), y, prior, data_fidelity=fidelity, x0=None, x_true=None,
                         sigma_denoiser=0.1)


def test_the_stager_is_carried_by_the_plan_not_by_the_process(ctx, tmp_path):
    """Out of core, halos go through Zarr because the plan says so: the problem's forms and its
    denoiser call hold the stager; graphs built from the plain plan (or by anyone else) are dask's."""
    import dask.array as da

    from daskrecon.engine import iteration
    from daskrecon.engine.checkpoint import Checkpoint
    from daskrecon.runtime.halos import Stager

    import deepinv as dinv
    from deepinv.physics.functional.blur import gaussian_blur

    ops = [dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0, 1.0)), padding="reflect") for _ in range(2)]
    problem, _ = _plan(ctx, ops=ops, chunks=(32, 24))
    stager = Stager(Checkpoint(tmp_path / "ck"))
    staged = problem_module.with_stager(problem, stager)
    assert problem.stager is None and all(f.stager is None for f in problem.forms)  # the plain plan is untouched
    assert staged.stager is stager and all(f.stager is stager for f in staged.forms)
    x = da.zeros(problem.shape, chunks=problem.chunks, dtype="f4")

    def layers(p):
        grad, _ = iteration.gradient(p, x)
        return set(grad.__dask_graph__().layers) | set(iteration.denoise(p, x, "d").__dask_graph__().layers)

    assert any(k.startswith("halo-read") for k in layers(staged))
    assert not any(k.startswith("halo-read") for k in layers(problem))
    assert problem_module.with_stager(staged, None).forms[0].stager is None


def _scale_by_two(x):
    return 2 * x


def test_the_axes_along_which_every_operator_is_the_same(ctx):
    """A slicewise operator is one 2-D operator on every slice (the depth, axis 2); a blur is not the same
    everywhere (its borders), and an operator that runs whole declares nothing."""
    import deepinv as dinv

    tomo = dinv.physics.Tomography(angles=torch.linspace(0, 180, 9)[:-1], img_width=16, circle=False)
    blur = dinv.physics.Blur(filter=torch.ones(1, 1, 3, 3) / 9, padding="reflect")
    whole = dinv.physics.LinearPhysics(A=_scale_by_two, A_adjoint=_scale_by_two)
    x = torch.rand(1, 1, 6, 16, 16)
    ops = [dr.slicewise(tomo), dr.slicewise(blur), whole]
    y = [op.A(x) for op in ops]
    problem, _ = plan_problem(dr.distribute(ops, ctx), y, None, data_fidelity=None, x0=None, x_true=None,
                              sigma_denoiser=0.05, chunks=(2, 16, 16))
    assert problem.forms[2] is None and problem.forms[0] is not None
    assert problem.invariant_axes([0, 1]) == (2,) and problem.invariant_axes([1]) == (2,)
    assert problem.invariant_axes() == () and problem.invariant_axes([2]) == ()
    assert problem.reduced((2,)) == ((1, 1, 1, 16, 16), ((1,), (1,), (1,), (16,), (16,)))
    assert problem.reduced(()) == (problem.shape, problem.chunks) and problem.chunks[2] == (2, 2, 2)
    flat, _ = _plan(ctx)  # 2-D blurs: the same nowhere (their borders)
    assert flat.invariant_axes() == ()


def test_x_true_of_another_shape_or_kind_is_refused_by_name(ctx):
    """Before any pass over the data, with the shapes or the kind named (it was dask's "Chunks do not add up")."""
    import dask.array as da

    torch.manual_seed(0)
    ops = blurs(2)
    x = torch.rand(1, 3, 16, 16)
    y = noisy_measurements(ops, x)
    physics = dr.distribute(ops, ctx)
    den = dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=4)
    for bad in (x[..., :8], da.from_array(x.numpy())[..., :8]):
        with pytest.raises(ShapeError, match=r"x_true has shape \(1, 3, 16, 8\), and the signal \(1, 3, 16, 16\)"):
            dr.reconstruct(physics, y, den, n_iter=1, x_true=bad)
    with pytest.raises(TypeError, match=r"x_true must be .* got ndarray \(torch.from_numpy"):
        dr.reconstruct(physics, y, den, n_iter=1, x_true=x.numpy())
    with pytest.raises(TypeError, match=r"y\[0\] must be .* got ndarray \(torch.from_numpy"):
        dr.reconstruct(physics, [v.numpy() for v in y], den, n_iter=1)
