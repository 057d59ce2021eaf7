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
        # the workers compute fp32 in IEEE fp32 (tf32=False); torch's default would round cuDNN's to TF32
        def allow_tf32():
            import torch as t  # imported here: cloudpickle cannot ship a reference to torch.backends.cudnn

            return t.backends.cudnn.allow_tf32

        assert set(ctx.client.run(allow_tf32).values()) == {False}
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            ref = model.to("cuda")(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- mixed precision on the GPU (issue #29)
@pytest.fixture(scope="module")
def gpu_ctxs():
    """One GPU worker and two GPU workers (sharing the device where there is one GPU); one torch thread
    each, as the CPU suite's 1/2/3-worker contexts, so that what runs on the CPU matches too."""
    kw = dict(device_mode="gpu", torch_threads=1, dashboard_address="127.0.0.1:0")
    with dr.DistributedContext(n_workers=1, **kw) as one, dr.DistributedContext(n_workers=2, **kw) as two:
        yield one, two


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_gpu_runs_tiles_in_reduced_precision_within_budget_and_repeats_bitwise(gpu_ctxs, precision):
    from daskrecon.planning.precision import DEFAULT_TOL

    ctx = gpu_ctxs[0]
    model = small_dncnn(3)
    x = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.no_grad():
        ref = dr.distribute(model, ctx, patch_size=32, overlap=6)(x, 0.05)
        d = dr.distribute(model, ctx, patch_size=32, overlap=6, precision=precision)
        out = d(x, 0.05)
        again = d(x, 0.05)
    report = d.precision_report
    assert report["precision"] == precision and set(report["probe"]) == {"fp32", precision}, report
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel <= DEFAULT_TOL, rel  # really reduced, and within budget
    assert torch.equal(out, again)


def test_auto_on_a_gpu_takes_a_reduced_precision(gpu_ctxs):
    d = dr.distribute(small_dncnn(3), gpu_ctxs[0], patch_size=32, overlap=6, precision="auto")
    with torch.no_grad():
        d(torch.rand(1, 3, 64, 64, device="cuda"), 0.05)
    assert d.precision_report["precision"] in ("bf16", "fp16"), d.precision_report


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_reconstruct_on_the_gpu_is_bitwise_on_1_and_2_workers(gpu_ctxs, precision):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    ops = blurs(3)
    y = noisy_measurements(ops, x, sigma=0.02)
    outs = []
    for c in gpu_ctxs:
        den = dr.distribute(small_dncnn(3), c, patch_size=32, overlap=8)
        outs.append(dr.reconstruct(dr.distribute(ops, c), y, den, n_iter=3, step_size=0.5, progress=False,
                                   precision=precision))
    assert outs[0].device.type == "cuda"
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_on_the_gpu_in_reduced_precision_is_bitwise_on_1_and_2_workers_and_near_fp32(gpu_ctxs, precision):
    import math

    x = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0)).to("cuda")
    grads = {}
    for name, c, p in (("1", gpu_ctxs[0], precision), ("2", gpu_ctxs[1], precision), ("fp32", gpu_ctxs[1], "fp32")):
        model = small_dncnn(3).to("cuda").train()
        den = dr.distribute(model, c, patch_size=16, overlap=6, precision=p)
        loss = ((den(x, 0.05) - x) ** 2).mean()
        grads[name] = torch.autograd.grad(loss, list(model.parameters()))
    assert all(g.device.type == "cuda" and bool(torch.isfinite(g).all()) for g in grads["1"])
    assert all(torch.equal(a, b) for a, b in zip(grads["1"], grads["2"]))
    num = math.sqrt(sum(float((a - b).norm()) ** 2 for a, b in zip(grads["2"], grads["fp32"])))
    ref = math.sqrt(sum(float(b.norm()) ** 2 for b in grads["fp32"]))
    assert 0 < num / ref <= 5e-2, num / ref


def test_dask_cudas_local_cuda_cluster_runs_a_reconstruction():
    """A LocalCUDACluster built by the user (dask-cuda, no RMM) passed to the context."""
    dask_cuda = pytest.importorskip("dask_cuda")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    ops = blurs(3)
    y = noisy_measurements(ops, x, sigma=0.02)
    with dask_cuda.LocalCUDACluster(threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster, \
            dr.DistributedContext(cluster, device_mode="gpu") as ctx:
        den = dr.distribute(small_dncnn(3), ctx, patch_size=32, overlap=8)
        out = dr.reconstruct(dr.distribute(ops, ctx), y, den, n_iter=3, step_size=0.5, progress=False)
    with dr.DistributedContext(device_mode="gpu", dashboard_address="127.0.0.1:0") as ours:
        den = dr.distribute(small_dncnn(3), ours, patch_size=32, overlap=8)
        ref = dr.reconstruct(dr.distribute(ops, ours), y, den, n_iter=3, step_size=0.5, progress=False)
    assert out.device.type == "cuda" and torch.equal(out, ref)
