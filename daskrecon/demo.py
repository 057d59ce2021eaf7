"""The zero-input demo: multi-blur deconvolution of a bundled image with a bundled denoiser."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from daskrecon.engine.loop import psnr as _psnr

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["DEMO_DENOISERS", "DEMO_OUTPUTS", "demo_image", "demo_problem", "demo_schedule", "demo_volume", "run_demo"]

#: The bundled denoisers the demo can run (``run_demo(denoiser=...)``, ``daskrecon demo --denoiser``).
DEMO_DENOISERS = ("drunet", "dncnn")
#: What the demo writes into its output folder.
DEMO_OUTPUTS = ("reconstruction.zarr", "demo.png", "convergence.png", "summary.json")
_MARK = "daskrecon demo"


def _is_demo_folder(out: Path) -> bool:
    """Whether ``out`` holds an earlier demo's outputs (its summary.json is the demo's)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and (summary.get("written_by") == _MARK
                                          or {"psnr_reconstruction_db", "outputs"} <= set(summary))


def _check_output_folder(out: Path) -> None:
    """Refuse a folder where files of the demo's output names exist that an earlier demo did not write."""
    from daskrecon.errors import OutputExistsError

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{str(out)!r} is a file: the demo writes a folder; pass --output a new folder")
    taken = [n for n in DEMO_OUTPUTS if (out / n).exists()]
    if taken and not _is_demo_folder(out):
        raise OutputExistsError(f"{str(out)!r} holds {', '.join(taken)}, not written by an earlier demo: they are left "
                                f"as they are; pass --output a new folder (output= in Python)")


def demo_image(size: int = 256) -> torch.Tensor:
    """scikit-image's astronaut at ``size``², RGB in [0, 1], shape ``(1, 3, size, size)``."""
    from skimage import data, transform, util

    img = util.img_as_float32(transform.resize(data.astronaut(), (size, size), anti_aliasing=True))
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].float()


def demo_volume(shape: tuple[int, int, int] = (64, 64, 64), chunks: int | tuple[int, ...] = 64,
                seed: int = 0) -> da.Array:
    """A synthetic fluorescence-microscopy-like volume ``(1, 1, D, H, W)`` in [0, 1], as a lazy dask array.

    Blobs (nuclei) and thin filaments on a grid of 24-voxel cells, each cell's objects drawn
    from ``(seed, cell)``: every chunk is computed on its own and is the same for any
    chunking, so volumes far larger than memory stream straight into Zarr.
    """
    import dask.array as da

    from daskrecon.tasks import phantoms

    full = (1, 1, *(int(n) for n in shape))
    chunks = (1, 1, *((chunks,) * 3 if isinstance(chunks, int) else chunks))
    return da.map_blocks(phantoms.volume_block, seed, full, dtype=np.float32,
                         chunks=da.core.normalize_chunks(chunks, full), meta=np.empty((0,) * 5, np.float32),
                         name=f"demo-volume-{seed}-{'x'.join(map(str, shape))}-{'x'.join(map(str, chunks[2:]))}")


#: The smallest ``size`` the demo's blurs run on (half the widest kernel, 23 pixels).
MIN_SIZE = 11


def demo_problem(size: int = 256, noise: float = 0.05, seed: int = 0):
    """scikit-image's astronaut at ``size``², three circular blurs with Gaussian noise.

    Returns ``(x_true, operators, y)``; ``y`` is drawn with per-operator generators, so it
    is the same on every machine and for any number of workers.
    """
    import deepinv as dinv
    from deepinv.physics.functional.blur import gaussian_blur
    kernels = [gaussian_blur(sigma=(1.0, 1.0)), gaussian_blur(sigma=(2.0, 2.0)),
               gaussian_blur(sigma=(1.5, 3.0), angle=30)]
    widest = max(max(k.shape[-2:]) for k in kernels)  # a circular blur wraps around once at most
    if not isinstance(size, int) or size < widest // 2:
        raise ValueError(f"size must be at least {widest // 2} pixels (the demo's widest blur is {widest} "
                         f"pixels wide), got {size!r}")
    x_true = demo_image(size)
    ops = []
    for i, k in enumerate(kernels):
        op = dinv.physics.Blur(filter=k, padding="circular")
        op.noise_model = dinv.physics.GaussianNoise(sigma=noise, rng=torch.Generator().manual_seed(seed + i))
        ops.append(op)
    with torch.no_grad():
        y = dinv.utils.TensorList([op(x_true) for op in ops])
    return x_true, ops, y


def _figures(out: Path, x_true: torch.Tensor, y0: torch.Tensor, x: torch.Tensor, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def show(ax, t, title):
        ax.imshow(t[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy())
        ax.set_title(title)
        ax.axis("off")

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    show(axes[0], x_true, "ground truth")
    show(axes[1], y0, f"measurement 1 of 3 ({_psnr(y0, x_true):.2f} dB)")
    show(axes[2], x, f"daskrecon reconstruction ({_psnr(x, x_true):.2f} dB)")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=100)
    plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    its = [h["iteration"] for h in history]
    a1.plot(its, [h["psnr"] for h in history], marker="o")
    a1.set(xlabel="iteration", ylabel="PSNR (dB)", title="PSNR")
    a2.semilogy(its, [h["data_fidelity"] for h in history], marker="o")
    a2.set(xlabel="iteration", ylabel="Σ_i ½‖A_i x − y_i‖²", title="data fidelity")
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=100)
    plt.close(fig)


def demo_schedule(iterations: int = 5, noise: float = 0.05, sigma_from: float = 0.2, sigma_to: float = 0.08,
                  weight: float = 1.0) -> dict[str, list[float]]:
    """The demo's ADMM schedule: the denoiser's σ and ADMM's step ``γ`` at each iteration.

    σ decreases geometrically from ``sigma_from`` to ``sigma_to`` over ``iterations``, and
    ``γ_k = (σ_k / noise)² / weight`` follows it (DPIR's coupling of the data term's weight to the
    denoiser's strength). Chosen from a sweep of the schedule's length, ends and weight on the demo's
    problem (``benchmarks/bench_demo_schedules.py``), confirmed on the cluster by
    ``benchmarks/bench_demo_priors.py``.

    Returns
    -------
    dict
        ``{"sigma_denoiser": [...], "step_size": [...]}``, keywords of :func:`daskrecon.reconstruct`.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    sigmas = np.geomspace(sigma_from, sigma_to, iterations) if iterations > 1 else np.array([sigma_to])
    return {"sigma_denoiser": sigmas.tolist(), "step_size": ((sigmas / noise) ** 2 / weight).tolist()}


def run_demo(
    size: int = 512,
    iterations: int | None = None,
    n_workers: int | None = None,
    output: str | Path = "daskrecon-demo",
    noise: float = 0.05,
    denoiser: str = "drunet",
    equivariant: bool = True,
    precision: str | None = None,
    progress: bool = True,
    dashboard_address: str = "127.0.0.1:8787",
    echo: Any = print,
) -> dict:
    """Run the demo and write ``reconstruction.zarr``, ``demo.png``, ``convergence.png`` and ``summary.json``.

    Into ``output``: a new folder, or one an earlier demo wrote (its outputs are replaced); files of
    those names that the demo did not write are refused (:class:`~daskrecon.errors.OutputExistsError`),
    before any work.

    ``denoiser`` is ``"drunet"`` (the bundled small DRUNet, tiles overlapping by 32 pixels) or
    ``"dncnn"`` (the bundled DnCNN, exact with an overlap of 8). Each runs the algorithm measured
    best for it (``benchmarks/bench_demo_priors.py``): the non-blind DRUNet ADMM with a decreasing σ
    (:func:`demo_schedule`; 5 iterations by default), averaged over the 8 flips and 90° rotations
    when ``equivariant`` (:class:`~daskrecon.models.FlipRotateAverage`: 8 calls per tile, +0.2 dB
    here); the blind DnCNN RED (step 0.5, weight 0.5; 30 iterations by default).

    ``size``: the image's side; 512 is scikit-image's astronaut at its own resolution (smaller
    sizes resample it). ``precision``: the denoiser tiles' (``reconstruct(precision=...)``);
    default bf16 where this machine's CPU runs it natively (its error probed against fp32 first),
    else fp32.
    """
    import zarr

    import daskrecon as dr
    from daskrecon.models import bundled_denoiser, bundled_drunet
    from daskrecon.tasks.precision import supported

    if denoiser not in DEMO_DENOISERS:
        raise ValueError(f"denoiser must be one of {DEMO_DENOISERS}, got {denoiser!r}")
    make, overlap, label = {"drunet": (bundled_drunet, 32, "the bundled DRUNet"),
                            "dncnn": (bundled_denoiser, 8, "the bundled DnCNN")}[denoiser]
    model = make()
    if denoiser == "drunet":
        iterations = 5 if iterations is None else iterations
        settings = {"algorithm": "admm", **demo_schedule(iterations, noise)}
        sched = settings["sigma_denoiser"]
        described = (f"ADMM, denoiser sigma {sched[0]:.3g} -> {sched[-1]:.3g} over {iterations} iterations, "
                     f"step (sigma_k / {noise})^2")
        if equivariant:
            from daskrecon.models import FlipRotateAverage

            model = FlipRotateAverage(model)
            label += ", averaged over 8 flips/rotations"
    else:
        iterations = 30 if iterations is None else iterations
        settings = {"algorithm": "red", "step_size": 0.5, "red_weight": 0.5, "sigma_denoiser": 0.05}
        described = "RED, step 0.5, weight 0.5"

    if precision is None:  # the local cluster's workers run on this CPU
        precision = "bf16" if "bf16" in supported(torch.device("cpu")) else "fp32"
    out = Path(output)
    _check_output_folder(out)  # before the cluster: someone else's files there are never replaced
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x_true, ops, y = demo_problem(size, noise)
    with dr.DistributedContext(n_workers=n_workers, dashboard_address=dashboard_address) as ctx:
        echo(f"Dask cluster: {ctx.num_workers} workers; dashboard: {ctx.dashboard_link}")
        dphys = dr.distribute(ops, ctx)
        dden = dr.distribute(model, ctx, patch_size=max(32, size // 2), overlap=overlap, precision=precision)
        x, history = dr.reconstruct(dphys, y, dden, n_iter=iterations, x_true=x_true, progress=progress,
                                    return_history=True, **settings)
    last = history[-1] if history else {}
    chosen = {"tiles": last.get("precision", "fp32"), "relative_error": last.get("precision_rel_error")}
    seconds = time.perf_counter() - t0
    result = x.cpu().numpy()
    # an earlier demo's (checked above): replaced
    zarr.create_array(str(out / "reconstruction.zarr"), shape=result.shape, dtype=result.dtype, overwrite=True)[...] = result
    _figures(out, x_true, y[0], x, history)
    summary = {
        "written_by": _MARK,
        "image": f"skimage astronaut, 1x3x{size}x{size}",
        "operators": "3 circular Gaussian blurs (sigma 1, 2, (1.5, 3) at 30 degrees) + Gaussian noise "
                     f"sigma={noise}",
        "algorithm": f"{described}, with {label}",
        "settings": settings,
        "iterations": iterations,
        "precision": {"asked": precision, **chosen},
        "psnr_measurements_db": [_psnr(y[i], x_true) for i in range(len(y))],
        "psnr_reconstruction_db": _psnr(x, x_true),
        "seconds": seconds,
        "outputs": [str(out / n) for n in DEMO_OUTPUTS],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    best = max(summary["psnr_measurements_db"])
    echo(f"PSNR: best measurement {best:.2f} dB -> reconstruction {summary['psnr_reconstruction_db']:.2f} dB "
         f"(+{summary['psnr_reconstruction_db'] - best:.2f} dB) in {seconds:.0f} s")
    if chosen["relative_error"] is not None:
        echo(f"denoiser tiles in {chosen['tiles']} (probe: relative error {chosen['relative_error']:.1e} against fp32)")
    echo(f"wrote {', '.join(summary['outputs'])}")
    return summary
