import pytest
import torch

from deepinv.models import DnCNN, DRUNet

from daskrecon.models import (BUNDLED_DENOISER_3D, BUNDLED_DRUNET, FlipRotateAverage, GreyThroughColour, bundled_denoiser,
                              bundled_drunet, load_network, load_state_dict, network_from_state_dict)


def test_bundled_denoiser_denoises():
    torch.manual_seed(0)
    model = bundled_denoiser()
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 96, 96), 5, stride=1, padding=2)  # a smooth image
    y = x + 0.1 * torch.randn_like(x)
    with torch.no_grad():
        assert torch.mean((model(y) - x) ** 2) < 0.5 * torch.mean((y - x) ** 2)
    assert sum(p.numel() for p in model.parameters()) * 4 < 2 * 2**20  # <= 2 MB of weights


def test_bundled_drunet_beats_the_dncnn_on_a_held_out_image_and_tiles_closely():
    import dask.array as da

    import daskrecon as dr
    from daskrecon.demo import demo_image
    from daskrecon.models import bundled_drunet

    model = bundled_drunet()
    assert sum(p.numel() for p in model.parameters()) * 2 < 10 * 2**20  # float16 file under 10 MB
    x = demo_image(128)  # the astronaut: held out of the training set
    y = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(y, 0.05)
        mse = float(torch.mean((whole.clamp(0, 1) - x) ** 2))
        mse_dncnn = float(torch.mean((bundled_denoiser()(y).clamp(0, 1) - x) ** 2))
    noisy = float(torch.mean((y - x) ** 2))
    # The astronaut at 128² is dense in detail: measured +3.9 dB over the noisy image, the DnCNN +0.5 dB
    assert mse < noisy / 10 ** 0.3  # > 3 dB better than the noisy image
    assert mse < mse_dncnn / 10 ** 0.2  # > 2 dB better than the bundled DnCNN
    # Not exact under tiling (a U-Net: its receptive field spans the image); the demo's overlap keeps it close.
    with dr.DistributedContext(n_workers=1, processes=True, dashboard_address="127.0.0.1:0", torch_threads=1) as ctx:
        d = dr.distribute(model, ctx, patch_size=64, overlap=32)
        with ctx.client.as_current():
            tiled = torch.from_numpy(d(da.from_array(y.numpy(), chunks=(1, 3, 64, 64)), 0.05).compute())
    assert 0 < float((tiled - whole).abs().max()) < 1e-2
    assert abs(float(torch.mean((tiled.clamp(0, 1) - x) ** 2)) / mse - 1) < 0.01


def test_bundled_3d_denoiser_denoises_held_out_volumes_and_tiles_exactly():
    import dask.array as da

    import daskrecon as dr
    from daskrecon.demo import demo_volume
    from daskrecon.models import bundled_denoiser_3d

    model = bundled_denoiser_3d()
    x = torch.from_numpy(demo_volume((40, 40, 40), chunks=40, seed=12345).compute(scheduler="sync"))  # never trained on
    y = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(y)
    assert torch.mean((whole - x) ** 2) < 0.25 * torch.mean((y - x) ** 2)  # > 6 dB better
    # .compute() must run on this cluster: without as_current() dask takes the process's latest client,
    # in the full suite another test's cluster, where the model was never sent ("has not reached this worker")
    with dr.DistributedContext(n_workers=1, processes=True, dashboard_address="127.0.0.1:0", torch_threads=1) as ctx:
        d = dr.distribute(model, ctx, patch_size=12, overlap=4)  # kept: its lazy arrays need it alive
        with ctx.client.as_current():
            tiled = d(da.from_array(y.numpy(), chunks=(1, 1, 20, 20, 20))).compute()
    assert float((torch.from_numpy(tiled) - whole).abs().max()) <= 1e-5  # receptive radius 4: exact


def test_weight_files_are_loaded_as_state_dicts_only(tmp_path):
    good = tmp_path / "w.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}}, good)
    assert torch.equal(load_state_dict(good)["a"], torch.ones(2))
    evil = tmp_path / "evil.pth"
    torch.save(torch.nn.Linear(2, 2), evil)  # a pickled module: refused by weights_only
    with pytest.raises(ValueError, match="not a weights-only torch state dict"):
        load_state_dict(evil)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        torch.save([1, 2], tmp_path / "list.pth")
        load_state_dict(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "missing.pth")


@pytest.mark.parametrize("make", [
    lambda: DRUNet(in_channels=1, out_channels=1, nc=(8, 16, 24, 32), nb=1, pretrained=None),  # deepinv's grey layout
    lambda: DRUNet(**BUNDLED_DRUNET, pretrained=None),
    lambda: DnCNN(in_channels=2, out_channels=1, depth=4, nf=8, bias=False, pretrained=None),
    lambda: DnCNN(**BUNDLED_DENOISER_3D, pretrained=None),
])
def test_a_network_is_rebuilt_from_its_weights_alone(tmp_path, make):
    torch.manual_seed(0)
    model = make().eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = load_network(tmp_path / "w.pth")
    assert type(loaded) is type(model) and not loaded.training
    dim = next(model.parameters()).ndim - 2
    channels = next(iter(model.state_dict().values())).shape[1] - (1 if isinstance(model, DRUNet) else 0)
    x = torch.rand(1, channels, *([16] * dim))
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.1), model(x, 0.1))
        torch.save({"state_dict": torch.nn.DataParallel(model).state_dict()}, tmp_path / "ddp.pth")  # "module." names
        assert torch.equal(load_network(tmp_path / "ddp.pth")(x, 0.1), model(x, 0.1))


def test_weights_of_another_network_are_refused_with_what_they_are(tmp_path):
    drunet = DRUNet(in_channels=1, out_channels=1, nc=(8, 16, 24, 32), nb=1, pretrained=None).state_dict()
    with pytest.raises(ValueError, match="architecture 'dncnn' was asked, but these are drunet weights"):
        network_from_state_dict(drunet, "dncnn")
    with pytest.raises(ValueError, match="architecture must be one of"):
        network_from_state_dict(drunet, "unet")
    with pytest.raises(ValueError, match=r"not those of a deepinv dncnn or drunet \(their first names: weight, bias"):
        network_from_state_dict(torch.nn.Linear(2, 2).state_dict())
    broken = dict(drunet)
    broken["m_tail.weight"] = torch.zeros(1, 9, 3, 3)  # a tail that does not fit the widths above it
    with pytest.raises(ValueError, match=r"do not load into DRUNet\("):
        network_from_state_dict(broken)


def test_a_colour_denoiser_denoises_grey_images_through_its_three_channels():
    from skimage import data, util

    torch.manual_seed(0)
    model = bundled_drunet()
    x = torch.from_numpy(util.img_as_float32(data.camera()))[None, None]
    y = x + 0.1 * torch.randn_like(x)
    grey, told_sigma = GreyThroughColour(model), GreyThroughColour(model, sigma_scale=1.0)
    with torch.no_grad():
        out = grey(y, 0.1)
        assert torch.equal(out, model(y.repeat(1, 3, 1, 1), 0.1 * 3 ** 0.5).mean(1, keepdim=True))
        assert torch.equal(grey(y, sigma=0.1), out)
        plain = told_sigma(y, 0.1)

    def psnr(a):
        return float(-10 * torch.log10(((a - x) ** 2).mean()))

    # measured: 20.0 -> 28.9 dB (26.2 told σ itself: equal noise in the three channels is σ·√3 to the network)
    assert out.shape == x.shape and psnr(out) > 28.5 and psnr(out) > psnr(plain) + 2, (psnr(y), psnr(plain), psnr(out))
    with pytest.raises(ValueError, match="takes 1-channel signals"):
        grey(torch.rand(1, 3, 16, 16), 0.1)


def test_the_flip_rotate_average_is_deepinvs_in_fp32_exact_on_rectangles_and_stays_exact_in_bf16():
    """deepinv's ``EquivariantDenoiser(random=False)`` in fp32; equivariant under every flip and quarter turn, a
    rectangle too (deepinv crops and pads it); in bf16 autocast on a 320² tile the transforms stay exact, where
    resampling on a bf16 grid of coordinates (beyond 256 pixels) scrambled the image."""
    from deepinv.models import EquivariantDenoiser

    torch.manual_seed(0)
    net = DnCNN(3, 3, depth=3, nf=8, pretrained=None).eval()
    ours = FlipRotateAverage(net)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), EquivariantDenoiser(net, random=False)(x), atol=1e-6, rtol=1e-5)
        r = torch.rand(1, 3, 40, 56)
        out = ours(r)
        assert out.shape == r.shape
        torch.testing.assert_close(ours(r.flip(-2)), out.flip(-2), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours(torch.rot90(r, 1, (-2, -1))), torch.rot90(out, 1, (-2, -1)), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(out, net(r), atol=1e-4)  # it does average
        big = torch.rand(1, 3, 320, 320)
        ref = ours(big)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(big)
        assert low.dtype == torch.float32
        assert float((low - ref).norm() / ref.norm()) < 0.02  # daskrecon's default precision_tol
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) images"):
        ours(torch.rand(1, 3, 4, 8, 8))
