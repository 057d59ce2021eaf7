import pytest
import torch
import deepinv as dinv
from deepinv.physics.functional.blur import gaussian_blur

import daskrecon as dr
from daskrecon.operators import FFTConvolution, specialize
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
