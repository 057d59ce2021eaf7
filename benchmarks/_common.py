"""Shared pieces of the benchmarks: problems, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=DeprecationWarning)

RESULTS = Path(__file__).parent / "results"


def blur_problem(n_ops: int, size: int, channels: int = 3, seed: int = 0, use_fft: bool = False):
    """n_ops circular Gaussian blurs, sigma from 1 to 4; noisy y from x_true; x far from x_true."""
    import torch
    import deepinv as dinv
    from deepinv.physics.functional.blur import gaussian_blur

    sigmas = [1.0 + 3.0 * i / max(1, n_ops - 1) for i in range(n_ops)]
    ops = [dinv.physics.Blur(filter=gaussian_blur(sigma=(s, s)), padding="circular", use_fft=use_fft) for s in sigmas]
    g = torch.Generator().manual_seed(seed)
    x_true = torch.rand(1, channels, size, size, generator=g)
    y = dinv.utils.TensorList([op.A(x_true) + 0.01 * torch.randn(op.A(x_true).shape, generator=g) for op in ops])
    x = torch.rand(1, channels, size, size, generator=g)
    return ops, x, y


def timeit(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times, "_out": out}


def machine() -> dict:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started (or since :func:`reset_peak_rss`).

    Linux's ``VmHWM``, not ``getrusage``'s ``ru_maxrss``: that one survives ``fork`` + ``exec``,
    so a worker spawned by a driver holding 1.7 GiB reports 1.7 GiB before doing anything.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mib() -> float:
    """This process's resident memory now."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> None:
    """Start :func:`peak_rss_mib` again from the current resident memory (Linux ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    clean = json.loads(json.dumps(payload, default=lambda o: None))
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path


def table(rows: list[tuple[str, float]], ref: float) -> str:
    lines = [f"{'variant':52s} {'median s':>9s} {'÷ best deepinv.distributed':>27s}"]
    for name, t in rows:
        lines.append(f"{name:52s} {t:9.3f} {t / ref:27.2f}")
    return "\n".join(lines)


def run_deepinv_distributed(script: str, nproc: int, opts: list[str]) -> dict:
    """Run a deepinv.distributed benchmark script in one process or under torchrun; return its RESULT line."""
    import subprocess

    path = os.path.join(os.path.dirname(__file__), script)
    cmd = [sys.executable, path, *opts] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", path, *opts]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"deepinv.distributed ({nproc} proc) failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])
