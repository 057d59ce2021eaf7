"""daskrecon.config (the format, checked before any work) and daskrecon.batch (files, build, check, run): the batch command end to end."""

import torch
import numpy as np
import pytest
from skimage import io, util
from typer.testing import CliRunner

from daskrecon.cli import app
from daskrecon.demo import demo_problem
from daskrecon.tasks.precision import supported

from helpers import VOLUME_CONFIG, snapshot

CONFIG = """
[input]
measurements = ["y0.npy", "y1.npy", "y2.png"]
ground_truth = "truth.npy"

[[operators]]
type = "blur"
sigma = [1.0, 1.0]
[[operators]]
type = "blur"
sigma = [2.0, 2.0]
[[operators]]
type = "blur"
sigma = [1.5, 3.0]
angle = 30.0

[denoiser]
patch_size = 32
overlap = 8

[solver]
algorithm = "red"
iterations = 4
step_size = 0.3
red_weight = 0.3

[output]
path = "{out}"

[cluster]
kind = "local"
n_workers = 1
"""


@pytest.fixture
def inputs(tmp_path):
    x, ops, y = demo_problem(48)
    for i in range(2):
        np.save(tmp_path / f"y{i}.npy", y[i].numpy())
    io.imsave(str(tmp_path / "y2.png"), util.img_as_ubyte(np.clip(y[2][0].permute(1, 2, 0).numpy(), 0, 1)),
              check_contrast=False)
    np.save(tmp_path / "truth.npy", x.numpy())
    return tmp_path


LOCAL = 'kind = "local"\nn_workers = 1'
_SHARED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def shared_cluster():
    """One 1-worker cluster for the module's runs: each `daskrecon reconstruct` of a config with
    ``[cluster] kind = "local"`` would start one of its own (~4 s, some 30 times); :func:`run` sends those
    to this one with ``--scheduler``. The cluster the command starts itself is run by ``own_cluster=True``
    and by the configs whose ``[cluster]`` says something else."""
    import daskrecon as dr

    with dr.DistributedContext(n_workers=1, dashboard_address="127.0.0.1:0") as ctx:
        _SHARED["address"], _SHARED["dashboard"] = ctx.client.scheduler.address, ctx.dashboard_link
        yield
    _SHARED.clear()


def run(path, *extra, own_cluster=False):
    shared = [] if own_cluster or LOCAL not in path.read_text() else ["--scheduler", _SHARED["address"]]
    return CliRunner().invoke(app, ["reconstruct", str(path), *extra, *shared])


def test_reconstruct_from_a_config(inputs):
    cfg = inputs / "run.toml"
    cfg.write_text(CONFIG.format(out="result.zarr"))
    result = run(cfg, own_cluster=True)  # the local cluster the command starts and closes
    assert result.exit_code == 0, result.output
    import zarr

    assert zarr.open_array(str(inputs / "result.zarr")).shape == (1, 3, 48, 48)
    before = snapshot(inputs)
    again = run(cfg)  # the output exists now
    assert again.exit_code == 2 and "output.overwrite = true" in again.output
    assert snapshot(inputs) == before  # refused: the existing output (and every input) untouched
    png = inputs / "png.toml"
    png.write_text(CONFIG.format(out="result.png"))
    assert run(png).exit_code == 0 and io.imread(str(inputs / "result.png")).shape == (48, 48, 3)


@pytest.mark.parametrize("solver", ['algorithm = "admm"\ncg_max_iter = 20\ncg_tol = 1e-4',
                                    'algorithm = "os-pnp"\nn_subsets = 3\nseed = 5',
                                    'algorithm = "sirt"', 'algorithm = "osem"\nn_subsets = 3',
                                    'algorithm = "hqs"\nsigma_denoiser = [0.1, 0.08, 0.06, 0.05]'])
def test_configs_take_the_other_algorithms(inputs, solver):
    cfg = inputs / "alg.toml"
    text = CONFIG.format(out="result.npy").replace('algorithm = "red"', solver)
    if "sirt" in solver or "osem" in solver:  # no prior: without a [denoiser] section (sirt refuses one)
        text = text.replace("[denoiser]\npatch_size = 32\noverlap = 8\n", "").replace("step_size = 0.3\n", "")
    cfg.write_text(text)
    result = run(cfg)
    assert result.exit_code == 0, result.output
    assert f"dashboard {_SHARED['dashboard']}" in result.output  # --scheduler: on the running cluster
    out = np.load(inputs / "result.npy")
    assert out.shape == (1, 3, 48, 48) and np.isfinite(out).all() and float(np.abs(out).max()) > 0.1


@pytest.mark.parametrize("solver", ['algorithm = "red"', 'algorithm = "admm"\nsigma_denoiser = [0.1, 0.08, 0.06, 0.05]'])
def test_check_projects_the_run(inputs, solver):
    cfg = inputs / "run.toml"
    cfg.write_text(CONFIG.format(out="result.zarr").replace('algorithm = "red"', solver))
    result = run(cfg, "--check")
    assert result.exit_code == 0, result.output
    assert "one gradient (3 operator tasks)" in result.output and "projected:" in result.output
    assert not (inputs / "result.zarr").exists()
    if "red" in solver:  # after a run, its output in place: --check writes nothing, so it is not refused
        (inputs / "result.zarr").mkdir()
        before = snapshot(inputs)
        again = run(cfg, "--check")
        assert again.exit_code == 0 and "projected:" in again.output, again.output
        assert snapshot(inputs) == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.replace('[solver]', '[solvers]'), "unknown sections ['solvers']"),
        (lambda c: c.replace('type = "blur"\nsigma = [2.0, 2.0]', 'type = "wiener"'), "operators[1].type must be one of"),
        (lambda c: c.replace('iterations = 4', 'iterations = "four"'), "solver.iterations must be int"),
        (lambda c: c.replace('"y0.npy", ', ''), "3 [[operators]] for 2 input.measurements"),
        (lambda c: c.replace('"y0.npy"', '"missing.npy"'), "input"),
        (lambda c: c.replace('kind = "local"', 'kind = "k8s"'), "cluster.kind must be"),
        (lambda c: c + "\noops =\n", "not valid TOML"),
        (lambda c: c.replace('"y0.npy"', '"missing.zarr"'), "missing.zarr"),
        (lambda c: c.replace('"y0.npy"', '"broken.zarr"'), "broken.zarr"),
        (lambda c: c.replace("overlap = 8", "overlap = 8\nstride = 4"), "unknown keys ['stride'] in denoiser"),
        (lambda c: c.replace('algorithm = "red"', 'algorithm = "lbfgs"'), "solver.algorithm must be one of"),
        (lambda c: c.replace('algorithm = "red"', 'algorithm = "os-pnp"'), "needs solver.n_subsets"),
        (lambda c: c.replace('algorithm = "red"', 'algorithm = "svrg"\nn_subsets = 4'),
         "solver.n_subsets must be between 1 and the number of operators (3)"),
        (lambda c: c.replace('algorithm = "red"', 'algorithm = "pnp"\nn_subsets = 2'),
         "solver.n_subsets applies to algorithm 'os-pnp' or 'svrg' or 'osem'"),
        (lambda c: c.replace("step_size = 0.3", "step_size = [0.3, 0.2]"),
         "step_size has 2 values (one per iteration) for n_iter=4"),
        (lambda c: c.replace("step_size = 0.3", 'step_size = [0.3, "a", 0.2, 0.1]'), "step_size[1] must be a number"),
    ],
)
def test_bad_configs_name_the_key(inputs, edit, message):
    (inputs / "broken.zarr").mkdir()
    (inputs / "broken.zarr" / "zarr.json").write_text("{not json")  # an unreadable store
    import zarr

    zarr.save_array(str(inputs / "result.zarr"), np.ones((1, 3, 48, 48), np.float32))  # an earlier result
    cfg = inputs / "bad.toml"
    cfg.write_text(edit(CONFIG.format(out="result.zarr").replace("[output]", "[output]\noverwrite = true")))
    before = snapshot(inputs)
    result = run(cfg)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert snapshot(inputs) == before  # even with overwrite = true, a refused run changes no file




def test_a_volume_config_streams_from_zarr(tmp_path):
    import dask.array as da
    import zarr
    from deepinv.physics import Blur
    from deepinv.physics.functional import gaussian_blur

    from daskrecon.demo import demo_volume

    x = demo_volume((32, 32, 32), chunks=16, seed=5).compute(scheduler="sync")
    blur = Blur(filter=gaussian_blur(psf_size=None, sigma=(1.0, 1.0, 1.0)), padding="reflect")
    y = blur.A(torch.from_numpy(x)).numpy() + 0.02 * np.random.default_rng(0).standard_normal(x.shape, np.float32)
    da.from_array(y, chunks=(1, 1, 16, 16, 16)).to_zarr(str(tmp_path / "y.zarr"))
    zarr.save_array(str(tmp_path / "x.zarr"), x)
    cfg = tmp_path / "vol.toml"
    cfg.write_text(VOLUME_CONFIG)
    check = run(cfg, "--check")
    assert check.exit_code == 0, check.output
    assert "one gradient (1 operator tasks)" in check.output
    result = run(cfg)
    assert result.exit_code == 0, result.output
    out = zarr.open_array(str(tmp_path / "result.zarr"))[...]
    assert out.shape == (1, 1, 32, 32, 32) and np.isfinite(out).all()
    assert np.mean((out - x) ** 2) < np.mean((y - x) ** 2)  # deconvolved, not just copied
    bad = tmp_path / "bad.toml"
    bad.write_text(VOLUME_CONFIG.replace("sigma = [1.0, 1.0, 1.0]", "sigma = [1.0, 1.0]").replace(
        'path = "result.zarr"', 'path = "other.zarr"'))
    refused = run(bad)
    assert refused.exit_code == 2 and "operators[0].sigma needs 3 values for a 3-D signal" in refused.output


def test_check_on_inputs_too_large_to_read_whole_times_a_crop(tmp_path, monkeypatch):
    """Past CHECK_MAX_BYTES, --check runs the configured iteration out of core on a crop of whole
    chunks (two per worker) and projects it; nothing but the crop is read, nothing is written."""
    import dask.array as da
    import zarr
    from deepinv.physics import Blur
    from deepinv.physics.functional import gaussian_blur

    from daskrecon.batch import run as batch_run
    from daskrecon.demo import demo_volume

    x = demo_volume((64, 64, 64), chunks=16, seed=5).compute(scheduler="sync")
    blur = Blur(filter=gaussian_blur(psf_size=None, sigma=(1.0, 1.0, 1.0)), padding="reflect")
    y = blur.A(torch.from_numpy(x)).numpy()
    da.from_array(y, chunks=(1, 1, 16, 16, 16)).to_zarr(str(tmp_path / "y.zarr"))
    zarr.save_array(str(tmp_path / "x.zarr"), x)
    cfg = tmp_path / "vol.toml"
    cfg.write_text(VOLUME_CONFIG)
    monkeypatch.setattr(batch_run, "CHECK_MAX_BYTES", 1024)
    read = []
    before = snapshot(tmp_path)
    report = batch_run.run_config(cfg, check=True, echo=read.append)
    assert report.crop is not None and report.seconds_per_operator_task is None
    # the run's chunks (32×32×64 here), one per axis, grown until the 1 worker has two
    assert report.crop == (32, 64, 64) and report.seconds_per_iteration > 0
    assert report.projected_seconds == pytest.approx(report.seconds_per_iteration * 4)
    assert any("32×64×64 crop of 64×64×64" in line for line in read), read
    assert snapshot(tmp_path) == before and not (tmp_path / "result.zarr").exists()


def test_crop_shape_gives_every_worker_two_chunks():
    from daskrecon.batch.check import crop_shape

    assert crop_shape((1, 1, 512, 512), (128, 128), 2) == (256, 256)
    assert crop_shape((1, 1, 512, 512), (128, 128), 1) == (128, 256)
    assert crop_shape((1, 1, 64, 512, 512), (64, 128, 128), 4) == (64, 384, 384)  # depth is whole: 1 chunk
    assert crop_shape((1, 1, 100, 100), (64, 64), 8) == (100, 100)  # the whole signal is all there is


@pytest.mark.parametrize("path, message", [
    ("result", "output.path 'result' must end in one of .zarr, .npy, .png"),
    ("result.jpg", "must end in one of"),
])
def test_an_output_without_a_known_format_is_refused_before_anything_runs(inputs, path, message):
    cfg = inputs / "bad.toml"
    cfg.write_text(CONFIG.format(out=path))
    before = snapshot(inputs)
    result = run(cfg)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "cluster:" not in result.output  # refused by load_config: no cluster was started
    assert snapshot(inputs) == before


def test_a_volume_to_a_png_is_refused_before_anything_runs(tmp_path):
    import zarr

    zarr.save_array(str(tmp_path / "y.zarr"), np.zeros((1, 1, 8, 8, 8), np.float32))
    zarr.save_array(str(tmp_path / "x.zarr"), np.zeros((1, 1, 8, 8, 8), np.float32))
    cfg = tmp_path / "vol.toml"
    cfg.write_text(VOLUME_CONFIG.replace('path = "result.zarr"', 'path = "result.png"'))
    result = run(cfg)
    assert result.exit_code == 2 and "a .png file holds a 2-D image" in result.output and "volume (1, 1, 8, 8, 8)" \
        in result.output, result.output


def test_an_output_that_appears_during_the_run_is_kept(inputs, monkeypatch):
    import daskrecon

    original = daskrecon.reconstruct
    mine = np.full((2, 2), 7.0)

    def reconstruct_then_someone_writes_the_output(*args, **kwargs):
        out = original(*args, **kwargs)
        np.save(inputs / "result.npy", mine)  # e.g. another job, during a long run
        return out

    monkeypatch.setattr(daskrecon, "reconstruct", reconstruct_then_someone_writes_the_output)
    cfg = inputs / "run.toml"
    cfg.write_text(CONFIG.format(out="result.npy"))  # output.overwrite defaults to false
    result = run(cfg)
    assert result.exit_code == 2 and "appeared during the run" in result.output and "result-1.npy" in result.output
    assert np.array_equal(np.load(inputs / "result.npy"), mine)  # theirs, untouched
    out = np.load(inputs / "result-1.npy")  # the result is not lost
    assert out.shape == (1, 3, 48, 48) and np.isfinite(out).all()


def test_urls_pass_through_unchanged(inputs, tmp_path):
    from daskrecon.batch.files import resolve, write_image

    assert resolve(inputs, "s3://bucket/run") == "s3://bucket/run"
    assert resolve(inputs, "memory://scratch/a.npy") == "memory://scratch/a.npy"
    assert resolve(inputs, "ckpt") == str(inputs / "ckpt")
    # a whole run with file:// inputs, checkpoint and output
    text = CONFIG.format(out=f"file://{inputs}/url-result.npy")
    for name in ("y0.npy", "y1.npy", "y2.png", "truth.npy"):
        text = text.replace(f'"{name}"', f'"file://{inputs}/{name}"')
    text += f'\n[checkpoint]\npath = "file://{tmp_path}/url-ckpt"\n'
    cfg = tmp_path / "url.toml"
    cfg.write_text(text)
    result = run(cfg)
    assert result.exit_code == 0, result.output
    assert np.load(inputs / "url-result.npy").shape == (1, 3, 48, 48)
    assert (tmp_path / "url-ckpt" / "COMMIT.json").is_file()
    assert not (tmp_path / "file:").exists() and not (inputs / "file:").exists()
    # an fsspec memory:// output, written by the driver
    import fsspec

    assert write_image("memory://daskrecon-test/out.npy", np.ones((1, 1, 4, 4), np.float32), overwrite=False) == \
        "memory://daskrecon-test/out.npy"
    with fsspec.open("memory://daskrecon-test/out.npy", "rb") as f:
        assert np.load(f).shape == (1, 1, 4, 4)


def test_a_slurm_cluster_the_config_started_is_closed(inputs, tmp_path, monkeypatch):
    """dask-jobqueue's real SLURMCluster, with stand-ins for ``sbatch`` and ``scancel`` that run the job
    script here: the jobs it submits must be cancelled when the run ends."""
    import os
    import stat

    import sys

    bin_dir, log = tmp_path / "bin", tmp_path / "slurm.log"
    bin_dir.mkdir()
    scripts = {
        "sbatch": f"""#!/usr/bin/env bash
cp "$1" "{tmp_path}/job-$$.sh"
setsid bash "{tmp_path}/job-$$.sh" > "{tmp_path}/job-$$.out" 2>&1 &
echo "sbatch $!" >> "{log}"
echo "Submitted batch job $!"
""",
        "scancel": f"""#!/usr/bin/env bash
echo "scancel $*" >> "{log}"
for j in "$@"; do kill -TERM -- "-$j" 2>/dev/null; done
""",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = (f'kind = "slurm"\njobs = 1\ntimeout = 120.0\n[cluster.slurm]\ncores = 1\nmemory = "2GB"\n'
             f'processes = 1\npython = "{sys.executable}"\n'
             'scheduler_options = {host = "127.0.0.1", dashboard_address = "127.0.0.1:0"}\n')
    cfg = inputs / "slurm.toml"
    cfg.write_text(CONFIG.format(out="result.npy").replace('kind = "local"\nn_workers = 1', slurm))
    result = run(cfg)
    assert result.exit_code == 0, result.output
    lines = log.read_text().split()
    job = lines[lines.index("sbatch") + 1]
    assert ["scancel", job] == lines[lines.index("scancel"):lines.index("scancel") + 2], lines  # its job cancelled
    assert np.load(inputs / "result.npy").shape == (1, 3, 48, 48)


@pytest.mark.skipif("bf16" not in supported(torch.device("cpu")),
                    reason="this CPU has no bf16 units: bf16 is refused here")
def test_a_config_runs_its_denoiser_in_the_precision_it_names(inputs):
    import zarr

    cfg = inputs / "bf16.toml"
    cfg.write_text(CONFIG.format(out="bf16.zarr").replace("overlap = 8", 'overlap = 8\nprecision = "bf16"'))
    assert run(cfg).exit_code == 0
    ref = inputs / "fp32.toml"
    ref.write_text(CONFIG.format(out="fp32.zarr"))
    assert run(ref).exit_code == 0
    a, b = zarr.open_array(str(inputs / "bf16.zarr"))[...], zarr.open_array(str(inputs / "fp32.zarr"))[...]
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert 0 < rel < 5e-2, rel  # the bundled denoiser really ran in bf16, close to fp32


def test_a_config_takes_the_bundled_drunet_or_a_weight_file_of_any_size(inputs):
    """`bundled-drunet` is the demo's denoiser; a file's sizes are read from its weights (no architecture key)."""
    from daskrecon.models import bundled_drunet

    torch.save(bundled_drunet().state_dict(), inputs / "mine.pth")
    results = {}
    for name, weights in [("bundled", "bundled-drunet"), ("file", "mine.pth")]:
        cfg = inputs / f"{name}.toml"
        cfg.write_text(CONFIG.format(out=f"{name}.npy").replace("[denoiser]", f'[denoiser]\nweights = "{weights}"'))
        result = run(cfg)
        assert result.exit_code == 0, result.output
        results[name] = np.load(inputs / f"{name}.npy")
    # the file's weights are a DRUNet's (load_network builds one or refuses): bundled-drunet ran the same network
    assert np.array_equal(results["bundled"], results["file"])
    torch.save({"weight": torch.ones(2, 2)}, inputs / "linear.pth")
    for weights, message in [("linear.pth", "not those of a deepinv dncnn or drunet"),
                             ("gone.pth", "denoiser.weights must be one of ['bundled', 'bundled-3d', 'bundled-drunet']")]:
        cfg = inputs / "bad.toml"
        cfg.write_text(CONFIG.format(out="bad.npy").replace("[denoiser]", f'[denoiser]\nweights = "{weights}"'))
        result = run(cfg)
        assert result.exit_code == 2 and message in result.output, result.output
        assert "cluster:" not in result.output  # refused before a cluster started


def test_a_grey_image_goes_through_a_colour_denoiser_and_other_channels_are_refused(tmp_path):
    import deepinv as dinv

    x_true, _, _ = demo_problem(48)
    x = x_true.mean(1, keepdim=True)  # grey
    op = dinv.physics.Blur(filter=dinv.physics.blur.gaussian_blur(sigma=(1.0, 1.0)), padding="circular")
    y = op(x) + 0.03 * torch.randn_like(x)
    io.imsave(str(tmp_path / "y.png"), util.img_as_ubyte(np.clip(y[0, 0].numpy(), 0, 1)), check_contrast=False)
    np.save(tmp_path / "two.npy", torch.cat([y, y], 1).numpy())
    text = ('[input]\nmeasurements = ["{m}"]\n[[operators]]\ntype = "blur"\nsigma = [1.0, 1.0]\n'
            '[denoiser]\nweights = "bundled-drunet"\npatch_size = 32\noverlap = 8\n[solver]\niterations = 3\n'
            '[output]\npath = "{out}"\n[cluster]\nn_workers = 1\n')
    cfg = tmp_path / "grey.toml"
    cfg.write_text(text.format(m="y.png", out="x.png"))
    result = run(cfg)
    assert result.exit_code == 0, result.output
    assert "the signal grey: its channel goes through it three times" in result.output
    assert io.imread(str(tmp_path / "x.png")).shape == (48, 48)
    cfg.write_text(text.format(m="two.npy", out="x2.npy"))
    result = run(cfg)
    assert result.exit_code == 2 and "the network takes 3-channel signals, the measurements give 2" in result.output
    assert "cluster:" not in result.output


def test_denoiser_keys_left_out_take_the_configured_defaults(inputs, monkeypatch):
    """As the Python API does (docs/configuration.md): the CLI used to fix 256 / 8 / fp32 itself."""
    import dask

    from daskrecon.frontend.processing import DistributedProcessing

    made = []
    init = DistributedProcessing.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append((self.patch_size, self.overlap, self.precision))

    monkeypatch.setattr(DistributedProcessing, "__init__", record)
    cfg = inputs / "run.toml"
    cfg.write_text(CONFIG.format(out="a.npy").replace("patch_size = 32\noverlap = 8\n", ""))
    with dask.config.set({"daskrecon.denoiser.patch-size": 24, "daskrecon.denoiser.overlap": 6}):
        assert run(cfg).exit_code == 0
    assert made[-1] == (24, 6, "fp32")
    with dask.config.set({"daskrecon.denoiser.precision": "half"}):  # checked before anything runs
        result = run(cfg)
    assert result.exit_code == 2 and "precision must be one of" in result.output and "cluster:" not in result.output
    cfg.write_text(CONFIG.format(out="b.npy"))  # the keys given win
    with dask.config.set({"daskrecon.denoiser.patch-size": 24}):
        assert run(cfg).exit_code == 0
    assert made[-1] == (32, 8, "fp32")


def test_tiff_axes_are_read_from_the_file_and_a_stack_is_a_volume(tmp_path):
    """A (Z, Y, X) stack used to be read as an RGB image of its first three columns."""
    import tifffile
    from deepinv.physics import Blur
    from deepinv.physics.functional import gaussian_blur

    from daskrecon.batch.files import read_image
    from daskrecon.demo import demo_volume

    rng = np.random.default_rng(0)
    stack = (rng.random((5, 24, 20)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    np.testing.assert_allclose(read_image(tmp_path / "stack.tif"), stack[None, None] / 255, rtol=1e-6)
    rgb = (rng.random((24, 20, 4)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgb, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_allclose(read_image(tmp_path / "rgba.tif"),
                               np.moveaxis(rgb[..., :3], -1, 0)[None] / 255, rtol=1e-6)
    zcyx = (rng.random((4, 2, 24, 20)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "zcyx.tif", zcyx, imagej=True, metadata={"axes": "ZCYX"})
    np.testing.assert_allclose(read_image(tmp_path / "zcyx.tif"), zcyx.transpose(1, 0, 2, 3)[None] / 65535, rtol=1e-6)
    tifffile.imwrite(tmp_path / "time.tif", zcyx[:, :1], imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(ValueError, match="has TIFF axes 'TYX'"):  # (3 time points; the one-slice Z dropped)
        read_image(tmp_path / "time.tif")
    # the batch CLI on a TIFF stack: the volume run, as from the same values in .npy files
    x = demo_volume((16, 32, 32), chunks=16, seed=5).compute(scheduler="sync")
    blur = Blur(filter=gaussian_blur(psf_size=None, sigma=(1.0, 1.0, 1.0)), padding="reflect")
    y = np.clip(blur.A(torch.from_numpy(x)).numpy() + 0.02 * rng.standard_normal(x.shape).astype(np.float32), 0, 1)
    outs = []
    for kind in ("tif", "npy"):
        for name, v in (("y", y), ("x", x)):
            q = (v[0, 0] * 65535).round().astype(np.uint16)
            if kind == "tif":
                tifffile.imwrite(tmp_path / f"{name}.tif", q)
            else:
                np.save(tmp_path / f"{name}.npy", (q / np.float32(65535)).astype(np.float32)[None, None])
        cfg = tmp_path / f"{kind}.toml"
        cfg.write_text(VOLUME_CONFIG.replace('"y.zarr"', f'"y.{kind}"').replace('"x.zarr"', f'"x.{kind}"')
                       .replace('"result.zarr"', f'"result-{kind}.npy"').replace("iterations = 4", "iterations = 2"))
        result = run(cfg)
        assert result.exit_code == 0, result.output
        outs.append(np.load(tmp_path / f"result-{kind}.npy"))
    assert outs[0].shape == (1, 1, 16, 32, 32)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    assert np.abs(outs[0] - y).max() > 1e-2  # it ran: not the measurement copied


@pytest.mark.parametrize("out, ckpt, message", [
    ("y0.npy", None, "output.path 'y0.npy' is input.measurements\\[0\\]"),
    ("truth.npy", None, "output.path 'truth.npy' is input.ground_truth"),
    ("./sub/../y1.npy", None, "is input.measurements\\[1\\]"),  # the same file by another name
    ("z.zarr/result.zarr", None, "lies inside input.measurements\\[2\\]"),
    ("ck.zarr", "ck.zarr", "output.path 'ck.zarr' is checkpoint.path 'ck.zarr'"),
    ("ck.zarr", "ck.zarr/run1", "output.path .ck.zarr. holds checkpoint.path"),
    ("result.zarr", "z.zarr", "checkpoint.path 'z.zarr' is input.measurements\\[2\\]"),
    ("result.zarr", "z.zarr/ck", "checkpoint.path 'z.zarr/ck' lies inside input.measurements\\[2\\]"),
])
def test_the_output_and_checkpoint_never_replace_an_input(inputs, out, ckpt, message):
    """Even with output.overwrite = true: the result (or the checkpoint) would destroy what the run reads."""
    from daskrecon.config import ConfigError, load_config

    import zarr

    (inputs / "sub").mkdir()
    zarr.save_array(str(inputs / "z.zarr"), np.load(inputs / "y0.npy"))
    text = CONFIG.replace('"y2.png"', '"z.zarr"').replace('path = "{out}"', 'path = "{out}"\noverwrite = true').format(out=out)
    if ckpt:
        text += f'[checkpoint]\npath = "{ckpt}"\n'
    cfg = inputs / "run.toml"
    cfg.write_text(text)
    before = snapshot(inputs)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)
    result = run(cfg)
    assert result.exit_code == 2 and "choose another" in result.output
    assert snapshot(inputs) == before


def test_a_checkpoint_folder_may_hold_the_inputs(inputs):
    """daskrecon touches only what it made there: the config's own folder is a valid checkpoint location."""
    from daskrecon.config import load_config

    cfg = inputs / "run.toml"
    cfg.write_text(CONFIG.format(out="result.zarr") + '[checkpoint]\npath = "."\n')
    assert load_config(cfg)["checkpoint"]["path"] == "."


def test_tiff_results_keep_their_values_and_axes(tmp_path):
    """A .tif result is float32 as computed (not clipped to [0, 1], not 8-bit), any channels, volumes too,
    with ImageJ axes that daskrecon (and Fiji, napari) read back as they were written."""
    import tifffile

    from daskrecon.batch.files import read_image, write_image

    rng = np.random.default_rng(0)
    for shape, axes in [((1, 1, 12, 10), "YX"), ((1, 3, 12, 10), "CYX"), ((1, 5, 12, 10), "CYX"),
                        ((1, 1, 6, 12, 10), "ZYX"), ((1, 2, 6, 12, 10), "ZCYX")]:
        x = (rng.standard_normal(shape) * 2).astype(np.float32)  # negative and above 1: kept
        path = tmp_path / f"r{len(shape)}-{shape[1]}.tif"
        assert write_image(str(path), x, overwrite=False) == str(path)
        with tifffile.TiffFile(path) as tif:
            assert tif.series[0].axes == axes and tif.series[0].dtype == np.float32
        np.testing.assert_array_equal(read_image(path), x)
    with pytest.raises(ValueError, match=r"holds one image or volume, and the result has a batch of 2"):
        write_image(str(tmp_path / "b.tif"), np.zeros((2, 1, 4, 4), np.float32), overwrite=False)
    assert not (tmp_path / "b.tif").exists()


def test_a_volume_may_go_to_tiff_and_a_batch_only_to_zarr_or_npy(tmp_path):
    import zarr

    from daskrecon.config import ConfigError, load_config

    zarr.save_array(str(tmp_path / "y.zarr"), np.zeros((1, 1, 8, 8, 8), np.float32))
    zarr.save_array(str(tmp_path / "x.zarr"), np.zeros((1, 1, 8, 8, 8), np.float32))
    cfg = tmp_path / "vol.toml"
    cfg.write_text(VOLUME_CONFIG.replace('path = "result.zarr"', 'path = "result.tif"'))
    assert load_config(cfg)["output"]["path"] == "result.tif"
    zarr.save_array(str(tmp_path / "x.zarr"), np.zeros((2, 1, 8, 8, 8), np.float32), overwrite=True)
    with pytest.raises(ConfigError, match=r"a .tif file holds one image or volume, and this problem's signal has a "
                                          r"batch of 2"):
        load_config(cfg)


def test_a_checkpoint_is_continued_or_started_over_only_when_the_config_says_which(inputs, monkeypatch):
    """Refused before the cluster, in the config's words; library errors and Ctrl-C end with a message, no traceback."""
    import daskrecon
    from daskrecon.batch.run import interrupted_message

    cfg = inputs / "run.toml"
    base = CONFIG.format(out="result.npy").replace('[cluster]', '[checkpoint]\npath = "ck"\n{extra}\n[cluster]')
    cfg.write_text(base.format(extra=""))
    assert run(cfg).exit_code == 0
    (inputs / "result.npy").unlink()
    before = snapshot(inputs)
    again = run(cfg)
    assert again.exit_code == 2 and "'ck' already holds a checkpoint (iteration 4): set checkpoint.resume = true" \
        in again.output and "cluster:" not in again.output
    cfg.write_text(base.format(extra="resume = true\noverwrite = true"))
    assert "both true" in run(cfg).output
    after = snapshot(inputs)
    assert {k: v for k, v in after.items() if k != "run.toml"} == {k: v for k, v in before.items() if k != "run.toml"}
    # resumed with another step: the engine's CheckpointMismatchError, as a message
    cfg.write_text(base.format(extra="resume = true").replace("step_size = 0.3", "step_size = 0.2"))
    mismatch = run(cfg)
    assert mismatch.exit_code == 1 and "error (CheckpointMismatchError)" in mismatch.output, mismatch.output
    assert "Traceback" not in mismatch.output
    # started over (what daskrecon wrote replaced), then Ctrl-C once it has checkpointed: where it can go on
    original = daskrecon.reconstruct

    def interrupted(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(daskrecon, "reconstruct", interrupted)
    cfg.write_text(base.format(extra="overwrite = true").replace("iterations = 4", "iterations = 2"))
    stopped = run(cfg)
    assert stopped.exit_code == 130 and "interrupted: 'ck' holds iteration 2; run the same config with " \
        "checkpoint.resume = true" in stopped.output, stopped.output
    assert '"iteration": 2' in (inputs / "ck" / "COMMIT.json").read_text()
    cfg.write_text(CONFIG.format(out="result.npy"))
    assert interrupted_message(cfg).startswith("interrupted: nothing was written")


def test_an_out_of_core_run_without_a_checkpoint_leaves_no_scratch_behind(inputs):
    """Its iterate streams through a temporary folder (two slots of the image): removed once the result
    is written (the result equals the in-memory one: tests/test_engine.py)."""
    import dask
    import zarr

    scratch = inputs / "scratch"
    scratch.mkdir()
    cfg = inputs / "run.toml"

    for i in range(2):  # Zarr measurements, read lazily: the result is lazy, read from the scratch folder
        zarr.save_array(str(inputs / f"y{i}.zarr"), np.load(inputs / f"y{i}.npy"))
    cfg.write_text(CONFIG.format(out="streamed.npy").replace("[cluster]", '[checkpoint]\nscratch = "scratch"\n\n[cluster]')
                   .replace('"y0.npy", "y1.npy"', '"y0.zarr", "y1.zarr"'))
    with dask.config.set({"daskrecon.reconstruct.storage": "zarr"}):
        result = run(cfg)
    assert result.exit_code == 0, result.output
    assert "removed the run's scratch folder" in result.output and "no checkpoint given" not in result.output
    assert list(scratch.iterdir()) == []
    out = np.load(inputs / "streamed.npy")
    assert out.shape == (1, 3, 48, 48) and np.isfinite(out).all() and float(out.std()) > 0.05


def test_a_scheduler_that_does_not_answer_is_said_in_the_commands_words(inputs):
    """The context's message said "pass cluster=None", a Python keyword the command has not."""
    import dask

    cfg = inputs / "unreachable.toml"
    cfg.write_text(CONFIG.format(out="unreachable.npy").replace(LOCAL, 'kind = "address"\naddress = "tcp://127.0.0.1:1"'))
    with dask.config.set({"daskrecon.context.timeout": 1.0}):
        flag = CliRunner().invoke(app, ["reconstruct", str(cfg), "--scheduler", "tcp://127.0.0.1:1"])
        key = CliRunner().invoke(app, ["reconstruct", str(cfg)])
    assert flag.exit_code == key.exit_code == 1
    assert "Check --scheduler and that the scheduler is running, or leave out --scheduler" in flag.output
    assert 'Check cluster.address and that the scheduler is running, or set cluster.kind = "local"' in key.output
    assert "cluster=None" not in flag.output + key.output and not (inputs / "unreachable.npy").exists()
