"""Small deepinv problems shared by the tests (odd sizes on purpose)."""

import torch
import deepinv as dinv
from deepinv.physics.functional.blur import gaussian_blur

H, W = 37, 31


def blurs(n: int = 4, channels: int = 3):
    return [
        dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0 + 0.4 * i, 1.0 + 0.2 * i)), padding="circular")
        for i in range(n)
    ]


def heterogeneous():
    """Blur + Downsampling + Inpainting: three different output shapes."""
    return [
        dinv.physics.Blur(filter=gaussian_blur(sigma=(1.5, 1.5)), padding="circular"),
        dinv.physics.Downsampling(img_size=(3, 36, 30), factor=2, filter="gaussian", padding="circular"),
        dinv.physics.Inpainting(img_size=(3, 36, 30), mask=0.6, rng=torch.Generator().manual_seed(1)),
    ]


def noisy_measurements(ops, x, sigma=0.05, seed=3):
    """y_i = A_i x + noise, so that y != A x (non-zero residuals)."""
    g = torch.Generator().manual_seed(seed)
    return dinv.utils.TensorList([op.A(x) + sigma * torch.randn(op.A(x).shape, generator=g) for op in ops])


class Exploding(dinv.physics.LinearPhysics):
    """A linear operator whose forward raises: to see worker errors reach the driver."""

    def A(self, x, **kwargs):
        raise RuntimeError("boom from operator A")

    def A_adjoint(self, y, **kwargs):
        return y


class Square(dinv.physics.Physics):
    """A non-linear operator: A(x) = w * x**2."""

    def __init__(self, w: float):
        super().__init__()
        self.w = w

    def A(self, x, **kwargs):
        return self.w * x**2


def counting_blur_factory(i, device, factory_kwargs):
    """Counts its calls on the worker it runs on (read back with client.run)."""
    from distributed import get_worker

    w = get_worker()
    w.daskrecon_builds = getattr(w, "daskrecon_builds", 0) + 1
    return dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0 + i, 1.0)), padding="circular", device=device)


def read_builds(dask_worker):
    return getattr(dask_worker, "daskrecon_builds", 0)
