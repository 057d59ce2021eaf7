"""The user guide's bundle examples, with the import line changed (and a local denoiser: no download)."""

import pytest
import torch
from deepinv.optim import L2, PnP
from deepinv.physics import Blur, GaussianNoise, stack
from deepinv.physics.blur import gaussian_blur

from daskrecon import DistributedContext, FactoryConfig, TilingConfig, make_distrib_bundle  # was: deepinv.distrib
from daskrecon.errors import ShapeError

from helpers import small_dncnn


def guide_example(clean_image, denoiser, num_iterations=4, lr=1.0):
    """The guide's quick start, verbatim but for the denoiser."""
    with DistributedContext(seed=42, n_workers=2, dashboard_address="127.0.0.1:0") as ctx:
        kernels = [
            gaussian_blur(sigma=1.0),
            gaussian_blur(sigma=2.0),
            gaussian_blur(sigma=(1.5, 3.0), angle=30),
        ]
        physics_list = []
        for kernel in kernels:
            blur_op = Blur(filter=kernel, padding="circular")
            blur_op.noise_model = GaussianNoise(sigma=0.03, rng=torch.Generator().manual_seed(len(physics_list)))
            physics_list.append(blur_op)
        stacked_physics = stack(*physics_list)
        measurements = stacked_physics(clean_image)
        factory_config = FactoryConfig(physics=stacked_physics, measurements=measurements, data_fidelity=L2())
        tiling_config = TilingConfig(patch_size=16, receptive_field_size=6)
        pnp_prior = PnP(denoiser=denoiser)
        bundle = make_distrib_bundle(ctx, factory_config=factory_config, signal_shape=clean_image.shape,
                                     prior=pnp_prior, tiling=tiling_config)
        bundle.signal.update_(torch.zeros_like(clean_image))
        with torch.no_grad():
            for it in range(num_iterations):
                grad = bundle.data_fidelity.grad(bundle.signal)
                new_data = bundle.signal.data - lr * grad
                bundle.signal.update_(new_data)
                denoised = bundle.prior.prox(bundle.signal, sigma_denoiser=0.05)
                bundle.signal.update_(denoised)
        return bundle.signal.data, stacked_physics, measurements


def test_quick_start_matches_a_plain_deepinv_loop():
    torch.manual_seed(0)
    clean = torch.rand(1, 3, 48, 40)
    model = small_dncnn(3)
    result, stacked, y = guide_example(clean, model, lr=0.3)
    x = torch.zeros_like(clean)
    with torch.no_grad():
        for _ in range(4):
            x = model(x - 0.3 * L2().grad(x, y, stacked))
    torch.testing.assert_close(result, x, atol=1e-4, rtol=0)


def test_signal_store_and_shape_check(tmp_path):
    from daskrecon import DistributedSignal

    with DistributedContext(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as ctx:
        s = DistributedSignal(ctx, (1, 1, 4, 4), store=str(tmp_path / "sig"))
        s.update_(torch.ones(1, 1, 4, 4))
        s.update_(2 * torch.ones(1, 1, 4, 4))
        fresh = DistributedSignal(ctx, (1, 1, 4, 4), store=str(tmp_path / "sig")).restore()
        assert fresh.iteration == 2 and torch.equal(fresh.data, s.data)
        with pytest.raises(ShapeError, match=r"update_ got shape \(1, 1, 5, 4\)"):
            s.update_(torch.ones(1, 1, 5, 4))
