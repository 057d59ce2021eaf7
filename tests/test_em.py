"""MLEM and OSEM (daskrecon.engine.algorithms, daskrecon.tasks.poisson) against deepinv 0.5's own, on Poisson data."""

import pytest
import torch
import deepinv as dinv

import daskrecon as dr
from daskrecon.frontend.measurements import MeasurementList
from daskrecon.planning.subsets import epoch_order

from helpers import blurs, small_dncnn


def _poisson(ops, x, gain=60.0, seed=1):
    """Photon counts ``Poisson(gain · A_i x) / gain``: positive, noisy measurements."""
    g = torch.Generator().manual_seed(seed)
    return dinv.utils.TensorList([torch.poisson(gain * op.A(x).clamp(min=0), generator=g) / gain for op in ops])


def _operators(kind):
    if kind == "blurs":  # chunk-wise forms: the engine runs them chunk by chunk
        return blurs(4), torch.rand(1, 3, 40, 36) + 0.1
    angles = torch.linspace(0, 180, 24)
    if kind == "ct-volume":  # the same, slice by slice through a volume: chunk-wise along the depth
        ops = [dr.slicewise(dinv.physics.Tomography(angles=angles[j::4], img_width=24, circle=False)) for j in range(4)]
        return ops, torch.rand(1, 1, 6, 24, 24, generator=torch.Generator().manual_seed(3)) + 0.1
    # parallel-beam CT, four interleaved angle sets: whole-image operators on their workers
    ops = [dinv.physics.Tomography(angles=angles[j::4], img_width=32, circle=False) for j in range(4)]
    return ops, torch.rand(1, 1, 32, 32) + 0.1


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _stacked_poisson(ops):
    return dinv.optim.StackedPhysicsDataFidelity([dinv.optim.PoissonLikelihood() for _ in ops])


def _deepinv_mlem(algo, y, ops):
    """deepinv's MLEM on stacked physics: its iterations, with the sensitivity computed per measurement.

    (deepinv 0.5's ``MLEM.forward`` takes ``torch.ones_like(y)``, which a ``TensorList`` — the
    measurements of a ``StackedLinearPhysics`` — does not pass; the iterations themselves take it.)
    """
    physics = dinv.physics.StackedLinearPhysics(ops)
    sensitivity = physics.A_adjoint(dinv.utils.TensorList([torch.ones_like(t) for t in y]))
    return super(dinv.optim.MLEM, algo).forward(y, physics, sensitivity=sensitivity)


@pytest.mark.parametrize("kind", ["blurs", "tomography", "ct-volume"])
def test_mlem_is_deepinvs_mlem(ctx, kind):
    ops, x_true = _operators(kind)
    y = _poisson(ops, x_true)
    dphys = dr.distribute(_operators(kind)[0], ctx)  # fresh: a Tomography that ran does not pickle
    ref = _deepinv_mlem(dinv.optim.MLEM(data_fidelity=_stacked_poisson(ops), max_iter=6), y, ops)
    out, hist = dr.reconstruct(dphys, y, None, algorithm="mlem", n_iter=6, progress=False, return_history=True)
    assert _rel(out, ref) <= 1e-5
    assert float(out.min()) > 0  # multiplicative updates from ones stay positive
    nll = [h["data_fidelity"] for h in hist]
    assert nll == sorted(nll, reverse=True)  # EM decreases the Poisson likelihood's negative log
    assert _rel(out, torch.ones_like(out)) > 0.1  # it moved


def test_mlem_with_a_red_prior_is_deepinvs_one_step_late_map_em(ctx):
    ops, x_true = _operators("blurs")
    y = _poisson(ops, x_true)
    model = small_dncnn(3)
    lam = 0.05
    ref = _deepinv_mlem(dinv.optim.MLEM(data_fidelity=_stacked_poisson(ops), prior=dinv.optim.RED(model), lambda_reg=lam,
                                        g_param=0.05, max_iter=4), y, ops)
    out = dr.reconstruct(dr.distribute(ops, ctx), y, dr.distribute(model, ctx, patch_size=16, overlap=6),
                         algorithm="mlem", red_weight=lam, sigma_denoiser=0.05, n_iter=4, progress=False)
    plain = dr.reconstruct(dr.distribute(ops, ctx), y, None, algorithm="mlem", n_iter=4, progress=False)
    assert _rel(out, ref) <= 1e-5
    assert _rel(out, plain) > 1e-3  # the prior term acts


@pytest.mark.parametrize("kind", ["blurs", "tomography", "ct-volume"])
def test_osem_is_deepinvs_osem_epoch_by_epoch_in_the_seeded_order(ctx, kind):
    ops, x_true = _operators(kind)
    y = _poisson(ops, x_true)
    m, seed, epochs = len(ops), 7, 3
    dphys = dr.distribute(_operators(kind)[0], ctx)  # fresh: a Tomography that ran does not pickle
    out, hist = dr.reconstruct(dphys, y, None, algorithm="osem", n_subsets=m, seed=seed, n_iter=m * epochs,
                               progress=False, return_history=True)
    # deepinv's OSEM: one iteration visits its subsets in the order given; ours draws an order per epoch
    x = torch.ones_like(x_true)
    for e in range(epochs):
        order = epoch_order(seed, e, m)
        assert [h["subset"] for h in hist[e * m:(e + 1) * m]] == order
        x = dinv.optim.OSEM(max_iter=1)(dinv.utils.TensorList([y[j] for j in order]),
                                        dinv.physics.StackedLinearPhysics([ops[j] for j in order]), init=x)
    assert _rel(out, x) <= 1e-5
    mlem = dr.reconstruct(dphys, y, None, algorithm="mlem", n_iter=epochs, progress=False)
    assert _rel(out, mlem) > 1e-3  # subset updates are not MLEM's


def test_em_refuses_what_it_cannot_run(ctx):
    ops, x_true = _operators("blurs")
    y = _poisson(ops, x_true)
    with pytest.raises(TypeError, match="algorithm 'pnp' needs a denoiser"):
        dr.reconstruct(dr.distribute(ops, ctx), y, None, algorithm="pnp", n_iter=1, progress=False)
    with pytest.raises(ValueError, match="'osem' needs n_subsets"):
        dr.reconstruct(dr.distribute(ops, ctx), y, None, algorithm="osem", n_iter=1, progress=False)
    nonlinear = [dinv.physics.Physics(A=lambda x: x ** 2)] * 2
    with pytest.raises(TypeError, match="mlem back-projects with A_iᵀ: operators \\[0, 1\\] are not linear"):
        dr.reconstruct(dr.distribute(nonlinear, ctx), [x_true ** 2] * 2, None, algorithm="mlem", n_iter=1,
                       x0=x_true, progress=False)


def _deepinv_sirt_by_formula(ops, y, x, n_iter, tau=1.0, eps=1e-8):
    """deepinv's SIRTIteration, written out for stacked physics (its normalizers take ``ones_like(y)``,
    which a TensorList does not pass): ``x + τ Aᵀ((y − A x) / A1) / Aᵀ1``."""
    stacked = dinv.physics.StackedLinearPhysics(ops)
    rows = [op.A(torch.ones_like(x)).clamp(min=eps) for op in ops]
    cols = stacked.A_adjoint(dinv.utils.TensorList([torch.ones_like(t) for t in y])).clamp(min=eps)
    for _ in range(n_iter):
        resid = dinv.utils.TensorList([(t - op.A(x)) / r for t, op, r in zip(y, ops, rows)])
        x = x + tau * stacked.A_adjoint(resid) / cols
    return x


@pytest.mark.parametrize("kind", ["blurs", "tomography", "ct-volume"])
def test_sirt_is_deepinvs_sirt(ctx, kind):
    ops, x_true = _operators(kind)
    y = _poisson(ops, x_true)
    # one operator: deepinv's own SIRT object, as it ships
    one = dr.reconstruct(dr.distribute(_operators(kind)[0][:1], ctx), [y[0]], None, algorithm="sirt", n_iter=5,
                         step_size=1.5, progress=False)
    assert _rel(one, dinv.optim.SIRT(stepsize=1.5, max_iter=5)(y[0], ops[0])) <= 1e-5
    # four: the same iteration over the stacked physics, from deepinv's start Σ Aᵢᵀyᵢ
    out, hist = dr.reconstruct(dr.distribute(_operators(kind)[0], ctx), y, None, algorithm="sirt", n_iter=5,
                               progress=False, return_history=True)
    start = dinv.physics.StackedLinearPhysics(ops).A_adjoint(y)
    assert _rel(out, _deepinv_sirt_by_formula(ops, y, start, 5)) <= 1e-5
    values = [h["data_fidelity"] for h in hist]
    assert values == sorted(values, reverse=True)  # the least-squares term decreases


def test_sirt_refuses_a_prior(ctx):
    ops, x_true = _operators("blurs")
    with pytest.raises(ValueError, match="sirt takes no prior"):
        dr.reconstruct(dr.distribute(ops, ctx), _poisson(ops, x_true), dr.distribute(small_dncnn(3), ctx),
                       algorithm="sirt", n_iter=1, progress=False)


@pytest.mark.parametrize("kind,prior", [("blurs", None), ("tomography", None), ("tomography", "rdp"),
                                        ("blurs", "red"), ("ct-volume", None)])
def test_bsrem_is_deepinvs_bsrem(ctx, kind, prior):
    """Subsets in deepinv's fixed order, its preconditioner, support and clamp; deepinv's relative-difference
    prior (RDP) tile by tile, or RED's gradient for a denoiser."""
    ops, x_true = _operators(kind)
    y = _poisson(ops, x_true)
    m = len(ops)
    model = small_dncnn(x_true.shape[1])
    deepinv_prior = {None: None, "rdp": dinv.optim.RDP(gamma=2.0), "red": dinv.optim.RED(model)}[prior]
    ref = dinv.optim.BSREM(prior=deepinv_prior, num_subsets=m, lambda_reg=0.3, g_param=0.05, stepsize=0.7,
                           max_iter=2)(dinv.utils.TensorList(y), dinv.physics.StackedLinearPhysics(ops))
    den = {None: None, "rdp": lambda: dr.distribute(dinv.optim.RDP(gamma=2.0), ctx, patch_size=16, overlap=2),
           "red": lambda: dr.distribute(model, ctx, patch_size=16, overlap=6)}[prior]
    dphys = dr.distribute(_operators(kind)[0], ctx)  # fresh: a Tomography that ran does not pickle
    out, hist = dr.reconstruct(dphys, y, den() if den else None, algorithm="bsrem", n_subsets=m, n_iter=2 * m,
                               step_size=0.7, red_weight=0.3, sigma_denoiser=0.05, progress=False,
                               return_history=True)
    assert _rel(out, ref) <= 1e-5
    assert [h["subset"] for h in hist] == [k % m for k in range(2 * m)]
    assert float(out.min()) > 0 and _rel(out, torch.ones_like(out)) > 0.1
    if prior is not None:
        plain = dr.reconstruct(dphys, y, None, algorithm="bsrem", n_subsets=m, n_iter=2 * m, step_size=0.7,
                               progress=False)
        assert _rel(out, plain) > 1e-4  # the prior acts


def test_deepinvs_own_mlem_object_runs_on_the_distributed_physics(ctx):
    """deepinv's ``MLEM`` as it ships: ``torch.ones_like`` of the distributed physics' measurements works
    (a MeasurementList), each operator runs on its worker, and the result is deepinv's on its own stack."""
    ops, x_true = _operators("tomography")
    y = _poisson(ops, x_true)
    dphys = dr.distribute(_operators("tomography")[0], ctx)
    ym = MeasurementList(list(y))
    assert isinstance(dphys(x_true), MeasurementList)
    ones = torch.ones_like(ym)
    assert isinstance(ones, MeasurementList) and all(torch.equal(o, torch.ones_like(t)) for o, t in zip(ones, y))
    algo = dinv.optim.MLEM(data_fidelity=dr.distribute(dinv.optim.PoissonLikelihood(), ctx), max_iter=5)
    out = algo(ym, dphys)
    ref = _deepinv_mlem(dinv.optim.MLEM(data_fidelity=_stacked_poisson(ops), max_iter=5), y, ops)
    assert _rel(out, ref) <= 1e-5 and _rel(out, torch.ones_like(out)) > 0.1
    with pytest.raises(TypeError):  # deepinv's own stacked measurements do not pass its MLEM (what this fixes)
        torch.ones_like(dinv.utils.TensorList(list(y)))


def _owner_of_each_task(ts, prefix):
    """``{operator index: worker}`` of the tasks named ``<prefix>-<i>-<token>`` in a task stream."""
    return {int(t["key"].split("-")[-2]): t["worker"] for t in ts.data if t["key"].startswith(prefix + "-")}


@pytest.mark.parametrize("kind, algo", [("blurs", "OSEM"), ("tomography", "OSEM"), ("tomography", "BSREM")])
def test_deepinvs_own_subset_objects_run_on_the_distributed_physics(ctx, kind, algo):
    """deepinv's ``OSEM`` and ``BSREM`` as they ship take the distributed stack as their pre-split
    subsets (a ``StackedLinearPhysics``): ``physics[l]`` is operator ``l`` run on the worker holding it."""
    from distributed import get_task_stream

    ops, x_true = _operators(kind)
    y = _poisson(ops, x_true)
    dphys = dr.distribute(_operators(kind)[0], ctx)
    assert isinstance(dphys, dinv.physics.StackedLinearPhysics) and len(dphys.physics_list) == len(ops)
    make = lambda: getattr(dinv.optim, algo)(num_subsets=len(ops), max_iter=3)  # noqa: E731
    ref = make()(y, dinv.physics.StackedLinearPhysics(ops))
    with get_task_stream(ctx.client) as ts:
        out = make()(MeasurementList(list(y)), dphys)
    assert _rel(out, ref) <= 1e-5 and _rel(out, torch.ones_like(out)) > 0.1
    ran = _owner_of_each_task(ts, "forward_op")
    assert ran == dict(enumerate(dphys.owners))  # every subset's projection on its operator's worker
    assert not dphys.stack.built_on_driver  # no operator was rebuilt on the driver


@pytest.mark.parametrize("kind", ["blurs", "tomography"])
def test_deepinvs_own_sirt_object_runs_on_the_distributed_physics(ctx, kind):
    """deepinv's ``SIRT`` as it ships on the distributed stack: its normalizers ``A1`` and ``Aᵀ1`` come
    back as a MeasurementList (a torch buffer it can keep), each operator runs on its worker."""
    ops, x_true = _operators(kind)
    y = _poisson(ops, x_true)
    dphys = dr.distribute(_operators(kind)[0], ctx)
    out = dinv.optim.SIRT(stepsize=1.0, max_iter=4)(MeasurementList(list(y)), dphys)
    start = dinv.physics.StackedLinearPhysics(ops).A_adjoint(y)
    ref = _deepinv_sirt_by_formula(ops, y, start, 4)
    assert _rel(out, ref) <= 1e-5 and _rel(out, start) > 1e-2
    with pytest.raises(AttributeError, match="data_ptr"):  # deepinv's own TensorList does not pass its SIRT
        dinv.optim.SIRT(max_iter=1)(y, dinv.physics.StackedLinearPhysics(ops))


def test_operator_views_run_one_operator_on_its_worker(ctx):
    import dask.array as da
    from daskrecon.frontend.operator_views import OperatorView

    ops, x = _operators("tomography")
    dphys = dr.distribute(_operators("tomography")[0], ctx)
    view = dphys[2]
    assert isinstance(view, OperatorView) and view is dphys[-2] and dphys[1:3] == [dphys[1], dphys[2]]
    # (a Tomography built again draws its normalization again: equal to ~1e-7, not bitwise)
    assert _rel(view.A(x), ops[2].A(x)) <= 1e-5
    y2 = ops[2].A(x)
    assert _rel(view.A_adjoint(y2), ops[2].A_adjoint(y2)) <= 1e-5 and _rel(view.A_adjoint(y2), ops[1].A_adjoint(y2)) > 1e-2
    assert [v.index for v in dphys] == [0, 1, 2, 3]
    with pytest.raises(IndexError, match="out of range for 4 operators"):
        dphys[4]
    with pytest.raises(TypeError, match="takes a torch.Tensor x, got Array"):
        view.A(da.from_array(x.numpy()))
    with pytest.raises(TypeError, match="runs without autograd"):
        view.A(x.clone().requires_grad_())
    ml = MeasurementList([torch.ones(2), torch.full((3,), 2.0)])
    for got in (ml.clamp(min=1.5), ml - ml, ml / ml, 2 * ml, ml.detach(), -ml):
        assert type(got) is MeasurementList
