"""Worker loss in the middle of a computation: it finishes, and bitwise equal to an undisturbed run."""

import os
import threading
import time

import pytest
import torch
from deepinv.optim import L2

import daskrecon as dr

from helpers import SlowBlur, noisy_measurements, small_dncnn


@pytest.fixture(scope="module")
def nanny_ctx():
    with dr.DistributedContext(n_workers=2, processes=True, dashboard_address="127.0.0.1:0", torch_threads=1) as c:
        yield c


def kill_one_worker_soon(ctx, delay):
    """Hard-kill (os._exit) one worker process after `delay` s; its nanny starts a new one.

    The returned thread's ``killed_at`` is a ``time.perf_counter()`` taken once the worker is dead
    (its answer to the kill never came)."""
    victim = ctx.workers()[0]

    def go():
        time.sleep(delay)
        try:
            ctx.client.run(os._exit, 1, workers=[victim])
        except Exception:
            pass  # the call itself fails: the worker died while answering
        t.killed_at = time.perf_counter()

    t = threading.Thread(target=go)
    t.killed_at = None
    t.start()
    return t


def test_gradient_survives_a_killed_worker(nanny_ctx):
    ops = [SlowBlur(1.0 + 0.5 * i, 0.0) for i in range(6)]
    x = torch.rand(1, 3, 32, 32)
    y = noisy_measurements(ops, torch.rand(1, 3, 32, 32))
    expected = dr.distribute(L2(), nanny_ctx).grad(x, y, dr.distribute(ops, nanny_ctx, fast_operators=False))
    slow = [SlowBlur(1.0 + 0.5 * i, 0.5) for i in range(6)]
    d = dr.distribute(slow, nanny_ctx, fast_operators=False)
    f = dr.distribute(L2(), nanny_ctx)
    before = set(nanny_ctx.workers())
    killer = kill_one_worker_soon(nanny_ctx, 0.7)
    g = f.grad(x, y, d)  # operators, measurements and x are rebuilt from their lineage
    killer.join()
    assert set(nanny_ctx.workers()) != before  # a worker really was replaced
    assert torch.equal(g, expected)
    assert torch.equal(f.grad(x, y, d), expected)  # and the next call works on the new worker


def test_denoising_survives_a_killed_worker(nanny_ctx):
    model = small_dncnn(3)
    x = torch.rand(1, 3, 160, 160)
    d = dr.distribute(model, nanny_ctx, patch_size=16, overlap=6, max_batch_size=1)
    t0 = time.perf_counter()
    expected = d(x)
    took = time.perf_counter() - t0
    before = set(nanny_ctx.workers())
    killer = kill_one_worker_soon(nanny_ctx, took / 3)
    out = d(x)  # the model reaches the new worker through its plugin
    returned = time.perf_counter()
    killer.join()
    assert set(nanny_ctx.workers()) != before
    assert killer.killed_at is not None and killer.killed_at < returned, "the worker died after the call returned"
    assert torch.equal(out, expected)



def test_backward_survives_a_killed_worker(nanny_ctx):
    # A training step's backward (tiled denoiser after a gradient step) loses a worker midway.
    ops = [SlowBlur(1.0 + 0.5 * i, 0.0) for i in range(4)]
    x0 = torch.rand(1, 3, 160, 160)
    y = noisy_measurements(ops, x0)
    model = small_dncnn(3)
    d = dr.distribute(model, nanny_ctx, patch_size=16, overlap=6, max_batch_size=1)
    f, phys = dr.distribute(L2(), nanny_ctx), dr.distribute(ops, nanny_ctx, fast_operators=False)
    with torch.no_grad():
        model.in_conv.weight.mul_(1.01)  # a changed parameter version travels with the backward

    def step():
        x = x0.clone().requires_grad_(True)
        loss = ((d(x - 0.5 * f.grad(x, y, phys)) - x0) ** 2).sum()
        return loss, torch.autograd.grad(loss, [x] + list(model.parameters()))

    _, expected = step()
    x = x0.clone().requires_grad_(True)
    loss = ((d(x - 0.5 * f.grad(x, y, phys)) - x0) ** 2).sum()
    before = set(nanny_ctx.workers())
    killer = kill_one_worker_soon(nanny_ctx, 0.2)
    t0 = time.perf_counter()
    got = torch.autograd.grad(loss, [x] + list(model.parameters()))
    took = time.perf_counter() - t0
    killer.join()
    assert set(nanny_ctx.workers()) != before
    assert took > 0.2, f"the backward ({took:.2f} s) ended before the worker was killed"  # it died mid-backward
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("storage", ["zarr", "memory"])
def test_reconstruction_survives_a_killed_worker(nanny_ctx, tmp_path, storage):
    # The engine's iteration graph (out of core: streamed between Zarr slots) loses a worker midway.
    import dask.array as da

    from helpers import blurs

    ops = blurs(3)
    x_true = torch.rand(1, 3, 384, 384)
    ys = [da.from_array(t.numpy(), chunks=(1, 3, 192, 192)) for t in noisy_measurements(ops, x_true, sigma=0.02)]
    d = dr.distribute(ops, nanny_ctx)
    den = dr.distribute(small_dncnn(3), nanny_ctx, patch_size=64, overlap=6)

    def run(tag):
        out = dr.reconstruct(d, ys, den, n_iter=4, step_size=0.3, progress=False, storage=storage,
                             checkpoint=str(tmp_path / tag) if storage == "zarr" else None)
        return torch.from_numpy(nanny_ctx.client.compute(out).result())

    run("warm-up")  # operators built, model shipped: the timed runs below do the same work
    t0 = time.perf_counter()
    expected = run("undisturbed")
    took = time.perf_counter() - t0
    before = set(nanny_ctx.workers())
    killer = kill_one_worker_soon(nanny_ctx, took / 2)
    t0 = time.perf_counter()
    got = run("killed")
    assert time.perf_counter() - t0 > took / 2  # the worker died during the run
    killer.join()
    assert set(nanny_ctx.workers()) != before
    assert torch.equal(got, expected)


def test_single_worker_killed_mid_call():
    """With one worker, its death loses everything: all is rebuilt from lineage on the replacement.

    Needs daskrecon's scheduler plugin: without it the restricted tasks wait in no-worker for ever.
    """
    ops = [SlowBlur(1.0 + 0.5 * i, 0.0) for i in range(4)]
    x = torch.rand(1, 3, 32, 32)
    y = noisy_measurements(ops, torch.rand(1, 3, 32, 32))
    with dr.DistributedContext(n_workers=1, processes=True, dashboard_address="127.0.0.1:0", torch_threads=1) as ctx:
        f = dr.distribute(L2(), ctx)
        expected = f.grad(x, y, dr.distribute(ops, ctx, fast_operators=False))
        d = dr.distribute([SlowBlur(1.0 + 0.5 * i, 0.5) for i in range(4)], ctx, fast_operators=False)
        f.grad(x, y, d)  # operators built, y placed
        before = ctx.workers()
        killer = kill_one_worker_soon(ctx, 0.6)
        g = f.grad(x, y, d)
        killer.join()
        assert ctx.workers() != before
        assert torch.equal(g, expected)


def test_everything_distributed_works_again_after_the_workers_restart(nanny_ctx):
    """``client.restart()`` (a notebook freeing memory, the dashboard's restart) cancels every future of the
    client: the physics, the fidelity and reconstruct then failed with "cancelled for reason: lost
    dependencies" for the rest of the session. What they placed is placed again; measurements the user placed
    are named as gone."""
    from daskrecon.errors import MeasurementError
    from helpers import blurs

    ctx = nanny_ctx
    ops = blurs(2, channels=1)
    x = torch.rand(1, 1, 32, 32)
    y = noisy_measurements(ops, x)
    dphys, dfid = dr.distribute(ops, ctx), dr.distribute(L2(), ctx)
    dden = dr.distribute(small_dncnn(1, depth=3), ctx, patch_size=16, overlap=4)
    with torch.no_grad():
        next(dden.parameters()).add_(0.01)  # weights changed since shipping: they travel as a placed state
    placed = dr.DistributedMeasurements(ctx, list(y))

    def results():
        return [dphys.A(x)[1], dphys.A_adjoint(y), dfid.grad(x, y, dphys), dden(x, 0.05),
                dr.reconstruct(dphys, y, dden, n_iter=2, step_size=0.5, progress=False)]

    before = results()
    ctx.client.restart()
    for a, b in zip(results(), before):
        assert torch.equal(a, b)
    with pytest.raises(MeasurementError, match=r"measurements \[0, 1\] are no longer on the cluster"):
        dphys.A_adjoint(placed)
