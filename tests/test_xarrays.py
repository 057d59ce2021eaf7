"""frontend.xarrays: DataArray in, DataArray out — dims, coordinates and attributes kept."""

import dask.array as da
import numpy as np
import pytest
import torch

import daskrecon as dr

from helpers import blurs, noisy_measurements, small_dncnn

xr = pytest.importorskip("xarray")  # the [xarray] extra; installed by the [test] extra, so CI runs these


def _labelled(a, name="y"):
    b, c, h, w = a.shape
    return xr.DataArray(a, dims=("t", "band", "y", "x"), name=name,
                        coords={"t": [0], "band": ["r", "g", "b"][:c], "y": np.arange(h) * 0.5, "x": np.arange(w) * 0.5},
                        attrs={"units": "counts", "pixel_size_um": 0.5})


def test_the_denoiser_keeps_dims_coords_and_attrs(ctx):
    dden = dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=6)
    x = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        ref = dden(x, 0.05)
        out = dden(_labelled(x.numpy()), 0.05)
        assert isinstance(out, xr.DataArray) and isinstance(out.data, np.ndarray)
        assert out.dims == ("t", "band", "y", "x") and out.attrs["units"] == "counts" and out.name == "y"
        assert list(out.band.values) == ["r", "g", "b"] and float(out.x[3]) == 1.5
        np.testing.assert_array_equal(out.values, ref.numpy())
        lazy = dden(_labelled(da.from_array(x.numpy(), chunks=(1, 3, 16, 40))), 0.05)
        assert isinstance(lazy.data, da.Array)  # dask-backed in: lazy out
        with ctx.client.as_current():
            np.testing.assert_allclose(lazy.values, ref.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"add the axes it lacks: x.expand_dims\('b'\) for \(c, y, x\)"):
        dden(_labelled(x.numpy())[0], 0.05)  # 3 dims: refused, naming the layout and the fix
    grey = xr.DataArray(x[0, 0].numpy(), dims=("y", "x"))
    with pytest.raises(ValueError, match=r"add the batch and channel axes: x.expand_dims\(\('b', 'c'\)\)"):
        dden(grey, 0.05)
    with pytest.raises(ValueError, match=r"transpose or reshape it"):
        dden(xr.DataArray(x[..., None, None].numpy(), dims=("t", "band", "y", "x", "p", "q")), 0.05)


def test_reconstruct_gives_a_dataarray_like_its_input(ctx):
    ops = blurs(2)
    x = torch.rand(1, 3, 32, 32)
    y = noisy_measurements(ops, x)
    dphys = dr.distribute(ops, ctx)
    dden = dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=6)
    kw = dict(n_iter=2, step_size=0.5, progress=False)
    ref = dr.reconstruct(dphys, y, dden, **kw)
    out = dr.reconstruct(dphys, [_labelled(v.numpy()) for v in y], dden, **kw)
    assert isinstance(out, xr.DataArray) and out.dims == ("t", "band", "y", "x") and out.attrs["pixel_size_um"] == 0.5
    np.testing.assert_array_equal(out.values, ref.numpy())
    with ctx.client.as_current():
        lazy = dr.reconstruct(dphys, [_labelled(da.from_array(v.numpy(), chunks=16)) for v in y], dden,
                              x0=_labelled(y[0].numpy(), name="start"), **kw)
        assert isinstance(lazy.data, da.Array) and lazy.name == "start"  # x0's template wins
        np.testing.assert_allclose(lazy.values, dr.reconstruct(dphys, y, dden, x0=y[0].clone(), **kw).numpy(),
                                   atol=1e-5)


def test_coordinates_of_a_resized_axis_are_dropped(ctx):
    import deepinv as dinv

    ops = [dinv.physics.Downsampling(img_size=(3, 32, 32), filter="gaussian", factor=2, padding="circular")]
    x = torch.rand(1, 3, 32, 32)
    y = noisy_measurements(ops, x)
    out = dr.reconstruct(dr.distribute(ops, ctx), [_labelled(y[0].numpy())],
                         dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=6), n_iter=1, step_size=0.5,
                         progress=False)
    assert out.shape == (1, 3, 32, 32) and out.dims == ("t", "band", "y", "x")
    assert "band" in out.coords and "x" not in out.coords and "y" not in out.coords  # 16 labels for 32 pixels
