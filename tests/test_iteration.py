"""engine.iteration: the graph builders, computed, against deepinv's own data term."""

import deepinv as dinv
import numpy as np
import torch
from deepinv.optim import L2
from deepinv.physics.functional.blur import gaussian_blur

import daskrecon as dr
from daskrecon.engine import iteration
from daskrecon.frontend.reconstruct import plan_problem

from helpers import Square, noisy_measurements, small_dncnn


def _problem(ctx, chunkwise: bool):
    torch.manual_seed(0)
    # reflect-padded blurs have a chunk-wise form; Square (non-linear) runs whole on its worker
    ops = [dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0 + i, 1.0)), padding="reflect") for i in range(2)]
    if not chunkwise:
        ops.append(Square(0.5))
    x = torch.rand(1, 3, 48, 40)
    y = noisy_measurements(ops, x)
    kind = "physics" if not chunkwise else "linear_physics"
    problem, _ = plan_problem(dr.distribute(ops, ctx, type_object=kind), y,
                              dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=6), data_fidelity=None,
                              x0=torch.zeros_like(x), x_true=None, sigma_denoiser=0.05, chunks=(24, 20))
    return ops, y, problem


def _value(ctx, a):
    return np.asarray(ctx.client.compute(a).result())


def test_gradient_and_value_are_deepinvs(ctx):
    for chunkwise in (True, False):
        ops, y, problem = _problem(ctx, chunkwise)
        assert (problem.global_ops == []) == chunkwise
        x = torch.rand(problem.shape)
        xd = __import__("dask.array", fromlist=["from_array"]).from_array(x.numpy(), chunks=problem.chunks)
        grad, value = iteration.gradient(problem, xd)
        want = sum(L2().grad(x, y[i], op) for i, op in enumerate(ops))
        np.testing.assert_allclose(_value(ctx, grad), want.numpy(), atol=1e-5)
        f = sum(float(L2().fn(x, y[i], op)) for i, op in enumerate(ops))
        assert abs(float(ctx.client.compute(value).result()) - f) <= 1e-5 * f
        per_batch = _value(ctx, iteration.batch_values(problem, xd))
        assert per_batch.shape == (1,) and abs(per_batch[0] - f) <= 1e-5 * f


def test_the_start_is_the_mean_of_the_adjoints(ctx):
    ops, y, problem = _problem(ctx, chunkwise=True)
    start = _value(ctx, iteration.adjoint_sum(problem, scale=1.0 / len(ops)))
    want = sum(op.A_adjoint(y[i]) for i, op in enumerate(ops)) / len(ops)
    np.testing.assert_allclose(start, want.numpy(), atol=1e-6)


def test_metric_partials_sum_per_batch_element_whatever_the_chunks():
    """The change and norm sums are kept per batch element (deepinv's residual averages their ratios),
    whether a chunk holds the whole batch or part of it."""
    from daskrecon.tasks.iteration import metric_partial, sum_metrics

    rng = np.random.default_rng(0)
    new, old, truth = (rng.random((3, 2, 6, 5)).astype(np.float32) for _ in range(3))
    whole = metric_partial(new, old, truth, batch=3)
    parts = [metric_partial(new[b0:b1, :, h0:h1], old[b0:b1, :, h0:h1], truth[b0:b1, :, h0:h1], batch=3, first=b0)
             for b0, b1 in ((0, 1), (1, 3)) for h0, h1 in ((0, 4), (4, 6))]
    n, o = new.astype(np.float64), old.astype(np.float64)
    expected = np.concatenate([((n - o) ** 2).sum(axis=(1, 2, 3)), (n ** 2).sum(axis=(1, 2, 3)),
                               [((np.clip(n, 0, 1) - truth) ** 2).sum(), n.size]])
    np.testing.assert_allclose(whole, expected, rtol=1e-12)
    np.testing.assert_allclose(sum_metrics(*parts), expected, rtol=1e-12)
