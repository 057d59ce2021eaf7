"""OME-Zarr in and out (daskrecon.frontend.omezarr), read back the way napari's reader does."""

import hashlib

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

import daskrecon as dr
from daskrecon.errors import OMEZarrError, OutputExistsError

from helpers import VOLUME_CONFIG, blurs, noisy_measurements, small_dncnn

# the [ome] extra; the [test] extra installs it (and the validator), so CI runs these
ome_zarr = pytest.importorskip("ome_zarr")
ome_zarr_models = pytest.importorskip("ome_zarr_models")


def _napari_read(path):
    """What napari's OME-Zarr reader does: ome-zarr's Reader, the image node's levels and metadata."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = list(Reader(parse_url(str(path)))())[0]
    return node.data, node.metadata


def _halve(a, axes):
    """The 2×…×2 block mean over ``axes`` (what a local-mean pyramid level holds)."""
    shape, mean_over = [], []
    for i, n in enumerate(a.shape):
        if i in axes:
            shape += [n // 2, 2]
            mean_over.append(len(shape) - 1)
        else:
            shape.append(n)
    trimmed = a[tuple(slice(0, n // 2 * 2) if i in axes else slice(None) for i, n in enumerate(a.shape))]
    return trimmed.astype(np.float64).reshape(shape).mean(axis=tuple(mean_over)).astype(np.float32)


def _tree_hash(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_a_written_pyramid_validates_and_each_level_is_the_block_mean_of_the_last(ctx, tmp_path, version):
    rng = np.random.default_rng(0)
    vol = rng.random((1, 2, 16, 64, 48), dtype=np.float32)
    x = da.from_array(vol, chunks=(1, 1, 8, 32, 16))
    path = dr.write_ome_zarr(x, str(tmp_path / "v.ome.zarr"), voxel_size=(2.0, 0.5, 0.25), units="micrometer",
                             version=version, levels=3, ctx=ctx)
    group = zarr.open_group(path, mode="r")
    assert group.metadata.zarr_format == (2 if version == "0.4" else 3)
    model = ome_zarr_models.open_ome_zarr(group)  # validates the metadata against the NGFF schema
    assert type(model).__module__.startswith(f"ome_zarr_models.v0{version[-1]}")
    levels, meta = _napari_read(path)
    assert [a["name"] for a in meta["axes"]] == ["c", "z", "y", "x"]
    assert [a.get("unit") for a in meta["axes"]] == [None, "micrometer", "micrometer", "micrometer"]
    assert len(levels) == 3
    expected = vol[0]
    for k, level in enumerate(levels):
        if k:
            expected = _halve(expected, axes=(1, 2, 3))
        got = np.asarray(level)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        scale = next(t for t in meta["coordinateTransformations"][k] if t["type"] == "scale")["scale"]
        assert scale == [1.0, 2.0 * 2 ** k, 0.5 * 2 ** k, 0.25 * 2 ** k]
    # and our reader gives deepinv's layout back, with the voxel size of the level asked for
    img = dr.open_ome_zarr(path)
    assert img.data.shape == vol.shape and img.axes == ("c", "z", "y", "x") and img.levels == 3
    np.testing.assert_array_equal(img.data.compute(), vol)
    coarse = dr.open_ome_zarr(path, level=-1)
    assert coarse.level == 2 and coarse.data.shape == (1, 2, 4, 16, 12)
    assert coarse.voxel_size == {"c": 1.0, "z": 8.0, "y": 2.0, "x": 1.0}
    assert coarse.units == {"z": "micrometer", "y": "micrometer", "x": "micrometer"}


@pytest.mark.parametrize(("axes", "shape", "deepinv_shape"), [
    (["y", "x"], (20, 24), (1, 1, 20, 24)),
    (["c", "y", "x"], (3, 20, 24), (1, 3, 20, 24)),
    (["z", "y", "x"], (6, 20, 24), (1, 1, 6, 20, 24)),
    (["t", "c", "z", "y", "x"], (2, 3, 6, 20, 24), (2, 3, 6, 20, 24)),
])
def test_axes_map_to_deepinvs_layout(tmp_path, axes, shape, deepinv_shape):
    from ome_zarr.writer import write_image

    a = np.random.default_rng(1).random(shape, dtype=np.float32)
    write_image(a, str(tmp_path / "a.ome.zarr"), axes=axes, scale_factors=[], fmt=_fmt("0.4"))
    img = dr.open_ome_zarr(str(tmp_path / "a.ome.zarr"))
    assert img.data.shape == deepinv_shape and tuple(img.axes) == tuple(axes)
    np.testing.assert_array_equal(img.data.compute().reshape(shape), a)
    np.testing.assert_array_equal(img.to_file_layout(img.data).compute(), a)


def _fmt(version):
    from ome_zarr.format import format_from_version

    return format_from_version(version)


def test_what_is_not_an_ome_zarr_image_is_refused_by_name(tmp_path):
    from ome_zarr.writer import write_image

    with pytest.raises(OMEZarrError, match="no OME-Zarr image at"):
        dr.open_ome_zarr(str(tmp_path / "nothing.ome.zarr"))
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 4), dtype="f4")
    with pytest.raises(OMEZarrError, match="not an OME-Zarr image"):
        dr.open_ome_zarr(str(tmp_path / "plain.zarr"))
    write_image(np.zeros((8, 8), np.float32), str(tmp_path / "a.ome.zarr"), axes=["y", "x"], scale_factors=[2],
                fmt=_fmt("0.4"))
    with pytest.raises(OMEZarrError, match=r"has 2 levels \(0 … 1\); level 2 does not exist"):
        dr.open_ome_zarr(str(tmp_path / "a.ome.zarr"), level=2)
    group = zarr.open_group(str(tmp_path / "a.ome.zarr"), mode="r+")
    ms = group.attrs["multiscales"]
    ms[0]["axes"] = [{"name": "angle", "type": "angle"}, {"name": "x", "type": "space"}]
    group.attrs["multiscales"] = ms
    with pytest.raises(OMEZarrError, match="axis 'angle' .* has no place in deepinv's"):
        dr.open_ome_zarr(str(tmp_path / "a.ome.zarr"))


def test_an_existing_path_is_refused_and_left_as_it_was(tmp_path):
    target = tmp_path / "mine.ome.zarr"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    before = _tree_hash(tmp_path)
    x = np.ones((1, 1, 16, 16), np.float32)
    with pytest.raises(OutputExistsError, match="exists: pass overwrite=True"):
        dr.write_ome_zarr(x, str(target))
    assert _tree_hash(tmp_path) == before
    dr.write_ome_zarr(x, str(target), overwrite=True, levels=2)
    assert not (target / "notes.txt").exists()
    np.testing.assert_array_equal(dr.open_ome_zarr(str(target)).data.compute(), x)


def test_a_write_that_fails_leaves_no_half_image(ctx, tmp_path):
    def boom(block):
        raise RuntimeError("a chunk that cannot be computed")

    x = da.zeros((1, 1, 32, 32), chunks=(1, 1, 16, 16), dtype=np.float32).map_blocks(boom, dtype=np.float32)
    with pytest.raises(Exception, match="a chunk that cannot be computed"):
        dr.write_ome_zarr(x, str(tmp_path / "r.ome.zarr"), ctx=ctx, levels=2)
    assert not (tmp_path / "r.ome.zarr").exists()


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    x = np.zeros((1, 1, 16, 16), np.float32)
    for kw, message in [(dict(version="0.3"), "NGFF 0.4 or 0.5"), (dict(method="cubic"), "local_mean"),
                        (dict(levels=9), "halves to nothing"), (dict(voxel_size=(1.0, 2.0, 3.0)), "3 sizes for 2"),
                        (dict(voxel_size=-1.0), "positive")]:
        with pytest.raises(ValueError, match=message):
            dr.write_ome_zarr(x, str(tmp_path / "r.ome.zarr"), **kw)
        assert not (tmp_path / "r.ome.zarr").exists()


def test_pyramid_factors_stop_at_a_viewer_sized_top_level():
    from daskrecon.frontend.omezarr import pyramid_factors

    assert pyramid_factors((256, 256)) == []
    assert pyramid_factors((2048, 1024)) == [2, 4, 8]
    assert pyramid_factors((64, 4096, 4096)) == [2, 4, 8]  # z stops the halving at 8 voxels
    assert pyramid_factors((100, 100), levels=3) == [2, 4]


def test_an_out_of_core_reconstruction_from_ome_zarr_writes_a_pyramid_like_its_input(ctx, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    ops = blurs(2)
    y = noisy_measurements(ops, x)
    for i, yi in enumerate(y):
        dr.write_ome_zarr(yi.numpy(), str(tmp_path / f"y{i}.ome.zarr"), voxel_size=0.325, units="micrometer",
                          levels=1)
    images = [dr.open_ome_zarr(str(tmp_path / f"y{i}.ome.zarr")) for i in range(2)]
    d = dr.distribute(ops, ctx)
    den = dr.distribute(small_dncnn(3), ctx, patch_size=32, overlap=8)
    kw = dict(n_iter=3, step_size=0.5, progress=False, chunks=(32, 32))
    with ctx.client.as_current():
        streamed = dr.reconstruct(d, [img.data for img in images], den, storage="zarr",
                                  checkpoint=str(tmp_path / "ckpt"), **kw)
        out = dr.write_ome_zarr(streamed, str(tmp_path / "x.ome.zarr"), like=images[0], levels=2, ctx=ctx)
    in_memory = dr.reconstruct(d, y, den, **kw)
    levels, meta = _napari_read(out)
    np.testing.assert_array_equal(np.asarray(levels[0])[None], in_memory.numpy())
    np.testing.assert_allclose(np.asarray(levels[1]), _halve(in_memory.numpy()[0], axes=(1, 2)), rtol=1e-6, atol=1e-7)
    back = dr.open_ome_zarr(out)
    assert back.axes == ("c", "y", "x") and back.voxel_size == {"c": 1.0, "y": 0.325, "x": 0.325}
    assert back.units == {"y": "micrometer", "x": "micrometer"}


OME_CONFIG = VOLUME_CONFIG.replace('["y.zarr"]', '["y.ome.zarr"]').replace('"x.zarr"', '"x.ome.zarr"').replace(
    'path = "result.zarr"', 'path = "result.ome.zarr"\nngff = "0.5"\nlevels = 2')


def test_the_cli_reads_ome_zarr_and_writes_an_ome_zarr_pyramid(tmp_path):
    from deepinv.physics import Blur
    from deepinv.physics.functional import gaussian_blur
    from typer.testing import CliRunner

    from daskrecon.cli import app
    from daskrecon.demo import demo_volume

    x = demo_volume((32, 32, 32), chunks=16, seed=5).compute(scheduler="sync")
    blur = Blur(filter=gaussian_blur(psf_size=None, sigma=(1.0, 1.0, 1.0)), padding="reflect")
    y = blur.A(torch.from_numpy(x)).numpy() + 0.02 * np.random.default_rng(0).standard_normal(x.shape, np.float32)
    for name, a in (("x", x), ("y", y)):
        dr.write_ome_zarr(a, str(tmp_path / f"{name}.ome.zarr"), voxel_size=(1.0, 0.5, 0.5), units="micrometer",
                          levels=1)
    (tmp_path / "run.toml").write_text(OME_CONFIG)
    result = CliRunner().invoke(app, ["reconstruct", str(tmp_path / "run.toml")])
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(tmp_path / "result.ome.zarr"), mode="r")
    ome_zarr_models.open_ome_zarr(group)
    assert group.metadata.zarr_format == 3
    out = dr.open_ome_zarr(str(tmp_path / "result.ome.zarr"))
    assert out.levels == 2 and out.voxel_size == {"c": 1.0, "z": 1.0, "y": 0.5, "x": 0.5}
    res = out.data.compute()
    assert res.shape == x.shape and np.mean((res - x) ** 2) < np.mean((y - x) ** 2)  # deconvolved, not copied
    # level 0 is the plain-Zarr output of the same run, bit for bit
    (tmp_path / "plain.toml").write_text(OME_CONFIG.replace('path = "result.ome.zarr"\nngff = "0.5"\nlevels = 2',
                                                            'path = "plain.zarr"'))
    plain = CliRunner().invoke(app, ["reconstruct", str(tmp_path / "plain.toml")])
    assert plain.exit_code == 0, plain.output
    np.testing.assert_array_equal(res, zarr.open_array(str(tmp_path / "plain.zarr"), mode="r")[...])
    # the same run again does not replace it: the result goes beside it, and the run says so
    again = CliRunner().invoke(app, ["reconstruct", str(tmp_path / "run.toml")])
    assert again.exit_code != 0 and "exists" in again.output
    assert (tmp_path / "result.ome.zarr").is_dir()


def test_ome_keys_without_an_ome_output_are_refused(tmp_path):
    from daskrecon.config import ConfigError, load_config

    bad = tmp_path / "bad.toml"
    bad.write_text(OME_CONFIG.replace('path = "result.ome.zarr"', 'path = "result.zarr"'))
    with pytest.raises(ConfigError, match=r"\['levels', 'ngff'\] apply to an OME-Zarr output"):
        load_config(bad)
    bad.write_text(OME_CONFIG.replace('ngff = "0.5"', 'ngff = "0.6"'))
    with pytest.raises(ConfigError, match="output.ngff must be one of"):
        load_config(bad)


def test_an_image_is_never_written_over_the_arrays_it_is_read_from(tmp_path):
    """overwrite=True replaces a path; when the signal is read from it, that would delete the data first."""
    from daskrecon.errors import OverwriteSourceError

    target = str(tmp_path / "img.ome.zarr")
    x = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    dr.write_ome_zarr(x, target, levels=2)
    before = _tree_hash(tmp_path)
    img = dr.open_ome_zarr(target)
    for data in (img.data, img.data * 2, img.data[..., :16, :16]):  # read from it, or computed from what is
        with pytest.raises(OverwriteSourceError, match=r"img.ome.zarr/s?0' that the array to write is read from"):
            dr.write_ome_zarr(data, target, overwrite=True, levels=2)
    assert _tree_hash(tmp_path) == before
    np.testing.assert_array_equal(dr.open_ome_zarr(target).data.compute(), x)
    # elsewhere it writes; and over an unrelated image, overwrite replaces as documented
    other = str(tmp_path / "other.ome.zarr")
    dr.write_ome_zarr(img.data * 2, other, levels=2)
    dr.write_ome_zarr(img.data, other, overwrite=True, levels=2)
    np.testing.assert_array_equal(dr.open_ome_zarr(other).data.compute(), x)


def test_a_plain_zarr_result_is_never_written_over_its_source(ctx, tmp_path):
    from daskrecon.batch.files import write_image
    from daskrecon.errors import OverwriteSourceError
    from daskrecon.runtime.storage import zarr_sources

    plain = str(tmp_path / "x.zarr")
    zarr.save_array(plain, np.arange(256, dtype=np.float32).reshape(1, 1, 16, 16))
    before = _tree_hash(tmp_path)
    lazy = da.from_zarr(plain) * 2
    assert zarr_sources(lazy) == [str((tmp_path / "x.zarr").resolve())]
    with pytest.raises(OverwriteSourceError, match="x.zarr"):
        write_image(plain, lazy, overwrite=True, ctx=ctx)
    assert _tree_hash(tmp_path) == before
    assert write_image(str(tmp_path / "y.zarr"), lazy, overwrite=True, ctx=ctx).endswith("y.zarr")
