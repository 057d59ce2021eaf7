"""scripts/train_denoiser.py, the script that made the bundled weights, runs and writes what the loaders read."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).parents[1] / "scripts" / "train_denoiser.py"


def test_drunet_recipe_trains_saves_float16_and_evaluates_held_out_images(tmp_path):
    out = tmp_path / "tiny.pt"
    cache = tmp_path / "images.npz"
    args = [sys.executable, str(SCRIPT), "--arch", "drunet", "--nc", "8", "16", "32", "64", "--nb", "1",
            "--steps", "3", "--batch", "2", "--patch", "64", "--scales", "1", "0.5", "--no-extra-images",
            "--save-dtype", "float16", "--image-cache", str(cache), "--out", str(out)]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    state = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    from deepinv.models import DRUNet

    DRUNet(3, 3, nc=(8, 16, 32, 64), nb=1, pretrained=None).load_state_dict(state)  # the loader's architecture
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps"] == 3 and record["architecture"]["nc"] == [8, 16, 32, 64]
    assert "astronaut" in record["held_out"] and "astronaut" not in record["train_images"]
    assert set(record["held_out_psnr"]) == {"sigma=0.05", "sigma=0.1", "sigma=0.2"}
    # The image cache written by the first run is what a second run reads (the same data without the libraries)
    assert cache.is_file()
    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    again = torch.load(out, weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)  # seeded: the same weights from the cached images


def _sporco_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("sporco") is not None


def test_more_images_are_sporcos_and_a_missing_package_is_named(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_denoiser as script
    finally:
        sys.path.remove(str(SCRIPT.parent))
    base = [sys.executable, str(SCRIPT), "--arch", "drunet", "--nc", "8", "16", "32", "64", "--nb", "1", "--steps", "1",
            "--batch", "1", "--patch", "64", "--scales", "1", "--no-extra-images", "--more-images"]
    if not _sporco_installed():  # the data come from the package's files: without it, the command to get it
        run = subprocess.run(base + ["--out", str(tmp_path / "no.pt")], capture_output=True, text=True, timeout=600)
        assert run.returncode != 0 and "pip install --no-deps sporco" in run.stderr
        assert not (tmp_path / "no.pt").exists()
    # An image cache holding them trains on them and records them (as on a machine that has sporco)
    rng = np.random.default_rng(0)
    names = script.SKIMAGE + script.MORE + script.HELD_OUT
    cache = tmp_path / "images.npz"
    np.savez(cache, **{n: rng.integers(0, 256, (80, 96, 3), dtype=np.uint8) for n in names})
    out = tmp_path / "more.pt"
    run = subprocess.run(base + ["--image-cache", str(cache), "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["train_images"] == script.SKIMAGE + script.MORE
    assert f"{len(names) - len(script.HELD_OUT)} training images" in run.stdout
