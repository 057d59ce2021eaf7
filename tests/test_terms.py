"""engine.terms: how each operator of the data term runs — chunk by chunk, or whole on its worker."""

import deepinv as dinv
import torch
from deepinv.optim import L1, L2
from deepinv.physics.functional.blur import gaussian_blur

import daskrecon as dr
from daskrecon.engine.terms import GLOBAL_FORM_MAX_BYTES, choose_forms

from helpers import Square


def _forms(ctx, ops, fids, nbytes=4 * 3 * 64 * 64, **kw):
    d = dr.distribute(ops, ctx, type_object="physics", **kw)
    return choose_forms(d, d.chunkwise_forms(), fids, nbytes)


def test_local_operators_with_pixelwise_fidelities_run_chunk_by_chunk(ctx):
    ops = [dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0, 1.0)), padding="reflect"),
           dinv.physics.Inpainting(img_size=(3, 64, 64), mask=0.5)]
    forms, distances = _forms(ctx, ops, [L2(), L1()])
    assert all(f is not None for f in forms) and [type(d).__name__ for d in distances] == ["L2Distance", "L1Distance"]


def test_operators_without_a_chunkwise_form_run_whole(ctx):
    ops = [Square(2.0), dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0, 1.0)), padding="reflect")]
    forms, distances = _forms(ctx, ops, [L2(), L2()])
    assert forms[0] is None and distances[0] is None and forms[1] is not None


def test_circular_blurs_take_the_fft_on_their_worker_while_the_image_is_small(ctx):
    blur = [dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0, 1.0)), padding="circular")]
    assert _forms(ctx, blur, [L2()])[0] == [None]  # the FFT on one worker beats the spatial form
    assert _forms(ctx, blur, [L2()], nbytes=GLOBAL_FORM_MAX_BYTES + 1)[0][0] is not None  # larger: streams
    assert _forms(ctx, blur, [L2()], fast_operators=False)[0][0] is not None  # no FFT substitute: chunk-wise


def test_a_fidelity_that_is_not_a_pixelwise_chain_rule_keeps_the_operator_whole(ctx):
    class Weird(dinv.optim.DataFidelity):
        def grad(self, x, y, physics, *args, **kwargs):
            return physics.A_adjoint(physics.A(x) - y)

    op = [dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0, 1.0)), padding="reflect")]
    assert _forms(ctx, op, [Weird()])[0] == [None]
    torch.manual_seed(0)


def test_each_term_builds_its_operators_part_of_a_graph(ctx):
    """A chunk-wise term and a whole term, each alone: gradient, value per batch element and adjoint
    equal deepinv's for that operator."""
    import dask.array as da
    import numpy as np

    from daskrecon.engine.terms import ChunkwiseTerm, GraphInputs, WholeTerm
    from daskrecon.frontend.reconstruct import plan_problem
    from daskrecon.tasks.iteration import gradient_of

    from helpers import noisy_measurements, small_dncnn

    torch.manual_seed(0)
    ops = [dinv.physics.Blur(filter=gaussian_blur(sigma=(1.5, 1.0)), padding="reflect"),  # chunk-wise
           dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0, 2.0)), padding="circular")]  # whole: FFT on its worker
    x_true = torch.rand(2, 3, 48, 40)
    y = noisy_measurements(ops, x_true)
    problem, _ = plan_problem(dr.distribute(ops, ctx), y, dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=6),
                              data_fidelity=None, x0=torch.zeros_like(x_true), x_true=None, sigma_denoiser=0.05,
                              chunks=(24, 20))
    terms = problem.terms
    assert [type(t) for t in terms] == [ChunkwiseTerm, WholeTerm] and [t.index for t in terms] == [0, 1]
    x = torch.rand(problem.shape)
    inputs = GraphInputs(problem, da.from_array(x.numpy(), chunks=problem.chunks), "test-terms")
    for i, (term, op) in enumerate(zip(terms, ops)):
        g, v = ctx.client.compute(term.gradient(inputs), sync=True)
        g = gradient_of(np.asarray(g), problem.shape) if isinstance(term, WholeTerm) else np.asarray(g)
        want = L2().grad(x, y[i], op)
        np.testing.assert_allclose(g, want.numpy(), atol=1e-5)
        assert float(np.abs(g).max()) > 1e-2  # a real residual
        per_batch = L2().fn(x, y[i], op)
        np.testing.assert_allclose(ctx.client.compute(term.values(inputs), sync=True), per_batch.numpy(), rtol=1e-5)
        assert abs(v - float(per_batch.sum())) <= 1e-5 * float(per_batch.sum())
        np.testing.assert_allclose(ctx.client.compute(term.adjoint(inputs), sync=True), op.A_adjoint(y[i]).numpy(),
                                   atol=1e-5)
