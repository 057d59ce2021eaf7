"""Gradients through the distributed operations against the plain (single-process) computation."""

import pytest
import torch
import deepinv as dinv
from deepinv.optim.data_fidelity import L2, StackedPhysicsDataFidelity
from deepinv.physics import StackedLinearPhysics, StackedPhysics

import daskrecon as dr
from daskrecon.testing import assert_allclose

from helpers import Square, blurs, heterogeneous, noisy_measurements, small_dncnn


def close(a, b, rel=1e-5):
    """Equal to ``rel`` of the largest entry (float32 sums in another order, FFT vs direct convolution)."""
    assert_allclose(a, b, atol=rel * float(b.abs().max()))


def _grads(fn, *leaves):
    """Gradients of ``<w, fn()>`` for a fixed random ``w`` (so every output entry counts)."""
    out = fn()
    outs = [out[i] for i in range(len(out))] if isinstance(out, (list, dinv.utils.TensorList)) else [out]
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, leaves)


@pytest.fixture(scope="module")
def problem(ctx):
    ops = heterogeneous()
    return ops, dr.distribute(ops, ctx), StackedLinearPhysics(ops)


def test_physics_linear_maps_backpropagate_like_the_stack(problem):
    ops, dphys, ref = problem
    x = torch.rand(2, 3, 36, 30, requires_grad=True)
    y = [t.detach().requires_grad_(True) for t in noisy_measurements(ops, x.detach())]
    cases = [
        (lambda p: p.A(x), [x]),
        (lambda p: p.A_adjoint_A(x), [x]),
        (lambda p: p.A_adjoint(dinv.utils.TensorList(y)), y),
        (lambda p: p.A_A_adjoint(dinv.utils.TensorList(y)), y),
        (lambda p: p.A_vjp(x, dinv.utils.TensorList(y)), y),
    ]
    for k, (call, leaves) in enumerate(cases):
        got = _grads(lambda: call(dphys), *leaves)
        want = _grads(lambda: call(ref), *leaves)
        for a, b in zip(got, want):
            assert a.abs().max() > 0
            close(a, b)


def test_per_operator_results_and_reductions(problem, ctx):
    ops, dphys, _ = problem
    x = torch.rand(1, 3, 36, 30, requires_grad=True)
    per_op = dphys.A_adjoint_A(x, reduce_op=None)
    assert isinstance(per_op, dinv.utils.TensorList) and len(per_op) == 3
    got = _grads(lambda: dphys.A_adjoint_A(x, reduce_op=None), x)[0]
    want = _grads(lambda: [op.A_adjoint_A(x) for op in ops], x)[0]
    close(got, want)
    same = [blurs(3)[0]] * 3  # equal output shapes: reduce_op="mean" applies
    dmean = dr.distribute(same, ctx)
    got = _grads(lambda: dmean.A(x, reduce_op="mean"), x)[0]
    want = _grads(lambda: sum(op.A(x) for op in same) / 3, x)[0]
    close(got, want)


def test_non_linear_operators_differentiate_on_their_workers(ctx):
    ops = [Square(0.5), Square(2.0)]
    dphys = dr.distribute(ops, ctx, type_object="physics")
    x = torch.rand(1, 1, 9, 7, requires_grad=True)
    got = _grads(lambda: dphys.A(x), x)[0]
    want = _grads(lambda: StackedPhysics(ops).A(x), x)[0]
    close(got, want)
    # A_vjp(x, v) = Σ_i J_i(x)ᵀ v_i: in v its backward is J_i(x) g (not A_i g), in x a second derivative
    v = [torch.rand(1, 1, 9, 7, requires_grad=True) for _ in ops]
    mixed = [Square(0.5), blurs(1)[0]]  # a linear operator among non-linear ones
    xm = torch.rand(1, 3, 9, 7, requires_grad=True)
    vm = [torch.rand(1, 3, 9, 7, requires_grad=True) for _ in mixed]
    for o, xx, vv in ((ops, x, v), (mixed, xm, vm)):
        d = dr.distribute(o, ctx, type_object="physics")
        got = _grads(lambda: d.A_vjp(xx, vv), xx, *vv)
        want = _grads(lambda: sum(op.A_vjp(xx, vi) for op, vi in zip(o, vv)), xx, *vv)
        for a, b in zip(got, want):
            assert a.abs().max() > 0
            close(a, b)


def test_data_fidelity_value_and_gradient_backpropagate(problem, ctx):
    ops, dphys, ref = problem
    x0 = torch.rand(2, 3, 36, 30)
    y = noisy_measurements(ops, x0)
    x = (x0 + 0.1 * torch.randn_like(x0)).requires_grad_(True)
    for sigma in (1.0, 0.3):
        dfid, fid = dr.distribute(L2(sigma=sigma), ctx), StackedPhysicsDataFidelity([L2(sigma=sigma)] * len(ops))
        value = dfid.fn(x, y, dphys)
        assert value.requires_grad and value.shape == (2,)
        got = torch.autograd.grad(value.sum(), x)[0]
        want = torch.autograd.grad(fid.fn(x, y, ref).sum(), x)[0]
        close(got, want)
        got = _grads(lambda: dfid.grad(x, y, dphys), x)[0]  # the Hessian-vector product, per operator
        want = _grads(lambda: fid.grad(x, y, ref), x)[0]
        assert got.abs().max() > 0
        close(got, want)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_data_fidelity_backpropagates_to_the_measurements(problem, ctx, reduction):
    """In ``y`` too (e.g. measurements produced by a network): ``fn``'s backward is ``g·∂d/∂y_i`` and
    ``grad``'s the mixed product ``(∂²d/∂y_i∂u)ᵀ A_i g``, per operator on its worker."""
    ops, dphys, ref = problem
    x0 = torch.rand(2, 3, 36, 30)
    x = (x0 + 0.1 * torch.randn_like(x0)).requires_grad_(True)
    y = [t.clone().requires_grad_(True) for t in noisy_measurements(ops, x0)]
    dfid = dr.distribute(L2(sigma=0.3), ctx, reduction=reduction)
    fid = StackedPhysicsDataFidelity([L2(sigma=0.3)] * len(ops))
    scale = 1 / len(ops) if reduction == "mean" else 1
    for method in ("fn", "grad"):
        got = _grads(lambda: getattr(dfid, method)(x, dinv.utils.TensorList(y), dphys), x, *y)
        want = _grads(lambda: scale * getattr(fid, method)(x, dinv.utils.TensorList(y), ref), x, *y)
        for a, b in zip(got, want):
            assert a.abs().max() > 0
            close(a, b)
        got = _grads(lambda: getattr(dfid, method)(x.detach(), list(y), dphys), *y)  # y alone, a plain list
        for a, b in zip(got, want[1:]):
            close(a, b)
    with pytest.raises(NotImplementedError, match="second derivatives.*measurements"):
        torch.autograd.grad(dfid.fn(x, dinv.utils.TensorList(y), dphys).sum(), y[0], create_graph=True)


def _plain_denoiser_grads(model, x, sigma=None):
    args = () if sigma is None else (sigma,)
    leaves = [x] + [p for p in model.parameters()] + ([sigma] if isinstance(sigma, torch.Tensor) else [])
    return _grads(lambda: model(x, *args), *leaves)


@pytest.mark.parametrize("dim, shape, patch, overlap", [(2, (2, 3, 45, 38), 16, 6), (3, (1, 1, 19, 22, 17), 8, 5)])
def test_tiled_denoiser_gradients_equal_the_untiled_network(ctx, dim, shape, patch, overlap):
    model = small_dncnn(shape[1], depth=5 if dim == 2 else 4, dim=dim)
    d = dr.distribute(model, ctx, patch_size=patch, overlap=overlap)
    assert d.strategy_for(shape).get_num_patches() > 4
    x = torch.rand(shape, requires_grad=True)
    leaves = [x] + list(model.parameters())
    got = _grads(lambda: d(x), *leaves)
    want = _plain_denoiser_grads(model, x)
    for a, b in zip(got, want):
        close(a, b)
    border = (got[0] - want[0])[..., :overlap, :].abs().max()
    assert border < 1e-5
    # too small an overlap is visibly wrong: the check can fail
    short = dr.distribute(model, ctx, patch_size=patch, overlap=2)
    assert (_grads(lambda: short(x), x)[0] - want[0]).abs().max() > 1e-4


def test_blended_tiles_backpropagate_through_the_weights(ctx):
    # Reference: the same blended tiling run in this process by plain autograd.
    model = small_dncnn(1, depth=3)
    d = dr.distribute(model, ctx, patch_size=12, overlap=6, blend="cosine")
    x = torch.rand(1, 1, 40, 33, requires_grad=True)
    strategy = d.strategy_for(x.shape)

    def tiled_here():
        pairs = [(i, strategy.trim_patch(i, model(p))) for i, p in
                 strategy.get_local_patches(x, range(strategy.get_num_patches()))]
        out = torch.zeros(x.shape)
        strategy.reduce_patches(out, pairs)
        return out

    got = _grads(lambda: d(x), x, *model.parameters())
    want = _grads(tiled_here, x, *model.parameters())
    for a, b in zip(got, want):
        close(a, b)


def test_trainable_sigma_and_drunet_alignment(ctx):
    net = dinv.models.DRUNet(in_channels=1, out_channels=1, nc=(8, 16, 32, 64), nb=1, pretrained=None)
    d = dr.distribute(net, ctx, patch_size=16, overlap=24)
    x = torch.rand(1, 1, 40, 48, requires_grad=True)
    sigma = torch.tensor(0.1, requires_grad=True)
    got = _grads(lambda: d(x, sigma), x, sigma)
    want = _grads(lambda: net(x, sigma), x, sigma)
    close(got[0], want[0])
    close(got[1], want[1])


def test_parameter_updates_reach_the_workers_once_per_version(ctx):
    from daskrecon.tasks import denoising as denoising_tasks

    model = small_dncnn(1, depth=3)
    d = dr.distribute(model, ctx, patch_size=16, overlap=4)
    x = torch.rand(1, 1, 30, 30)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        loss = ((d(x) - x) ** 2).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            close(d(x), model(x))  # the workers run the stepped weights
    key = d.key
    versions = ctx.client.run(lambda: getattr(denoising_tasks._MODELS.get((key, None)), "_daskrecon_state_version",
                                              None))
    assert len(set(versions.values())) == 1 and None not in versions.values()


def test_gradients_bitwise_on_1_2_3_workers(ctx1, ctx, ctx3):
    torch.manual_seed(0)
    ops = blurs(5)
    x0 = torch.rand(1, 3, 37, 31)
    y = noisy_measurements(ops, x0)
    model = small_dncnn(3, depth=4)
    results = []
    for c in (ctx1, ctx, ctx3):
        dphys, dfid = dr.distribute(ops, c), dr.distribute(L2(), c)
        den = dr.distribute(model, c, patch_size=16, overlap=5)
        x = x0.clone().requires_grad_(True)
        z = x - 0.5 * dfid.grad(x, y, dphys)
        loss = ((den(z) - x0) ** 2).sum() + dfid.fn(x, y, dphys).sum()
        results.append(torch.autograd.grad(loss, [x] + list(model.parameters())))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_unfolded_algorithm_trains_like_deepinv(ctx):
    from deepinv.optim import PGD, PnP

    ops = blurs(3)
    x0 = torch.rand(1, 3, 37, 31)
    y = noisy_measurements(ops, x0)

    def build():
        return PGD(data_fidelity=L2(), prior=PnP(small_dncnn(3, depth=4)), stepsize=[0.5, 0.4], sigma_denoiser=[0.05] * 2,
                   max_iter=2, unfold=True, trainable_params=["stepsize", "g_param"])

    ref, ours = build(), dr.distribute(build(), ctx, patch_size=16, overlap=5)
    dphys = dr.distribute(ops, ctx)
    losses = []
    for model, phys in ((ref, StackedLinearPhysics(ops)), (ours, dphys)):
        out = model(y, phys)
        loss = ((out - x0) ** 2).mean()
        params = [p for p in model.parameters() if p.requires_grad]
        losses.append((out, loss, torch.autograd.grad(loss, params, allow_unused=True)))
    (out_ref, loss_ref, g_ref), (out, loss, g) = losses
    close(out, out_ref)
    assert len(g) == len(g_ref) > 4  # step sizes, sigmas and the network's weights
    assert [a is None for a in g] == [b is None for b in g_ref]
    for a, b in zip(g, g_ref):
        if b is not None:
            assert b.abs().max() > 0
            close(a, b, rel=1e-4)


def _kept_on_workers(ctx):
    from daskrecon.tasks import denoising as denoising_tasks

    return sum(ctx.client.run(lambda: sum(len(v) for v in denoising_tasks._KEPT.values())).values())


def _wait_released(ctx, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while _kept_on_workers(ctx) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _kept_on_workers(ctx)


def test_checkpoint_modes_same_gradients_and_kept_activations_are_freed(ctx):
    import gc

    model = small_dncnn(3, depth=4)
    x = torch.rand(1, 3, 45, 38)
    results = {}
    for mode in ("always", "never", "auto"):
        d = dr.distribute(model, ctx, patch_size=16, overlap=5, checkpoint_batches=mode)
        xr = x.clone().requires_grad_(True)
        out = d(xr)
        kept = _kept_on_workers(ctx)
        assert (kept > 0) == (mode != "always"), (mode, kept)  # auto keeps: the workers have room
        results[mode] = _grads(lambda out=out: out, xr, *model.parameters())
        assert _wait_released(ctx) == 0
        out = d(xr)  # a forward whose backward never comes: freed with its graph
        del out
        gc.collect()
        assert _wait_released(ctx) == 0
    for mode in ("never", "auto"):
        for a, b in zip(results[mode], results["always"]):
            assert torch.equal(a, b)


def test_training_checkpoint_resumes_exactly_and_loads_into_the_plain_model(ctx, tmp_path):
    from deepinv.optim import PGD, PnP

    ops = blurs(2)
    g = torch.Generator().manual_seed(5)
    data = [torch.rand(1, 3, 37, 31, generator=g) for _ in range(4)]
    ys = [noisy_measurements(ops, x, seed=k) for k, x in enumerate(data)]

    def build():
        model = PGD(data_fidelity=L2(), prior=PnP(small_dncnn(3, depth=3)), stepsize=[0.4] * 2,
                    sigma_denoiser=[0.05] * 2, max_iter=2, unfold=True, trainable_params=["stepsize"])
        model = dr.distribute(model, ctx, patch_size=16, overlap=4)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def train(model, opt, physics, epochs, start=0):
        for epoch in range(start, epochs):
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))  # data order by epoch
            for k in order.tolist():
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(ys[k], physics), data[k]).backward()
                opt.step()

    physics = dr.distribute(ops, ctx)
    straight, opt = build()
    train(straight, opt, physics, 3)

    first, opt = build()
    train(first, opt, physics, 1)
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, tmp_path / "ckpt.pt")
    del first, opt
    resumed, opt = build()  # fresh objects, fresh weights on the workers, then the checkpoint
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    train(resumed, opt, physics, 3, start=ckpt["epoch"])
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        assert torch.equal(a, b)

    plain = PGD(data_fidelity=L2(), prior=PnP(small_dncnn(3, depth=3)), stepsize=[0.4] * 2, sigma_denoiser=[0.05] * 2,
                max_iter=2, unfold=True, trainable_params=["stepsize"])
    assert list(plain.state_dict()) == list(straight.state_dict())  # the network's own keys
    plain.load_state_dict(straight.state_dict())
    with torch.no_grad():
        close(plain.prior[0].denoiser(data[0]), straight.prior[0].denoiser(data[0]))


def test_prior_prox_and_grad_backpropagate(ctx):
    from deepinv.optim import PnP, RED

    model = small_dncnn(3, depth=4)
    x = torch.rand(1, 3, 40, 35, requires_grad=True)
    for prior, method in ((PnP(denoiser=model), "prox"), (RED(denoiser=model), "grad")):
        dprior = dr.distribute(prior, ctx, patch_size=16, overlap=5)
        got = _grads(lambda: getattr(dprior, method)(x, sigma_denoiser=0.05), x, *model.parameters())
        want = _grads(lambda: getattr(prior, method)(x, sigma_denoiser=0.05), x, *model.parameters())
        for a, b in zip(got, want):
            close(a, b)


def test_deepinv_trainer_trains_the_distributed_model_like_the_plain_one(ctx, tmp_path):
    # deepinv's own Trainer (online measurements through our physics, its loss and optimizer loop)
    from deepinv.optim import PGD, PnP

    ops = blurs(2)
    xs = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(xs)

        def __getitem__(self, i):
            return xs[i]

    def train(model, physics, where):
        trainer = dinv.Trainer(model=model, physics=physics, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                               train_dataloader=torch.utils.data.DataLoader(Images(), batch_size=1), epochs=2,
                               losses=dinv.loss.SupLoss(), metrics=dinv.metric.PSNR(), online_measurements=True,
                               save_path=str(where), verbose=False, show_progress_bar=False, plot_images=False,
                               device="cpu")
        return trainer.train()

    def build(fidelity):
        return PGD(data_fidelity=fidelity, prior=PnP(small_dncnn(3, depth=3)), stepsize=[0.4] * 2,
                   sigma_denoiser=[0.05] * 2, max_iter=2, unfold=True, trainable_params=["stepsize"])

    plain = train(build(StackedPhysicsDataFidelity([L2()] * 2)), StackedLinearPhysics(ops), tmp_path / "plain")
    ours = train(dr.distribute(build(L2()), ctx, patch_size=16, overlap=4), dr.distribute(ops, ctx), tmp_path / "ours")
    moved = [(a - b).abs().max() for a, b in zip(ours.state_dict().values(), build(L2()).state_dict().values())]
    assert max(moved) > 1e-3  # it trained
    for a, b in zip(ours.state_dict().values(), plain.state_dict().values()):
        close(a, b, rel=1e-4)


def test_deepinv_trainer_with_a_physics_generator_trains_like_the_plain_one(ctx, tmp_path):
    """A physics generator draws a new blur per batch and the Trainer hands it to ``physics.update``: the
    distributed operators kept their first filters, so the model trained on other measurements."""
    from deepinv.optim import PGD, PnP
    from deepinv.physics.generator import MotionBlurGenerator

    xs = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def train(model, physics, where):
        generator = MotionBlurGenerator((5, 5), rng=torch.Generator().manual_seed(1))
        trainer = dinv.Trainer(model=model, physics=physics, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                               train_dataloader=torch.utils.data.DataLoader(xs, batch_size=1), epochs=1,
                               losses=dinv.loss.SupLoss(), online_measurements=True, physics_generator=generator,
                               save_path=str(where), verbose=False, show_progress_bar=False, plot_images=False,
                               device="cpu", metrics=[])
        return trainer.train()

    def build(fidelity):
        return PGD(data_fidelity=fidelity, prior=PnP(small_dncnn(3, depth=3)), stepsize=[0.4] * 2,
                   sigma_denoiser=[0.05] * 2, max_iter=2, unfold=True, trainable_params=["stepsize"])

    plain = train(build(StackedPhysicsDataFidelity([L2()] * 2)), StackedLinearPhysics(blurs(2)), tmp_path / "plain")
    ours = train(dr.distribute(build(L2()), ctx, patch_size=16, overlap=4), dr.distribute(blurs(2), ctx),
                 tmp_path / "ours")
    for a, b in zip(ours.state_dict().values(), plain.state_dict().values()):
        close(a, b, rel=1e-4)


def test_second_derivatives_through_the_physics_and_the_fidelity_value(problem, ctx):
    # A gradient penalty: differentiate a gradient (create_graph=True) through the distributed calls.
    ops, dphys, ref = problem
    x0 = torch.rand(1, 3, 36, 30)
    y = noisy_measurements(ops, x0)
    fid = StackedPhysicsDataFidelity([L2()] * len(ops))
    dfid = dr.distribute(L2(), ctx)
    results = []
    for physics, f in ((ref, fid), (dphys, dfid)):
        x = (x0 + 0.1).requires_grad_(True)
        (g,) = torch.autograd.grad(f.fn(x, y, physics).sum(), x, create_graph=True)
        results.append(torch.autograd.grad((g ** 2).sum(), x)[0])  # 2 ∇²f ∇f = 2 AᵀA ∇f
    assert results[0].abs().max() > 0
    close(results[1], results[0])
    w = [t.detach().requires_grad_(True) for t in y]  # ∇_x <w, A x> = Aᵀw, then d/dw ‖Aᵀw‖² = 2 A Aᵀ w
    second = []
    for physics in (ref, dphys):
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(sum((a * b).sum() for a, b in zip(physics.A(x), w)), x, create_graph=True)
        second.append(torch.autograd.grad((g ** 2).sum(), w))
    for a, b in zip(second[1], second[0]):
        close(a, b)
    xs = [torch.rand(1, 3, 36, 30, requires_grad=True) for _ in ops]
    for call, plain in ((lambda: dphys.A_each(xs), lambda: [op.A(x) for op, x in zip(ops, xs)]),
                        (lambda: dphys.A_adjoint_A_each(xs), lambda: sum(op.A_adjoint_A(x) for op, x in zip(ops, xs)))):
        for a, b in zip(_grads(call, *xs), _grads(plain, *xs)):
            close(a, b)


def test_second_derivatives_through_the_denoiser_are_refused(ctx):
    model = small_dncnn(1, depth=3)
    d = dr.distribute(model, ctx, patch_size=12, overlap=4)
    x = torch.rand(1, 1, 30, 30, requires_grad=True)
    with pytest.raises(NotImplementedError, match="second derivatives through the tiled denoiser"):
        torch.autograd.grad(d(x).sum(), x, create_graph=True)


def test_a_result_that_outlives_its_context_leaves_nothing_on_stderr(tmp_path):
    """The kept activations of a forward with gradients are released by a finalizer: after the context
    closed (here at interpreter exit) it has no cluster to tell, and says nothing."""
    import subprocess
    import sys

    script = tmp_path / "outlives.py"
    script.write_text(
        "import torch\n"
        "import daskrecon as dr\n"
        "from deepinv.models import DnCNN\n"
        "with dr.DistributedContext(n_workers=1, dashboard_address='127.0.0.1:0') as ctx:\n"
        "    den = dr.distribute(DnCNN(3, 3, depth=2, nf=4, pretrained=None), ctx, patch_size=16, overlap=4)\n"
        "    out = den(torch.rand(1, 3, 32, 32, requires_grad=True), 0.05)\n"
        "assert out.grad_fn is not None\n"
        "print('done')\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr[-2000:]
