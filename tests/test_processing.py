from collections import Counter

import numpy as np
import pytest
import torch
import dask.array as da
import zarr
from deepinv.models import Denoiser, DRUNet
from deepinv.optim import PnP, RED

import daskrecon as dr
from daskrecon.tasks import denoising as denoising_tasks
from daskrecon.errors import ShapeError
from daskrecon.testing import assert_allclose

from helpers import TwoStripes, small_dncnn


def plain(model, x, *args):
    with torch.no_grad():
        return model(x, *args)


@pytest.mark.parametrize("channels, batch", [(1, 1), (3, 2)])
@pytest.mark.parametrize("max_batch_size", [None, 1])
def test_tensor_tiling_is_exact_borders_included(ctx, channels, batch, max_batch_size):
    model = small_dncnn(channels)
    x = torch.rand(batch, channels, 61, 47)
    d = dr.distribute(model, ctx, patch_size=16, overlap=6, max_batch_size=max_batch_size)
    assert d.strategy_for(x.shape).get_num_patches() == 12
    out = d(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = plain(model, x)
    assert_allclose(out, ref, atol=1e-5)
    border = (out - ref)[..., :6, :].abs().max()  # where deepinv's reflect padding errs
    assert border < 1e-5
    too_small = dr.distribute(model, ctx, patch_size=16, overlap=3)(x)
    assert (too_small - ref).abs().max() > 1e-4  # overlap below the receptive radius is visibly wrong


def test_three_d_volume(ctx):
    model = small_dncnn(1, depth=5, dim=3)
    x = torch.rand(2, 1, 19, 24, 22)
    d = dr.distribute(model, ctx, patch_size=8, overlap=5)
    assert d.strategy_for(x.shape).get_num_patches() > 4
    assert_allclose(d(x), plain(model, x), atol=1e-5)


def test_patch_larger_than_image_is_one_tile(ctx):
    model = small_dncnn(3)
    x = torch.rand(1, 3, 20, 30)
    d = dr.distribute(model, ctx, patch_size=256, overlap=64)
    assert d.strategy_for(x.shape).get_num_patches() == 1
    assert_allclose(d(x), plain(model, x), atol=1e-5)


def test_dask_array_in_lazy_array_out_through_zarr(ctx, tmp_path):
    model = small_dncnn(3)
    x = torch.rand(1, 3, 130, 110)
    zarr.create_array(str(tmp_path / "in.zarr"), data=x.numpy(), chunks=(1, 3, 48, 48))
    lazy = dr.distribute(model, ctx, patch_size=24, overlap=6)(da.from_zarr(str(tmp_path / "in.zarr")))
    assert isinstance(lazy, da.Array) and lazy.shape == x.shape and lazy.dtype == np.float32
    with ctx.client.as_current():  # several contexts are alive in this session: compute on ours
        da.to_zarr(lazy, str(tmp_path / "out.zarr"))
    out = torch.from_numpy(zarr.open_array(str(tmp_path / "out.zarr"))[:])
    assert_allclose(out, plain(model, x), atol=1e-5)


def test_lazy_array_computes_on_another_cluster_after_close(ctx, ctx1):
    # The array outlives its DistributedProcessing and its cluster's plugin: it carries the model.
    import gc

    model = small_dncnn(3)
    x = torch.rand(1, 3, 70, 60)
    d = dr.distribute(model, ctx, patch_size=24, overlap=6)
    lazy = d(da.from_array(x.numpy(), chunks=(1, 3, 36, 36)))
    key = d.key
    d.close()
    del d
    gc.collect()
    assert all(v is None for v in ctx1.client.run(lambda: denoising_tasks._MODEL_PAYLOADS.get(key)).values())
    out = torch.from_numpy(ctx1.client.compute(lazy).result())
    assert_allclose(out, plain(model, x), atol=1e-5)
    out = torch.from_numpy(ctx.client.compute(lazy).result())  # and on its own cluster, after close()
    assert_allclose(out, plain(model, x), atol=1e-5)


def test_custom_strategy(ctx):
    model = small_dncnn(3)
    x = torch.rand(1, 3, 40, 33)
    d = dr.distribute(model, ctx, tiling_strategy=TwoStripes.Strategy(x.shape, halo=6))
    assert_allclose(d(x), plain(model, x), atol=1e-5)
    with pytest.raises(ShapeError, match="custom strategy was built for img_size"):
        d(torch.rand(1, 3, 41, 33))
    with pytest.raises(TypeError, match="custom and 'basic' strategies apply to torch tensors"):
        d(da.zeros((1, 3, 40, 33), chunks=20, dtype="f4"))


def test_blending_is_exact_with_enough_overlap_and_a_partition_of_unity(ctx):
    model = small_dncnn(3)
    x = torch.rand(1, 3, 50, 50)
    blended = dr.distribute(model, ctx, patch_size=16, overlap=16, blend="cosine")(x)
    assert_allclose(blended, plain(model, x), atol=1e-5)  # 16 >= radius 6 + taper half-width 9
    identity = dr.distribute(torch.nn.Identity(), ctx, type_object="denoiser", patch_size=8, overlap=4, blend="cosine")
    assert_allclose(identity(x), x, atol=1e-6)  # weights sum to one everywhere
    with pytest.raises(ValueError, match="blend must be None or 'cosine'"):
        dr.distribute(model, ctx, blend="gaussian")(x)


def test_basic_strategy_splits_into_blocks(ctx):
    x = torch.rand(1, 3, 128, 128)
    d = dr.distribute(torch.nn.Identity(), ctx, type_object="denoiser", tiling_strategy="basic")
    assert d.strategy_for(x.shape).get_num_patches() == 4  # deepinv's rule: 2 x 2 blocks of 64
    assert_allclose(d(x), x, atol=0)


def test_drunet_error_no_larger_than_deepinv_distributed(ctx):
    from deepinv.distributed import DistributedContext as DeepinvContext, distribute as deepinv_distribute

    torch.manual_seed(0)
    model = DRUNet(3, 3, pretrained=None).eval()
    x = torch.rand(1, 3, 128, 128)
    ref = plain(model, x, 0.1)
    with DeepinvContext(device_mode="cpu") as c, torch.no_grad():
        theirs = (deepinv_distribute(model, c, patch_size=64, overlap=16)(x, 0.1) - ref).abs().max()
    d = dr.distribute(model, ctx, patch_size=64, overlap=16)
    assert d.align == 8
    ours = (d(x, 0.1) - ref).abs().max()
    assert ours <= theirs
    assert theirs > 1e-3 and ours < 1e-5  # measured: 2.4e-2 against ~6e-9


def test_a_downsampling_3d_unet_tiles_exactly_inside_volume_chunks(ctx):
    """A 3-D U-Net (max-pooling: tiles aligned to 2 voxels) tiled inside the chunks of a dask volume."""
    import dask.array as da
    from deepinv.models import UNet

    from daskrecon.planning.receptive import receptive_radius

    torch.manual_seed(0)
    model = UNet(1, 1, scales=2, batch_norm=False, dim=3).eval()
    radius = receptive_radius(model, channels=1, ndim=3, size=33)
    x = torch.rand(1, 1, 32, 36, 32)
    with torch.no_grad():
        ref = model(x)
    d = dr.distribute(model, ctx, patch_size=8, overlap=radius + radius % 2)
    assert d.align == 2
    with ctx.client.as_current():
        out = d(da.from_array(x.numpy(), chunks=(1, 1, 16, 18, 16))).compute()
    assert float((torch.from_numpy(out) - ref).abs().max()) <= 1e-5
    assert float((ref - x).abs().max()) > 1e-2


def test_a_model_in_training_mode_with_batch_statistics_is_told_its_tiles_run_in_eval_mode(ctx):
    """deepinv's UNet has batch normalization by default and a new module is in training mode: its tiles
    ran in eval mode (a tile's batch statistics would depend on the tiling), without a word."""
    import warnings

    from deepinv.models import UNet

    torch.manual_seed(0)
    model = UNet(1, 1, scales=2)  # batch_norm=True, training mode: as built
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        for m in model.modules():  # running statistics other than (0, 1), so that eval mode shows
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        in_training, in_eval = model(x), model.eval()(x)
    model.train()
    d = dr.distribute(model, ctx, patch_size=32, overlap=0)
    with pytest.warns(UserWarning, match=r"UNet is in training mode .*BatchNorm2d.*tiles run in eval mode"):
        with torch.no_grad():
            out = d(x)
    assert_allclose(out, in_eval, atol=1e-5)  # what it said: eval mode
    assert float((out - in_training).abs().max()) > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d.eval()  # the wrapper passes the mode on to the model: said, so no warning
        with torch.no_grad():
            d(x)
        plain = dr.distribute(small_dncnn(1), ctx, patch_size=16, overlap=6)  # training mode, no such layer
        plain(x)


def test_prior_and_pnp(ctx):
    model = small_dncnn(3)
    x = torch.rand(1, 3, 40, 40)
    d = dr.distribute(model, ctx, patch_size=16, overlap=6)
    assert_allclose(PnP(denoiser=d).prox(x, sigma_denoiser=0.1), plain(model, x), atol=1e-5)
    prior = dr.distribute(PnP(denoiser=model), ctx, patch_size=16, overlap=6)
    assert isinstance(prior, dr.DistributedPrior)
    assert_allclose(prior.prox(x, sigma_denoiser=0.1), plain(model, x), atol=1e-5)
    red = dr.distribute(RED(denoiser=model), ctx, patch_size=16, overlap=6)
    assert_allclose(red.grad(x, sigma_denoiser=0.1), x - plain(model, x), atol=1e-5)


def test_model_reaches_each_worker_once(ctx):
    model = small_dncnn(3)
    d = dr.distribute(model, ctx, patch_size=8, overlap=6)
    x = torch.rand(1, 3, 40, 40)
    for _ in range(3):
        d(x)
    ctx.client.compute(d(da.from_array(x.numpy(), chunks=(1, 3, 20, 20)))).result()
    key = d.key
    loads = ctx.client.run(lambda: denoising_tasks.MODEL_LOADS.get(key, 0))
    assert sorted(loads.values()) == [1, 1]
    d.close()
    assert ctx.client.run(lambda: denoising_tasks._MODELS.get((key, None))) == {w: None for w in loads}


def test_tile_batches_are_spread_over_the_workers(ctx):
    # One worker holds the image; left to the scheduler, the tile tasks pile up there.
    from distributed import get_task_stream

    model = small_dncnn(3)
    d = dr.distribute(model, ctx, patch_size=20, overlap=6)
    x = torch.rand(1, 3, 40, 40)  # 2x2 tiles of equal cost, one batch each
    d(x)
    with get_task_stream(ctx.client) as ts:
        out = d(x)
    ran = Counter(t["worker"] for t in ts.data if str(t["key"]).startswith("process_patches"))
    assert sorted(ran.values()) == [2, 2], ran
    assert_allclose(out, plain(model, x), atol=1e-5)


def test_bitwise_identical_on_1_2_3_workers(ctx, ctx1, ctx3):
    model = small_dncnn(3)
    x = torch.rand(2, 3, 70, 70)
    outs = [dr.distribute(model, c, patch_size=16, overlap=6)(x) for c in (ctx1, ctx, ctx3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_bad_input(ctx):
    model = small_dncnn(3)
    with pytest.raises(ValueError, match="unknown tiling strategy 'fancy'"):
        dr.distribute(model, ctx, tiling_strategy="fancy")
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        dr.distribute(model, ctx, max_batch_size=0)
    with pytest.raises(ValueError, match="overlap must be a non-negative int"):
        dr.distribute(model, ctx, overlap=-1)
    for bad in (16.0, True, (16, "a"), ()):  # refused, not truncated or iterated ('float' object is not iterable)
        with pytest.raises(ValueError, match=r"patch_size must be a positive int or a sequence of positive ints"):
            dr.distribute(model, ctx, patch_size=bad)
    with pytest.raises(ValueError, match="tiling_dims must be an int or a sequence of ints"):
        dr.distribute(model, ctx, tiling_dims="HW")
    for dims in (4, 5, (-5,), (2, 4)):  # never wrapped onto another axis (5 used to tile the channels)
        beyond = dr.distribute(model, ctx, patch_size=16, overlap=8, tiling_dims=dims)
        with pytest.raises(ValueError, match=r"names dimension\(s\) \[-?\d\] that a 4-D signal .* \(valid: -4..3\)"):
            beyond(torch.rand(1, 3, 32, 32))
    d = dr.distribute(model, ctx, patch_size=16, overlap=8)
    with pytest.raises(ShapeError, match=r"chunks along axis 2 \(4 px\) are smaller than overlap=8"):
        d(da.zeros((1, 3, 40, 40), chunks=(1, 3, 4, 40), dtype=np.float32))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor or a dask.array.Array, got ndarray \(torch.from_numpy\(a\)"):
        d(np.zeros((1, 3, 8, 8)))
    with pytest.raises(TypeError, match="do not apply to 'denoiser'"):
        dr.distribute(model, ctx, num_operators=3)


def test_a_call_the_network_cannot_take_is_refused_where_it_is_made(ctx):
    """DRUNet needs sigma: without it, a lazy array used to build and then fail inside a worker at .to_zarr()."""
    model = DRUNet(3, 3, nc=[8, 8, 8, 8], nb=1, pretrained=None).eval()
    d = dr.distribute(model, ctx, patch_size=32, overlap=8)
    lazy_in = da.random.random((1, 3, 64, 64), chunks=(1, 3, 32, 32)).astype(np.float32)
    for x in (lazy_in, torch.rand(1, 3, 64, 64)):
        with pytest.raises(TypeError, match=r"DRUNet.forward\(x, sigma\) .*'sigma'.*dden\(x, sigma=0.05\)"):
            d(x)
        with pytest.raises(TypeError, match="unexpected keyword argument 'sigmaa'"):
            d(x, 0.05, sigmaa=0.05)
    out = d(lazy_in, sigma=0.05)  # and the right call still builds and computes
    assert_allclose(torch.from_numpy(out.compute()), plain(model, torch.from_numpy(lazy_in.compute()), 0.05),
                    atol=1e-5)
    anything = dr.DistributedProcessing(ctx, lambda x, *a, **k: 2 * x, patch_size=32, overlap=0)
    assert_allclose(anything(torch.ones(1, 1, 8, 8), 1, gamma=3), 2 * torch.ones(1, 1, 8, 8))  # a callable taking anything is not second-guessed


def test_a_signal_with_other_channels_or_dimensions_than_the_network_is_refused_before_it_runs(ctx):
    """A grey image and a colour network used to fail in the first tile on a worker (reconstruct: after
    the power method and the staging of every input)."""
    import deepinv as dinv
    from daskrecon.models import GreyThroughColour

    model = small_dncnn(3)
    d = dr.distribute(model, ctx, patch_size=16, overlap=8)
    x = torch.rand(1, 1, 32, 32)
    for grey in (x, da.from_array(x.numpy(), chunks=(1, 1, 16, 16))):
        with pytest.raises(ShapeError, match=r"\(DnCNN\) takes 3-channel signals, this one has 1 .*GreyThroughColour"):
            d(grey)
    op = dinv.physics.Blur(filter=dinv.physics.blur.gaussian_blur(sigma=(1.0, 1.0)))
    dphys = dr.distribute([op, op], ctx)
    with pytest.raises(ShapeError, match="takes 3-channel signals, this one has 1"):
        dr.reconstruct(dphys, [op(x), op(x)], d, n_iter=1, progress=False)
    wrapped = GreyThroughColour(model)
    assert_allclose(dr.distribute(wrapped, ctx, patch_size=16, overlap=8)(x), plain(wrapped, x), atol=1e-5)
    with pytest.raises(ShapeError, match=r"\(GreyThroughColour\) takes 1-channel signals, this one has 3"):
        dr.distribute(wrapped, ctx, patch_size=16, overlap=8)(torch.rand(1, 3, 32, 32))
    with pytest.raises(ShapeError, match=r"\(DnCNN\) is a 2-D network, of images .*shape \(1, 3, 4, 32, 32\)\. "
                                         r"For a volume and a 2-D network: daskrecon.models.SliceBySlice"):
        d(torch.rand(1, 3, 4, 32, 32))
    with pytest.raises(ShapeError, match=r"is a 3-D network, of volumes \(B, C, D, H, W\); this signal has shape "
                                         r"\(1, 1, 32, 32\)\.$"):
        dr.distribute(small_dncnn(1, dim=3), ctx, patch_size=16, overlap=8)(x)
    with pytest.raises(ShapeError, match=r"shape \(32, 32\)\. Add the batch and channel axes: x\[None, None\]"):
        d(torch.rand(32, 32))
    from daskrecon.models import SliceBySlice

    sliced = SliceBySlice(small_dncnn(3))  # a 2-D network made for volumes: not second-guessed
    vol = torch.rand(1, 3, 4, 32, 32)
    assert_allclose(dr.distribute(sliced, ctx, patch_size=16, overlap=(0, 8, 8))(vol), plain(sliced, vol), atol=1e-5)


def test_a_tile_too_large_for_the_workers_is_refused_with_its_size_and_the_limit(ctx):
    from deepinv.models import DnCNN

    from daskrecon.runtime.cluster import scheduler_workers
    from daskrecon.runtime.memory import MemoryLimitError

    model = DnCNN(1, 1, depth=3, nf=64, pretrained=None).eval()
    big = dr.distribute(model, ctx, patch_size=8192, overlap=3)
    limit = min(w["memory_limit"] for w in scheduler_workers(ctx.client).values())
    with pytest.raises(MemoryLimitError, match=r"8192×8192 pixels.*needs at least .* GiB.*memory limit of") as e:
        big(torch.zeros(1, 1, 8192, 8192))
    assert "patch_size (now 8192)" in str(e.value)
    with pytest.raises(MemoryLimitError, match=r"chunk task \(chunk with halo 1×1×8198×8198"):
        big(da.zeros((1, 1, 16384, 16384), chunks=(1, 1, 8192, 8192), dtype="f4"))
    # the estimate is ~ (1 + 1 + 2×64 channels) × 4 B per pixel: above this cluster's limit, below 3× it
    assert 130 * 4 * 8198**2 > limit
    # a tile that fits runs
    small = dr.distribute(model, ctx, patch_size=64, overlap=3)
    assert small(torch.zeros(1, 1, 100, 100)).shape == (1, 1, 100, 100)


def test_dtype_policy(ctx):
    dden = dr.distribute(small_dncnn(1), ctx, patch_size=16, overlap=6)
    with pytest.raises(TypeError, match="x is torch.float64 but the denoiser's weights are torch.float32"):
        dden(torch.zeros(1, 1, 20, 20, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x is torch.uint16: convert it, e.g. x.astype\('float32'\) / 65535"):
        dden(da.zeros((1, 1, 20, 20), dtype="u2"))  # a microscope's 16-bit image, from Zarr
    with pytest.raises(TypeError, match=r"x is torch.uint8: convert it, e.g. x.float\(\) / 255"):
        dden(torch.zeros(1, 1, 20, 20, dtype=torch.uint8))
    with pytest.raises(TypeError, match="real images"):
        dden(torch.zeros(1, 1, 20, 20, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"x is float64 \(a dask array\) .* convert x \(x.astype\('float32'\)\)"):
        dden(da.zeros((1, 1, 20, 20), dtype="f8"))  # a dask array has no .to(): the advice is numpy's
    double = dr.distribute(small_dncnn(1).double(), ctx, patch_size=16, overlap=6)
    x = torch.rand(1, 1, 20, 20, dtype=torch.float64)
    assert double(x).dtype == torch.float64  # a float64 model takes float64 images


def _record(path, seconds=0.3):
    import os
    import time

    t0 = time.time()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{t0} {time.time()} {torch.get_num_threads()} {os.getpid()}\n")


class _RecordedBackward(torch.autograd.Function):
    """Identity forward; its backward is recorded like a call (a backward holds activations too)."""

    @staticmethod
    def forward(ctx, x, path):
        ctx.path = path
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _record(ctx.path)
        return grad, None


class _Recording(Denoiser):
    """A 1×1 convolution that appends "start end torch-threads pid" to a file at each call (and at each
    backward through it), and lasts 0.3 s."""

    def __init__(self, path):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        self.path = str(path)

    def forward(self, x, *args, **kwargs):
        _record(self.path)
        return _RecordedBackward.apply(self.conv(x), self.path)


def _worker_calls(log):
    """The calls the workers made (the driver calls the network once too, checking the tile's memory)."""
    import os

    rows = [line.split() for line in log.read_text().splitlines()]
    return sorted((float(a), float(b), int(t)) for a, b, t, pid in rows if int(pid) != os.getpid())


@pytest.mark.parametrize("one_task", [False, True])
def test_one_task_per_worker_runs_its_tiles_one_at_a_time_with_all_the_threads(tmp_path, one_task):
    log = tmp_path / "calls.txt"
    with dr.DistributedContext(n_workers=1, threads_per_worker=2, torch_threads=1,
                               dashboard_address="127.0.0.1:0") as c:
        model = _Recording(log)
        dden = dr.distribute(model, c, patch_size=32, overlap=0, max_batch_size=1, one_task_per_worker=one_task)
        x = torch.rand(1, 1, 64, 64)
        with torch.no_grad(), c.client.as_current():
            lazy = dden(da.from_array(x.numpy(), chunks=(1, 1, 32, 32))).compute()
        with torch.no_grad():
            np.testing.assert_allclose(lazy, model.conv(x).numpy(), atol=1e-6)  # the same result either way
        calls = _worker_calls(log)
        assert len(calls) == 4  # four chunks, one tile each
        overlapping = any(b[0] < a[1] for a, b in zip(calls, calls[1:]))
        assert overlapping != one_task, calls  # two at a time on two threads, unless one task per worker
        assert {int(t) for _, _, t in calls} == ({2} if one_task else {1})  # both threads' torch threads inside
        log.unlink()
        with torch.no_grad():
            dden(x)  # the tensor path too
        calls = _worker_calls(log)
        assert len(calls) == 4 and {int(t) for _, _, t in calls} == ({2} if one_task else {1})
        log.unlink()
        xg = x.clone().requires_grad_(True)
        dden(xg).sum().backward()  # the backward's tiles hold activations too: they wait their turn as well
        assert xg.grad is not None and xg.grad.abs().sum() > 0
        calls = _worker_calls(log)
        assert len(calls) >= 8 and {int(t) for _, _, t in calls} == ({2} if one_task else {1})  # forwards, backwards
        if one_task:
            assert not any(b[0] < a[1] for a, b in zip(calls, calls[1:])), calls
        other = dr.distribute(model, c, patch_size=32, overlap=0, one_task_per_worker=not one_task)
        assert other.shipment.fingerprint != dden.shipment.fingerprint  # a checkpoint tells the two apart
    with pytest.raises(TypeError, match="one_task_per_worker must be True or False"):
        dr.distribute(model, c, one_task_per_worker="yes")


def test_the_network_is_found_through_nested_wrappers_and_the_alignment_registry():
    """Alignment, channels and dimensions come from the network inside priors and wrappers, however nested;
    a wrapper that declares its channels (GreyThroughColour) speaks for what is inside it."""
    import deepinv as dinv

    from daskrecon.frontend import processing
    from daskrecon.models import GreyThroughColour, bundled_denoiser_3d, bundled_drunet

    net = bundled_drunet()
    eq = dinv.models.EquivariantDenoiser
    cases = [(net, 8, 3, 2), (eq(net), 8, 3, 2), (dinv.optim.PnP(eq(net)), 8, 3, 2), (GreyThroughColour(net), 8, 1, 2),
             (eq(GreyThroughColour(net)), 8, 1, 2), (bundled_denoiser_3d(), 1, 1, 3)]
    for model, align, channels, dims in cases:
        assert (processing.default_align(model), processing.input_channels(model),
                processing.spatial_dims(model)) == (align, channels, dims), type(model).__name__

    class Pooling(torch.nn.Module):  # a network of one's own, down-sampling by 16
        def forward(self, x, sigma=None):
            return x

    assert processing.default_align(eq(Pooling())) == 1
    processing.ALIGNMENTS[Pooling] = lambda m: 16
    try:
        assert processing.default_align(eq(Pooling())) == 16
    finally:
        del processing.ALIGNMENTS[Pooling]
