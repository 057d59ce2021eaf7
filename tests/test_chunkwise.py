"""Chunk-wise local operators against deepinv's whole-image operators (daskrecon.operators.chunkwise)."""

import dask.array as da
import numpy as np
import pytest
import torch
import deepinv as dinv
from deepinv.optim import L2
from deepinv.physics import Blur, BlurFFT, Denoising, Downsampling, Inpainting
from deepinv.physics.functional.blur import gaussian_blur
from hypothesis import given, settings, strategies as st

import daskrecon as dr
from daskrecon.errors import ShapeError
from daskrecon.operators.chunkwise import LocalOperator, fit_axis, local_form

from helpers import heterogeneous, noisy_measurements

SHAPE = (2, 3, 40, 36)


def _k(h, w, c=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.rand(1, c, h, w, generator=g)
    return k / k.sum(dim=(-2, -1), keepdim=True)


def operators():
    cases = []
    for pad in ("circular", "reflect", "replicate", "zeros", "valid"):
        cases.append((f"blur-{pad}-5x4", Blur(filter=_k(5, 4), padding=pad)))
        cases.append((f"blur-{pad}-6x7-rgb", Blur(filter=_k(6, 7, 3), padding=pad)))
    cases.append(("blur-fft-conv", Blur(filter=_k(7, 7), padding="circular", use_fft=True)))
    cases.append(("blurfft-odd", BlurFFT(img_size=SHAPE[1:], filter=gaussian_blur(sigma=(2.0, 2.0)))))
    cases.append(("blurfft-even", BlurFFT(img_size=SHAPE[1:], filter=_k(6, 4, 3))))
    for pad in ("circular", "reflect", "replicate"):
        cases.append((f"down2-{pad}", Downsampling(img_size=SHAPE[1:], filter="gaussian", factor=2, padding=pad)))
        cases.append((f"down4-{pad}", Downsampling(img_size=SHAPE[1:], filter="bicubic", factor=4, padding=pad)))
    # "valid": the kept grid starts at (k - 1) // 2, a phase inside each chunk (7 % 2, 15 % 4, 3 % 3).
    cases.append(("down2-valid", Downsampling(img_size=SHAPE[1:], filter=_k(15, 15), factor=2, padding="valid")))
    cases.append(("down4-valid", Downsampling(img_size=SHAPE[1:], filter="bicubic", factor=4, padding="valid")))
    cases.append(("down2-valid-even", Downsampling(img_size=SHAPE[1:], filter=_k(6, 4, 3), factor=2, padding="valid")))
    cases.append(("down2-nofilter", Downsampling(img_size=SHAPE[1:], filter=None, factor=2)))
    cases.append(("down2-nofilter-valid", Downsampling(img_size=SHAPE[1:], filter=None, factor=2, padding="valid")))
    cases.append(("inpainting", Inpainting(img_size=SHAPE[1:], mask=0.5, rng=torch.Generator().manual_seed(2))))
    cases.append(("denoising", Denoising()))
    return cases


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(5)
    return torch.rand(SHAPE, generator=g)


CASES = operators()
# Every operator on uneven chunks; three of them on two more chunkings (one chunk, split channels).
GRID = [(n, op, (2, 3, 13, 11)) for n, op in CASES] + [
    (n, op, c) for n, op in CASES if n in ("blur-reflect-6x7-rgb", "down4-replicate", "blurfft-even", "down4-valid")
    for c in ((1, 2, 20, 36), (2, 3, 40, 36))
]


@pytest.mark.parametrize("name,op,chunks", GRID, ids=[f"{n}-{c[2]}x{c[3]}" for n, _, c in GRID])
def test_chunkwise_equals_whole_image(ctx, data, name, op, chunks):
    form = local_form(op)
    assert form is not None
    x = data
    with ctx.client.as_current():
        if form.factor > 1:
            chunks = (*chunks[:2], max(form.factor, chunks[2] - chunks[2] % form.factor),
                      max(form.factor, chunks[3] - chunks[3] % form.factor))
        ax = form.apply(da.from_array(x.numpy(), chunks=chunks))
        assert ax.chunks[2:] == form.output_chunks(form.fit_chunks(da.from_array(x.numpy(), chunks=chunks).chunks))[2:]
        ax = ax.compute()
        ref = op.A(x)
        assert form.output_shape(x.shape) == tuple(ref.shape) and form.input_shape(tuple(ref.shape)) == x.shape
        # Same convolution on the same values: equal up to the summation order of conv2d.
        np.testing.assert_allclose(ax, ref.numpy(), atol=2e-6, rtol=0)
        v = torch.rand(ref.shape, generator=torch.Generator().manual_seed(9))
        atv = form.adjoint(da.from_array(v.numpy(), chunks=(1, 1, 7, 9)), da.from_array(x.numpy(), chunks=chunks).chunks)
        np.testing.assert_allclose(atv.compute(), op.A_adjoint(v).numpy(), atol=2e-5, rtol=0)
        assert atv.shape == x.shape and float(v.abs().sum()) > 0


def test_adjoint_identity_on_uneven_chunks(data):
    op = Downsampling(img_size=SHAPE[1:], filter="gaussian", factor=2, padding="reflect")
    form = local_form(op)
    x = da.from_array(data.numpy(), chunks=(2, 3, 14, 10))
    v = da.random.default_rng(1).random((2, 3, 20, 18), chunks=(2, 3, 6, 5)).astype(np.float32)
    lhs = float((form.apply(x) * v).sum().compute(scheduler="sync"))
    rhs = float((x * form.adjoint(v, x.chunks)).sum().compute(scheduler="sync"))
    assert lhs > 1 and abs(lhs - rhs) < 1e-4 * abs(lhs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8), st.integers(1, 12), st.sampled_from([1, 2, 3, 4]))
def test_fit_axis(sizes, minimum, factor):
    total = sum(sizes)
    out = fit_axis(tuple(sizes), minimum, factor)
    assert sum(out) == total and all(c > 0 for c in out)
    if len(out) > 1:
        assert all(c >= minimum for c in out)
        assert all(c % factor == 0 for c in out)
    if total % factor == 0 and total >= max(minimum, factor) and all(s >= minimum and s % factor == 0 for s in sizes):
        assert out == tuple(sizes)  # already valid: unchanged


def test_global_and_user_operators():
    assert local_form(dinv.physics.Tomography(angles=8, img_width=16)) is None
    # deepinv's adjoint gives back its img_size; chunk by chunk the sides are multiples of the factor.
    assert local_form(Downsampling(img_size=(3, 30, 30), filter="gaussian", factor=4, padding="valid")) is None
    assert local_form(Downsampling(img_size=(3, 30, 30), filter="gaussian", factor=4)) is None

    class Scale(dinv.physics.LinearPhysics):
        def A(self, x, **kw):
            return 2 * x

        A_adjoint = A

    assert local_form(Scale()) is None
    local_form.register(Scale, lambda op: LocalOperator(mask=np.array([[2.0]]), name="Scale"))
    try:
        x = da.ones((1, 1, 4, 4), chunks=2)
        np.testing.assert_array_equal(local_form(Scale()).apply(x).compute(scheduler="sync"), 2 * np.ones((1, 1, 4, 4)))
    finally:
        local_form.register(Scale, lambda op: None)  # back to "not local" for other tests


def test_bad_inputs():
    form = local_form(Downsampling(img_size=(3, 32, 32), filter="gaussian", factor=4))
    with pytest.raises(TypeError, match="dask arrays"):
        form.apply(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ShapeError, match=r"\(B, C, H, W\)"):
        form.apply(da.zeros((3, 32, 32)))
    with pytest.raises(ShapeError, match="multiple of the downsampling factor 4"):
        form.apply(da.zeros((1, 3, 30, 32), dtype=np.float32))
    with pytest.raises(TypeError, match="floating"):
        form.apply(da.zeros((1, 3, 32, 32), dtype=np.int32))
    with pytest.raises(ValueError, match="padding"):
        LocalOperator(filter=np.ones((1, 1, 3, 3)), padding="wrap")
    with pytest.raises(ValueError, match="valid.*needs a filter"):
        LocalOperator(padding="valid", factor=2)


def test_physics_and_fidelity_take_dask_arrays(ctx, data):
    ops = heterogeneous()
    x = torch.rand(1, 3, 36, 30)
    y = noisy_measurements(ops, torch.rand(1, 3, 36, 30))
    dphys = dr.distribute(ops, ctx)
    xd = da.from_array(x.numpy(), chunks=(1, 3, 12, 10))
    yd = [da.from_array(t.numpy(), chunks=(1, 3, 8, 8)) for t in y]
    stacked = dinv.physics.stack(*ops)
    with ctx.client.as_current():
        assert dphys.chunkable
        for got, want in zip(dphys.A(xd), stacked.A(x)):
            np.testing.assert_allclose(got.compute(), want.numpy(), atol=2e-6)
        np.testing.assert_allclose(dphys.A_adjoint(yd).compute(), stacked.A_adjoint(y).numpy(), atol=2e-5)
        np.testing.assert_allclose(dphys.A_adjoint_A(xd).compute(), stacked.A_adjoint(stacked.A(x)).numpy(), atol=2e-5)
        fid = dr.distribute(L2(), ctx)
        g = fid.grad(xd, yd, dphys).compute()
        want = L2().grad(x, y, stacked)
        assert float(want.abs().max()) > 0.1
        np.testing.assert_allclose(g, want.numpy(), atol=2e-5)
        f = fid.fn(xd, yd, dphys).compute()
        np.testing.assert_allclose(f, sum(L2().fn(x, t, o) for t, o in zip(y, ops)).numpy(), rtol=1e-5)


def test_a_global_operator_uses_the_assembled_image(ctx):
    ops = [Blur(filter=_k(3, 3), padding="circular"), dinv.physics.Tomography(angles=6, img_width=16, circle=False)]
    x = torch.rand(1, 1, 16, 16)
    dphys = dr.distribute(ops, ctx)
    with ctx.client.as_current():
        assert not dphys.chunkable
        out = dphys.A(da.from_array(x.numpy(), chunks=8))
        for got, op in zip(out, ops):
            np.testing.assert_allclose(got.compute(), op.A(x).numpy(), atol=1e-4)


def test_a_binary_mask_travels_as_bool_and_stays_exact(ctx, data):
    binary = Inpainting(img_size=SHAPE[1:], mask=0.5, rng=torch.Generator().manual_seed(2))
    weighted = Inpainting(img_size=SHAPE[1:], mask=0.5 * torch.ones(SHAPE[1:]))
    with ctx.client.as_current():
        for op, dtype in ((binary, bool), (weighted, np.float32)):
            form = local_form(op)
            assert form.mask.dtype == dtype
            out = form.apply(da.from_array(data.numpy(), chunks=(2, 3, 13, 11))).compute()
            assert out.dtype == np.float32 and np.array_equal(out, op.A(data).numpy())


# ---------------------------------------------------------------------- volumes (B, C, D, H, W)
SHAPE3 = (1, 2, 14, 16, 13)


def _k3(d, h, w, c=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.rand(1, c, d, h, w, generator=g)
    return k / k.sum(dim=(-3, -2, -1), keepdim=True)


VOLUME_CASES = [(f"blur3d-{pad}", Blur(filter=_k3(3, 5, 4), padding=pad))
                for pad in ("circular", "reflect", "replicate", "zeros", "valid")] + [
    ("blur3d-even-2ch-reflect", Blur(filter=_k3(4, 3, 6, c=2, seed=1), padding="reflect")),
    ("inpainting3d", Inpainting(img_size=SHAPE3[1:], mask=0.5, rng=torch.Generator().manual_seed(2))),
]


@pytest.mark.parametrize("chunks", [(1, 2, 5, 7, 6), (1, 1, 14, 8, 13)], ids=["uneven", "split-channels"])
@pytest.mark.parametrize("name,op", VOLUME_CASES, ids=[n for n, _ in VOLUME_CASES])
def test_volume_chunkwise_equals_deepinvs_whole_volume(ctx, name, op, chunks):
    """3-D blurs (deepinv's conv3d, every padding) and 3-D masks, forward and adjoint, chunk by chunk."""
    form = local_form(op)
    assert form is not None
    x = torch.rand(SHAPE3, generator=torch.Generator().manual_seed(5))
    with ctx.client.as_current():
        ax = form.apply(da.from_array(x.numpy(), chunks=chunks)).compute()
        ref = op.A(x)
        np.testing.assert_allclose(ax, ref.numpy(), atol=2e-6, rtol=0)
        v = torch.rand(ref.shape, generator=torch.Generator().manual_seed(9))
        atv = form.adjoint(da.from_array(v.numpy(), chunks=(1, 1, 4, 5, 6)), da.from_array(x.numpy(), chunks=chunks).chunks)
        np.testing.assert_allclose(atv.compute(), op.A_adjoint(v).numpy(), atol=2e-5, rtol=0)
    assert ref.shape != x.shape or float((ref - x).abs().max()) > 1e-2  # the operator does something


@pytest.mark.parametrize("padding", ["circular", "reflect", "replicate", "valid"])
def test_volume_downsampling_is_deepinvs_conv3d_then_subsampling(ctx, padding):
    """deepinv has no 3-D Downsampling class: the reference is its conv3d, then [::2] on D, H and W."""
    from deepinv.physics.functional import conv3d

    k = _k3(3, 3, 3, seed=4) if padding != "valid" else _k3(4, 3, 5, seed=4)  # valid: phases 1, 1, 0
    form = LocalOperator(filter=k.numpy(), padding=padding, factor=2, name="Downsampling3d")
    x = torch.rand(1, 2, 12, 16, 10, generator=torch.Generator().manual_seed(6))

    def reference(t):
        return conv3d(t, k, padding=padding)[..., ::2, ::2, ::2]

    with ctx.client.as_current():
        ax = form.apply(da.from_array(x.numpy(), chunks=(1, 2, 6, 8, 4))).compute()
        ref = reference(x)
        assert ax.shape == ((1, 2, 6, 8, 5) if padding != "valid" else (1, 2, 5, 7, 3)) == form.output_shape(x.shape)
        np.testing.assert_allclose(ax, ref.numpy(), atol=2e-6, rtol=0)
        v = torch.rand(ref.shape, generator=torch.Generator().manual_seed(3))
        xr = x.clone().requires_grad_(True)
        (adj,) = torch.autograd.grad(reference(xr), xr, grad_outputs=v)
        atv = form.adjoint(da.from_array(v.numpy(), chunks=(1, 2, 2, 3, 5)), ((1,), (2,), (6, 6), (8, 8), (4, 6)))
        np.testing.assert_allclose(atv.compute(), adj.numpy(), atol=2e-5, rtol=0)


def test_volume_shapes_are_checked():
    form = local_form(Blur(filter=_k3(3, 3, 3), padding="reflect"))
    with pytest.raises(ShapeError, match=r"its 3-D filter takes \(B, C, D, H, W\) volumes"):
        form.apply(da.zeros((1, 1, 8, 8), dtype=np.float32))
    with pytest.raises(ShapeError, match=r"its 2-D filter takes \(B, C, H, W\) images"):
        local_form(Blur(filter=_k(3, 3), padding="reflect")).apply(da.zeros((1, 1, 8, 8, 8), dtype=np.float32))
    with pytest.raises(ShapeError, match=r"\(B, C, D, H, W\) volumes"):
        form.apply(da.zeros((1, 1, 2, 8, 8, 8), dtype=np.float32))


def test_a_kernel_and_its_transposed_view_are_two_operators(ctx):
    """dask names tasks by a hash of the arguments that ignores memory order: a kernel and its
    transpose as a view hashed alike, so two such blurs shared task keys and the iteration used
    one operator's results for both (a wrong gradient, silently). Kernels are stored in C order."""
    from helpers import small_dncnn

    k = _k(5, 5)[0, 0]
    views = [(k / 2) * 2, k.mT]  # the second is a transposed (F-ordered) view of the same kind of data
    assert not views[1].is_contiguous()
    ops = [Blur(filter=v[None, None], padding="reflect") for v in views]
    forms = [local_form(op) for op in ops]
    assert all(f.filter.flags.c_contiguous for f in forms)
    x = da.from_array(np.random.default_rng(0).random((1, 2, 24, 24), dtype=np.float32), chunks=(1, 2, 12, 12))
    assert forms[0].apply(x).name != forms[1].apply(x).name
    xt = torch.from_numpy(x.compute())
    y = [op.A(xt) for op in ops]
    with ctx.client.as_current():
        out = dr.reconstruct(dr.distribute(ops, ctx), y, dr.distribute(small_dncnn(2), ctx, patch_size=12, overlap=6),
                             n_iter=1, step_size=0.4, x0=xt.clone(), progress=False, return_history=True)[1]
    assert out[0]["data_fidelity"] < 1e-10  # x is the solution: with the keys shared it was ~1e-2
    grad = dr.distribute(L2(), ctx).grad(xt * 0.5, dinv.utils.TensorList(y), dr.distribute(ops, ctx))
    torch.testing.assert_close(grad, L2().grad(xt * 0.5, dinv.utils.TensorList(y), dinv.physics.stack(*ops)),
                               atol=1e-5, rtol=0)
