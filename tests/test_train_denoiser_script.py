"""scripts/train_denoiser.py, the script that made the bundled weights, runs and writes what the loaders read."""

import json
import subprocess
import sys
from pathlib import Path

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
