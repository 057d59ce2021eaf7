import pytest
import torch
import deepinv as dinv
from deepinv.physics.functional.blur import gaussian_blur

import daskrecon as dr
from daskrecon.tasks.substitutes import FFTConvolution, specialize
from daskrecon.testing import assert_allclose

from helpers import blurs, noisy_measurements

FILTERS = {
    "isotropic": gaussian_blur(sigma=(2.0, 2.0)),
    "anisotropic": gaussian_blur(sigma=(1.0, 3.0), angle=30),
    "per-channel": torch.cat([gaussian_blur(sigma=(s, s), psf_size=(9, 9)) for s in (0.7, 1.3, 2.1)], dim=1),
    "asymmetric": (lambda f: f / f.sum())(torch.rand(1, 1, 4, 7)),  # even-sized, off-centre
}


@pytest.mark.parametrize("name", FILTERS)
@pytest.mark.parametrize("shape", [(2, 3, 37, 31), (1, 3, 16, 64)])
@pytest.mark.parametrize("use_fft", [False, True])
def test_fft_convolution_is_the_same_linear_map(name, shape, use_fft):
    op = dinv.physics.Blur(filter=FILTERS[name], padding="circular", use_fft=use_fft)
    fast = specialize(op)
    assert isinstance(fast, FFTConvolution)
    x, y = torch.rand(shape), torch.rand(shape)
    assert_allclose(fast.A(x), op.A(x), atol=1e-5, what="A")
    assert_allclose(fast.A_adjoint(y), op.A_adjoint(y), atol=1e-5, what="A_adjoint")
    assert_allclose(fast.A_adjoint_A(x), op.A_adjoint_A(x), atol=1e-5, what="A_adjoint_A")


def test_only_circular_blurs_are_specialised():
    for padding in ("valid", "reflect", "replicate"):
        op = dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0, 1.0)), padding=padding)
        assert specialize(op) is op
    inp = dinv.physics.Inpainting(img_size=(3, 8, 8), mask=0.5)
    assert specialize(inp) is inp


def test_noise_model_is_kept():
    op = blurs(1)[0]
    op.noise_model = dinv.physics.GaussianNoise(sigma=0.2)
    fast = specialize(op)
    x = torch.rand(1, 3, 32, 32)
    assert (fast(x) - fast.A(x)).std() > 0.1


def test_fast_and_plain_paths_agree_on_the_cluster(ctx):
    ops = blurs(4)
    x = torch.rand(1, 3, 33, 40)
    y = noisy_measurements(ops, torch.rand(1, 3, 33, 40))
    fast = dr.distribute(ops, ctx)
    plain = dr.distribute(ops, ctx, fast_operators=False)
    types = fast.map_operators(lambda o: type(o).__name__) + plain.map_operators(lambda o: type(o).__name__)
    assert types == ["FFTConvolution"] * 4 + ["Blur"] * 4
    f = dr.distribute(dinv.optim.L2(), ctx)
    assert_allclose(f.grad(x, y, fast), f.grad(x, y, plain), atol=1e-5)


def test_the_fft_substitute_is_as_accurate_as_deepinvs_own_convolution():
    """Against the exact map (the same convolution in float64), on a real 512² image with a 25×25 kernel."""
    from skimage import data

    x = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    kernel = gaussian_blur(sigma=(1.5, 3.5), angle=30)
    op = dinv.physics.Blur(filter=kernel, padding="circular")
    exact = dinv.physics.Blur(filter=kernel.double(), padding="circular").A(x.double())
    deepinv_error = float((op.A(x).double() - exact).abs().max())
    fft_error = float((specialize(op).A(x).double() - exact).abs().max())
    assert fft_error <= deepinv_error and deepinv_error > 1e-6, (fft_error, deepinv_error)  # 3.98e-7 vs 1.25e-6


def test_physics_methods_compute_as_deepinv_does_bit_for_bit(ctx):
    """The public operator methods run each operator as built: deepinv's demo compares them to the plain
    stack at 1e-6, below deepinv's own rounding (the test above), so only the same computation passes."""
    ops = blurs(3)
    stacked = dinv.physics.stack(*ops)
    d = dr.distribute(stacked, ctx)  # fast_operators=True: the gradients below use the FFT
    assert d.map_operators(lambda o: type(o).__name__) == ["FFTConvolution"] * 3
    x = torch.rand(1, 3, 64, 48)
    y = d.A(x)
    assert all(torch.equal(y[i], stacked.A(x)[i]) for i in range(3))
    per_op = d.A_adjoint(y, reduce_op=None)  # each operator's own adjoint, unsummed
    assert all(torch.equal(per_op[i], op.A_adjoint(y[i])) for i, op in enumerate(ops))
    per_op = d.A_adjoint_A(x, reduce_op=None)
    assert all(torch.equal(per_op[i], op.A_adjoint_A(x)) for i, op in enumerate(ops))
    assert torch.allclose(d.A_adjoint(y), stacked.A_adjoint(y), atol=1e-6, rtol=0)  # sums: their order may differ
