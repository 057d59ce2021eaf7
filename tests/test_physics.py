import pytest
import torch
import deepinv as dinv
from deepinv.utils import TensorList

import daskrecon as dr
from daskrecon.errors import LinearityError, MeasurementError, WorkerTaskError
from daskrecon.testing import assert_adjoint, assert_allclose, assert_matches_serial, inner

from helpers import H, W, Exploding, Square, blurs, counting_blur_factory, heterogeneous, noisy_measurements, read_builds


@pytest.fixture
def x():
    return torch.rand(2, 3, H, W)


@pytest.mark.parametrize("form", ["stacked", "list", "factory"])
def test_matches_stacked_linear_physics(ctx, x, form):
    ops = blurs(4)
    ref = dinv.physics.stack(*ops)
    obj = {"stacked": ref, "list": ops, "factory": lambda i, device, kw: ops[i]}[form]
    d = dr.distribute(obj, ctx, num_operators=4) if form == "factory" else dr.distribute(obj, ctx)
    assert isinstance(d, dr.DistributedLinearPhysics) and isinstance(d, dinv.physics.LinearPhysics)
    y = noisy_measurements(ops, x)
    assert_matches_serial(d, ref, x, y, methods=("A", "A_adjoint", "A_adjoint_A", "A_A_adjoint", "A_vjp"))
    assert_adjoint(d, x, y)


def test_heterogeneous_output_shapes(ctx):
    ops = heterogeneous()
    ref = dinv.physics.stack(*ops)
    x = torch.rand(1, 3, 36, 30)
    d = dr.distribute(ref, ctx)
    y = noisy_measurements(ops, x)
    out = d.A(x)
    assert [tuple(t.shape) for t in out] == [(1, 3, 36, 30), (1, 3, 18, 15), (1, 3, 36, 30)]
    assert_matches_serial(d, ref, x, y)
    with pytest.raises(WorkerTaskError, match="equal output shapes"):
        d.A(x, reduce_op="sum")


def test_gather_and_reduce_op_semantics(ctx, x):
    ops = blurs(3)
    d = dr.distribute(ops, ctx)
    y = noisy_measurements(ops, x)
    local = d.A(x, gather=False)
    assert type(local) is list and len(local) == 3
    assert isinstance(d.A(x), TensorList)
    per_op = d.A_adjoint(y, reduce_op=None)
    assert isinstance(per_op, TensorList) and len(per_op) == 3
    assert_allclose(per_op, [op.A_adjoint(y[i]) for i, op in enumerate(ops)])
    assert type(d.A_adjoint(y, reduce_op=None, gather=False)) is list
    total = d.A_adjoint(y)
    assert_allclose(d.A_adjoint(y, reduce_op="mean"), total / 3)
    assert_allclose(d.A_adjoint(y, gather=False), total)
    assert_allclose(d.A(x, reduce_op="sum"), sum(op.A(x) for op in ops))
    assert type(d.A_A_adjoint(y, gather=False)) is list
    with pytest.raises(ValueError, match="reduce_op"):
        d.A_adjoint(y, reduce_op="max")


def test_norms(ctx):
    # Normalised circular blurs: |K_i| peaks at 1 (DC), so ||A_i||^2 = 1 and ||A||^2 = sum_i 1 = 3.
    ops = blurs(3)
    ref = dinv.physics.stack(*ops)
    d = dr.distribute(ref, ctx)
    x0 = torch.rand(1, 3, 24, 24)
    local = d.compute_sqnorm(x0, max_iter=100, tol=1e-7, verbose=False)
    exact = d.compute_sqnorm(x0, max_iter=100, tol=1e-7, verbose=False, local_only=False)
    serial = ref.compute_sqnorm(x0, max_iter=100, tol=1e-7, verbose=False)
    assert local.item() == pytest.approx(3.0, rel=1e-2)
    assert exact.item() == pytest.approx(serial.item(), rel=1e-2)
    assert exact.item() == pytest.approx(3.0, rel=1e-2)
    lopsided = dr.distribute([dinv.physics.Denoising(), blurs(1)[0]], ctx)  # = 2 locally, 2 exactly too
    assert lopsided.compute_sqnorm(x0, max_iter=100, verbose=False).item() == pytest.approx(2.0, rel=1e-2)
    # Where the bound is not the norm: two complementary masks. Each ‖M_i‖² = 1, so the local bound is
    # Σ_i ‖A_i‖² = 2, while AᵀA = M_1 + M_2 = I has norm 1 — as deepinv's own power method on the stack says.
    mask = (torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    halves = [dinv.physics.Inpainting(img_size=(3, 24, 24), mask=m) for m in (mask, 1 - mask)]
    split = dr.distribute(halves, ctx)
    bound = split.compute_sqnorm(x0, max_iter=100, tol=1e-7, verbose=False).item()
    exact = split.compute_sqnorm(x0, max_iter=100, tol=1e-7, verbose=False, local_only=False).item()
    serial = dinv.physics.stack(*halves).compute_sqnorm(x0, max_iter=100, tol=1e-7, verbose=False).item()
    assert bound == pytest.approx(2.0, rel=1e-3) and exact == pytest.approx(1.0, rel=1e-3)
    assert exact == pytest.approx(serial, rel=1e-3)


def test_pseudo_inverse_local_and_exact(ctx):
    # A well-conditioned stack (AᵀA = I + BᵀB), so that two CG runs can be compared tightly.
    ops = [dinv.physics.Denoising(), blurs(1)[0]]
    ref = dinv.physics.stack(*ops)
    d = dr.distribute(ref, ctx)
    x = torch.rand(1, 3, 24, 24)
    y = noisy_measurements(ops, x)
    approx = d.A_dagger(y)
    assert_allclose(approx, sum(op.A_dagger(y[i]) for i, op in enumerate(ops)) / 2, atol=1e-4)
    exact = d.A_dagger(y, local_only=False, max_iter=100, tol=1e-8)
    assert_allclose(exact, ref.A_dagger(y, max_iter=100, tol=1e-8), atol=1e-4)
    assert (exact - approx).abs().max() > 1e-3  # the two modes really differ


def test_forward_noise_is_seeded_by_the_driver(ctx):
    ops = blurs(3)
    for op in ops:
        op.noise_model = dinv.physics.GaussianNoise(sigma=0.1)
    d = dr.distribute(ops, ctx)
    x = torch.rand(1, 3, 16, 16)
    torch.manual_seed(7)
    y1 = d(x)
    torch.manual_seed(7)
    y2 = d.forward(x)
    y3 = d(x)
    assert_allclose(y1, y2, atol=0)
    assert not torch.equal(y2[0], y3[0])
    noise = [y1[i] - ops[i].A(x) for i in range(3)]
    assert all(0.05 < n.std().item() < 0.2 for n in noise)
    assert not torch.equal(noise[0], noise[1])  # independent streams per operator


def test_nonlinear_physics_forward_and_autograd_vjp(ctx):
    ops = [Square(0.5), Square(2.0)]
    ref = dinv.physics.stack(*ops)
    d = dr.distribute(ref, ctx)
    assert type(d) is dr.DistributedPhysics
    x = torch.rand(1, 1, 8, 8)
    v = noisy_measurements(ops, x)
    assert_allclose(d.A(x), ref.A(x))
    expected = sum(ops[i].A_vjp(x, v[i]) for i in range(2))
    assert_allclose(d.A_vjp(x, v), expected)
    assert_allclose(expected, 2 * x * (0.5 * v[0] + 2.0 * v[1]))
    with pytest.raises(LinearityError, match="A_adjoint needs linear operators"):
        d.A_adjoint(v)


def test_factory_builds_each_operator_once_on_its_worker(ctx):
    before = sum(ctx.client.run(read_builds).values())
    d = dr.distribute(counting_blur_factory, ctx, num_operators=4, type_object="linear_physics")
    x = torch.rand(1, 3, 16, 16)
    for _ in range(3):
        y = d.A(x)
        d.A_adjoint(y)
    builds = ctx.client.run(read_builds)
    assert sum(builds.values()) - before == 4
    assert len([b for b in builds.values() if b]) == 2  # spread over both workers


def test_graph_does_not_grow_with_calls(ctx):
    import time

    d = dr.distribute(blurs(3), ctx)
    f = dr.distribute(dinv.optim.L2(), ctx)
    x = torch.rand(1, 3, 16, 16)
    y = d.A(x)

    def settled_count():
        # the client releases keys asynchronously: read once the count stops changing
        last = None
        for _ in range(50):
            n = ctx.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
            if n == last:
                return n
            last = n
            time.sleep(0.1)
        return last

    for _ in range(5):
        f.grad(x, y, d)
    after_5 = settled_count()
    for _ in range(10):
        f.grad(x, y, d)
    after_15 = settled_count()
    assert after_15 <= after_5 + 2  # a leak would add ~5 tasks per call, 50 here


def test_measurement_length_mismatch(ctx, x):
    d = dr.distribute(blurs(3), ctx)
    y = d.A(x)
    with pytest.raises(MeasurementError, match="y has 2 entries but the physics has 3 operators"):
        d.A_adjoint(TensorList([y[0], y[1]]))
    with pytest.raises(MeasurementError, match="single tensor"):
        d.A_adjoint(y[0])


def test_worker_exception_reaches_the_driver_with_traceback(ctx):
    d = dr.distribute([blurs(1)[0], Exploding()], ctx)
    with pytest.raises(WorkerTaskError) as info:
        d.A(torch.rand(1, 3, 8, 8))
    msg = str(info.value)
    assert "boom from operator A" in msg and "operator index 1" in msg and "worker traceback" in msg
    assert "helpers.py" in msg  # the frame that raised, on the worker


def test_linear_class_rejects_nonlinear_operators(ctx):
    with pytest.raises(LinearityError, match=r"operators \[1\] are not LinearPhysics"):
        dr.DistributedLinearPhysics(ctx, 2, [blurs(1)[0], Square(1.0)])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduction_matches_stacked_linear_physics(ctx, reduction):
    """`reduction=` has StackedLinearPhysics' meaning for every method, at a non-zero residual."""
    import warnings

    from deepinv.physics import StackedLinearPhysics

    ops = blurs(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepinv deprecates "mean", we warn about it
        ref = StackedLinearPhysics(ops, reduction=reduction)
    if reduction == "mean":
        with pytest.warns(UserWarning, match="no longer an adjoint pair"):
            d = dr.distribute(ops, ctx, reduction=reduction)
    else:
        d = dr.distribute(ops, ctx, reduction=reduction)
    assert d.reduction == reduction
    x = torch.rand(1, 3, H, W)
    y = noisy_measurements(ops, torch.rand(1, 3, H, W))
    assert_matches_serial(d, ref, x, y, methods=("A", "A_adjoint", "A_adjoint_A", "A_A_adjoint", "A_vjp"))
    x0 = torch.rand(1, 3, 24, 24)
    exact = d.compute_sqnorm(x0, max_iter=100, tol=1e-7, verbose=False, local_only=False)
    assert exact.item() == pytest.approx(ref.compute_sqnorm(x0, max_iter=100, tol=1e-7, verbose=False).item(), rel=1e-2)
    bound = d.compute_sqnorm(x0, max_iter=100, tol=1e-7, verbose=False)  # Σ ‖A_i‖² (1 each here), / N for mean
    assert bound.item() == pytest.approx(3.0 if reduction == "sum" else 1.0, rel=1e-2)
    small = [dinv.physics.Denoising(), blurs(1)[0]]  # well conditioned: the two CG solutions compare tightly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_small = StackedLinearPhysics(small, reduction=reduction)
        d_small = dr.distribute(small, ctx, reduction=reduction)
    y_small = noisy_measurements(small, torch.rand(1, 3, 24, 24))
    assert_allclose(d_small.A_dagger(y_small, local_only=False, max_iter=100, tol=1e-8),
                    ref_small.A_dagger(y_small, max_iter=100, tol=1e-8), atol=1e-4)
    # Adjointness: exact with "sum"; with "mean" A_adjoint is (1/N)·Aᵀ, and reduce_op="sum" is the adjoint.
    lhs = inner(d.A(x), y)
    assert inner(x, d.A_adjoint(y, reduce_op="sum")).item() == pytest.approx(lhs.item(), rel=1e-4)
    scale = 1.0 if reduction == "sum" else 1 / 3
    assert inner(x, d.A_adjoint(y)).item() == pytest.approx(scale * lhs.item(), rel=1e-4)


def test_reduction_is_validated(ctx):
    with pytest.raises(ValueError, match="reduction must be one of"):
        dr.distribute(blurs(2), ctx, reduction="max")


def test_deepinv_public_attributes(ctx):
    """What scripts read from deepinv's distributed physics: local_indexes, local_physics..."""
    ops = blurs(3)
    d = dr.distribute(dinv.physics.stack(*ops), ctx, gather_strategy="broadcast")
    assert d.local_indexes == [0, 1, 2] and d.num_operators == 3 and d.gather_strategy == "broadcast"
    assert d.local_physics == ops  # the driver's objects
    f = dr.distribute(lambda i, device, kw: blurs(2)[i], ctx, num_operators=2, type_object="linear_physics")
    assert [type(p).__name__ for p in f.local_physics] == ["Blur", "Blur"]  # built on the driver when read
    x = torch.rand(1, 3, 16, 16)
    out, anchor = d.A(x, return_graph_anchor=True)
    assert anchor is x and len(out) == 3
    assert_allclose(d.A(x, force_input_grad_sync=True), [op.A(x) for op in ops])


def test_inputs_that_require_grad_are_never_cut(ctx):
    # gradients flow (their values: test_autograd); under no_grad nothing is recorded
    d = dr.distribute(blurs(2), ctx)
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    out = d.A(x)
    assert all(t.requires_grad and t.grad_fn is not None for t in out)
    assert d.A_adjoint(out).grad_fn is not None
    with torch.no_grad():
        assert len(d.A(x)) == 2
    assert len(d.A(x.detach())) == 2


@pytest.mark.parametrize("form", ["list", "factory"])
def test_updated_parameters_reach_the_operators_where_they_live(ctx, x, form):
    """deepinv's ``update`` / ``update_parameters`` (its Trainer calls ``update`` with a physics generator's
    parameters before every batch) changed only the driver's wrapper: the workers kept the first filters."""
    from deepinv.physics.functional.blur import gaussian_blur

    from daskrecon.tasks import registry

    ops, mine = blurs(3), blurs(3)
    ref = dinv.physics.stack(*ops)
    d = dr.distribute(mine, ctx) if form == "list" else dr.distribute(lambda i, device, kw: blurs(3)[i], ctx,
                                                                       num_operators=3)
    before = d.A(x)  # the operators are on their workers now
    y = noisy_measurements(ops, x)
    new = gaussian_blur(sigma=(3.0, 0.7))
    ref.update_parameters(filter=new)
    d.update_parameters(filter=new)
    assert_matches_serial(d, ref, x, y, methods=("A", "A_adjoint"))
    assert float((d.A(x)[0] - before[0]).abs().max()) > 1e-2
    other = gaussian_blur(sigma=(0.5, 2.0))  # one operator, through its view, with deepinv's update
    ref.physics_list[1].update(filter=other)
    d[1].update(filter=other)
    assert_matches_serial(d, ref, x, y, methods=("A", "A_adjoint", "A_adjoint_A"))
    # a worker without its copies (restarted, or new) builds them again, updated
    ctx.client.run(registry.forget_objects, d.objects.token)
    assert_matches_serial(d, ref, x, y, methods=("A",))
    d.update()  # what the Trainer calls with no generator: nothing changes, nothing is rebuilt
    assert_matches_serial(d, ref, x, y, methods=("A",))


def test_noise_models_set_or_updated_reach_the_workers(ctx, x):
    ops = [dinv.physics.Blur(filter=op.filter, padding="circular", noise_model=dinv.physics.GaussianNoise(0.1))
           for op in blurs(2)]
    d = dr.distribute(ops, ctx)
    clean = d.A(x)
    assert not torch.allclose(d(x)[1], clean[1])
    d.set_noise_model(dinv.physics.GaussianNoise(0.0), item=1)  # deepinv's StackedPhysics.set_noise_model
    noisy = d(x)
    assert not torch.allclose(noisy[0], clean[0]) and torch.equal(noisy[1], clean[1])
    d.update(sigma=0.0)  # each operator's update: its noise model's sigma too
    assert torch.equal(d(x)[0], clean[0])
    with pytest.raises(IndexError, match="operator index 2 out of range for 2 operators"):
        d.set_noise_model(dinv.physics.GaussianNoise(0.0), item=2)
