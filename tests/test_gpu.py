"""CUDA paths: run where torch sees a GPU (skipped on CPU-only machines such as CI)."""

import pytest
import torch

import daskrecon as dr

from helpers import blurs, noisy_measurements, small_dncnn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_context_places_operators_and_models_on_the_gpu():
    with dr.DistributedContext(device_mode="gpu", dashboard_address="127.0.0.1:0") as ctx:
        assert ctx.device.type == "cuda"
        d = dr.distribute(blurs(3), ctx)
        devices = d.map_operators(lambda o: str(next(o.buffers()).device))
        assert all(dev.startswith("cuda") for dev in devices)
        x = torch.rand(1, 3, 64, 64, device="cuda")
        y = noisy_measurements([b.to("cuda") for b in blurs(3)], x)
        from deepinv.optim import L2

        g = dr.distribute(L2(), ctx).grad(x, y, d)
        assert g.device.type == "cuda"
        model = small_dncnn(3)
        out = dr.distribute(model, ctx, patch_size=32, overlap=6)(x)
        with torch.no_grad():
            ref = model.to("cuda")(x)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
