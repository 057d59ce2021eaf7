import pytest
import torch
import deepinv as dinv
from deepinv.optim import L1, L2
from deepinv.optim.data_fidelity import StackedPhysicsDataFidelity

import daskrecon as dr
from daskrecon.errors import MeasurementError, ShapeError
from daskrecon.testing import assert_allclose

from helpers import H, W, Square, blurs, heterogeneous, noisy_measurements


def problem(n=5, batch=2):
    ops = blurs(n)
    x_true = torch.rand(batch, 3, H, W)
    y = noisy_measurements(ops, x_true)
    x = torch.rand(batch, 3, H, W)  # far from x_true: the residual is large
    return ops, y, x


def test_grad_and_fn_match_deepinv_at_nonzero_residual(ctx):
    ops, y, x = problem()
    ref = dinv.physics.stack(*ops)
    d = dr.distribute(ref, ctx)
    f = dr.distribute(L2(), ctx)
    g = f.grad(x, y, d)
    g_ref = L2().grad(x, y, ref)
    assert g_ref.abs().max() > 0.1  # a real residual, not 0 == 0
    assert_allclose(g, g_ref, atol=1e-5)
    by_hand = sum(ops[i].A_adjoint(ops[i].A(x) - y[i]) for i in range(len(ops)))
    assert_allclose(g, by_hand, atol=1e-5)
    fn = f.fn(x, y, d)
    assert fn.shape == (2,)
    assert_allclose(fn, StackedPhysicsDataFidelity([L2()] * len(ops)).fn(x, y, ref), atol=1e-4, rtol=1e-5)
    assert_allclose(fn, sum(0.5 * (ops[i].A(x) - y[i]).pow(2).flatten(1).sum(1) for i in range(len(ops))), atol=1e-4, rtol=1e-5)


def test_per_operator_fidelities_and_stacked_fidelity(ctx):
    ops, y, x = problem(3)
    fids = [L2(sigma=0.5), L1(), L2(sigma=2.0)]
    d = dr.distribute(ops, ctx)
    expected = sum(fids[i].grad(x, y[i], ops[i]) for i in range(3))
    assert_allclose(dr.distribute(fids, ctx).grad(x, y, d), expected, atol=1e-5)
    stacked = StackedPhysicsDataFidelity(fids)
    df = dr.distribute(stacked, ctx)  # deepinv wraps this as one fidelity and then fails
    assert_allclose(df.grad(x, y, d), expected, atol=1e-5)
    assert_allclose(df.fn(x, y, d), stacked.fn(x, y, dinv.physics.stack(*ops)), atol=1e-4, rtol=1e-5)


def test_mean_reduction_and_prox(ctx):
    ops, y, x = problem(3, batch=1)
    ref = dinv.physics.stack(*ops)
    d = dr.distribute(ref, ctx)
    g_sum = dr.distribute(L2(), ctx).grad(x, y, d)
    assert_allclose(dr.distribute(L2(), ctx, reduction="mean").grad(x, y, d), g_sum / 3)
    p = dr.distribute(L2(), ctx).prox(x, y, d, gamma=0.7)
    assert_allclose(p, L2().prox(x, y, ref, gamma=0.7), atol=1e-4)


def test_heterogeneous_stack_gradient(ctx):
    ops = heterogeneous()
    x = torch.rand(1, 3, 36, 30)
    y = noisy_measurements(ops, torch.rand(1, 3, 36, 30))
    d = dr.distribute(ops, ctx)
    expected = sum(L2().grad(x, y[i], ops[i]) for i in range(3))
    assert_allclose(dr.distribute(L2(), ctx).grad(x, y, d), expected, atol=1e-5)


def test_nonlinear_physics_gradient_by_autograd(ctx):
    ops = [Square(0.5), Square(1.5), Square(-1.0)]
    x = torch.rand(1, 1, 9, 7)
    y = noisy_measurements(ops, torch.rand(1, 1, 9, 7))
    d = dr.distribute(ops, ctx)
    expected = sum(2 * ops[i].w * x * (ops[i].A(x) - y[i]) for i in range(3))
    assert_allclose(dr.distribute(L2(), ctx).grad(x, y, d), expected, atol=1e-5)


def test_measurements_placed_once_and_reused(ctx):
    ops, y, x = problem(4)
    d = dr.distribute(ops, ctx)
    f = dr.distribute(L2(), ctx)
    f.grad(x, y, d)
    placed = d.inputs.placed_measurements
    f.grad(x, y, d)
    d.A_adjoint(y)
    assert d.inputs.placed_measurements is placed  # unchanged y: not sent again
    y[0].add_(1.0)  # an in-place change is seen
    g = f.grad(x, y, d)
    assert d.inputs.placed_measurements is not placed
    assert_allclose(g, sum(L2().grad(x, y[i], ops[i]) for i in range(4)), atol=1e-5)


def test_distributed_measurements_input(ctx):
    ops, y, x = problem(4)
    d = dr.distribute(ops, ctx)
    dm = dr.DistributedMeasurements(ctx, y)
    assert len(dm) == 4 and dm.owners == d.owners
    assert_allclose(dm.gather(), y, atol=0)
    assert_allclose(dr.distribute(L2(), ctx).grad(x, dm, d), dr.distribute(L2(), ctx).grad(x, y, d), atol=0)
    built = dr.DistributedMeasurements(ctx, factory=lambda i, device, shared: shared[i] * 2, num_items=4, shared=list(y))
    assert_allclose(built.get_by_global_index(2), 2 * y[2], atol=0)


def test_bitwise_identical_across_worker_counts_and_shardings(ctx, ctx_block, ctx1, ctx3):
    ops, y, x = problem(7)
    results = []
    for c in (ctx, ctx_block, ctx1, ctx3):
        for fast in (True, False):
            results.append(dr.distribute(L2(), c).grad(x, y, dr.distribute(ops, c, fast_operators=fast)))
    assert not torch.equal(results[0], results[1])  # the two operator paths really differ...
    results = results[0::2] + results[1::2]
    for r in results[1:4]:
        assert torch.equal(r, results[0])  # ...but each is bitwise the same everywhere
    for r in results[5:]:
        assert torch.equal(r, results[4])


def test_errors_name_the_argument(ctx):
    ops, y, x = problem(3)
    d = dr.distribute(ops, ctx)
    f = dr.distribute(L2(), ctx)
    with pytest.raises(MeasurementError, match="y has 2 entries but the physics has 3 operators"):
        f.grad(x, dinv.utils.TensorList([y[0], y[1]]), d)
    with pytest.raises(ShapeError, match=r"y\[\d\] has shape \(2, 3, 37, 31\) but operator \d maps x to shape \(2, 3, 39, 31\)"):
        f.grad(torch.rand(2, 3, H + 2, W), y, d)
    with pytest.raises(TypeError, match="distribute it first"):
        f.grad(x, y, dinv.physics.stack(*ops))
    with pytest.raises(ValueError, match="reduction must be one of"):
        dr.distribute(L2(), ctx, reduction="max")



def test_l1_prox_on_a_stack_is_the_minimizer(ctx):
    """deepinv's ``L1.prox`` starts its dual variable from ``x`` (one square operator); on a stack that failed
    with "y is a single tensor but the physics has 2 operators". Its dual forward-backward, started in the
    measurement space, gives the minimizer of ``γ Σ‖A_i u − y_i‖₁ + ½‖u − x‖²``."""
    ops = blurs(2, channels=1)
    x_true = torch.rand(1, 1, 16, 16)
    y = noisy_measurements(ops, x_true, sigma=0.05)
    z, gamma = x_true + 0.1, 0.5
    stack = dinv.physics.stack(*ops)
    step = 1.0 / sum(float(a.compute_sqnorm(z, tol=1e-6)) for a in ops)

    def objective(u):
        return float(gamma * sum((a.A(u) - t).abs().sum() for a, t in zip(ops, y)) + 0.5 * ((u - z) ** 2).sum())

    def plain(n):  # the same iteration, on deepinv's stack, in this process
        u = [torch.zeros_like(t) for t in y]
        for _ in range(n):
            at = stack.A(z - stack.A_adjoint(dinv.utils.TensorList(u)))
            u_ = [a + step * b for a, b in zip(u, at)]
            u = [a - step * L1().d.prox(a / step, t, gamma=gamma / step) for a, t in zip(u_, y)]
        return z - stack.A_adjoint(dinv.utils.TensorList(u))

    converged = plain(3000)
    g = torch.Generator().manual_seed(1)
    assert all(objective(converged + 1e-3 * torch.randn(z.shape, generator=g)) > objective(converged) for _ in range(10))
    ours = dr.distribute(L1(), ctx).prox(z, y, dr.distribute(ops, ctx), gamma=gamma, stepsize=step, max_iter=60,
                                         crit_conv=0.0)
    assert_allclose(ours, plain(60), atol=1e-5)
    assert objective(ours) - objective(converged) < 0.05 * (objective(z) - objective(converged))


def test_a_prox_without_closed_form_is_deepinvs_gradient_descent_on_the_stack(ctx):
    """``PoissonLikelihood`` has no prox of its own: on the distributed stack its prox failed ("unsupported
    operand type(s) for -: 'int' and 'TensorList'"); it is now what deepinv's StackedPhysicsDataFidelity
    computes on the plain stack (deepinv's gradient descent, with the distributed gradient)."""
    from deepinv.optim import PoissonLikelihood

    ops = blurs(2, channels=1)
    x_true = 0.2 + torch.rand(1, 1, 16, 16)
    y = dinv.utils.TensorList([1.2 * a.A(x_true) for a in ops])  # positive, and not A(z): a real residual
    z = x_true + 0.1
    want = StackedPhysicsDataFidelity([PoissonLikelihood()] * 2).prox(z, y, dinv.physics.stack(*ops), gamma=0.3)
    got = dr.distribute(PoissonLikelihood(), ctx).prox(z, y, dr.distribute(ops, ctx), gamma=0.3)
    assert float((want - z).abs().max()) > 1e-2
    assert_allclose(got, want, atol=1e-5)
