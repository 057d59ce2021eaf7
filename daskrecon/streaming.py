"""Out-of-core reconstruction: every iteration streams from one Zarr slot to the other.

The iterate lives in a :class:`~daskrecon.checkpoint.Checkpoint` (two slots, an atomic
commit record). Iteration ``k`` is one lazy graph: read ``x_k`` chunk by chunk from the
committed slot, apply the chunk-wise operators (:mod:`daskrecon.local`) and their
adjoints, the pixel-wise data-fidelity gradient, the tiled denoiser (``map_overlap``),
and write ``x_{k+1}`` into the free slot, together with the reductions the progress
bar shows; then commit. Nothing image-sized ever exists on the driver or, whole, on a
worker.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from deepinv.optim import L2

from daskrecon.checkpoint import Checkpoint
from daskrecon.errors import DaskreconError, MeasurementError, ShapeError
from daskrecon.fidelity import DistributedDataFidelity
from daskrecon._arrays import as_dask
from daskrecon.physics import DistributedPhysics
from daskrecon.processing import DistributedPrior, DistributedProcessing
from daskrecon.solvers import problem_record, psnr_of_mse
from daskrecon.waiting import compute

__all__ = ["reconstruct_chunked", "working_chunks"]


def working_chunks(shape: tuple[int, ...], chunks: tuple[tuple[int, ...], ...], forms: list) -> tuple[tuple[int, ...], ...]:
    """Regular chunks (every chunk but the last equal) that every operator can run on.

    Zarr stores regular chunks only, and a write aligned with them needs no lock.
    """
    factor = math.lcm(*(f.factor for f in forms)) if forms else 1
    out = [(shape[0],), (shape[1],)]
    for axis in (2, 3):
        n = len(chunks[axis])
        need = max((f.min_chunk(n) for f in forms), default=1)
        size = min(-(-max(chunks[axis][0], need) // factor) * factor, shape[axis])
        # A remainder shorter than ``need`` is merged by the operators' own rechunk (fit_axis).
        out.append(tuple([size] * (shape[axis] // size) + ([shape[axis] % size] if shape[axis] % size else [])))
    return tuple(out)


def reconstruct_chunked(
    physics: DistributedPhysics, y: Any, denoiser: Any, *, data_fidelity: DistributedDataFidelity | None,
    algorithm: str, n_iter: int, step_size: float | None, sigma_denoiser: float, red_weight: float,
    x0: Any, checkpoint: str | None, resume: bool, overwrite: bool,
    callback: Callable[[int, da.Array], Any] | None, progress: bool, x_true: Any,
) -> tuple[da.Array, list[dict]]:
    """The out-of-core path of :func:`daskrecon.reconstruct` (see there)."""
    from distributed import span
    from tqdm.auto import tqdm

    ctx = physics.ctx
    n = physics.num_operators
    if not isinstance(y, (list, tuple)) or len(y) != n:
        raise MeasurementError(f"y must be a list of {n} arrays (one per operator), got "
                               f"{len(y) if isinstance(y, (list, tuple)) else type(y).__name__}")
    ys = [as_dask(v, f"y[{i}]") for i, v in enumerate(y)]
    forms = physics.local_forms()
    global_ops = [i for i, f in enumerate(forms) if f is None]
    if global_ops:
        raise DaskreconError(
            f"operators {global_ops} have no chunk-wise form (daskrecon.local.local_form), so the image cannot "
            "stream through Zarr; pass tensors to reconstruct them on the assembled image with per-operator tasks"
        )
    fidelity = data_fidelity or DistributedDataFidelity(ctx, L2())
    prior = denoiser if isinstance(denoiser, DistributedPrior) else None
    if prior is None and not isinstance(denoiser, DistributedProcessing):
        raise TypeError("denoiser must be a DistributedProcessing or DistributedPrior: dr.distribute(denoiser, ctx)")
    if x0 is not None:
        x0 = as_dask(x0, "x0")
        if x0.ndim != 4:
            raise ShapeError(f"x0 must be (B, C, H, W), got shape {x0.shape}")
        for i, (f, yi) in enumerate(zip(forms, ys)):
            if f.output_shape(x0.shape) != yi.shape:
                raise ShapeError(f"y[{i}] has shape {yi.shape} but operator {i} maps x0 {x0.shape} to "
                                 f"{f.output_shape(x0.shape)}")

    # One pass over the inputs before anything is written: no NaN/Inf may enter a run.
    named = [(f"y[{i}]", v) for i, v in enumerate(ys)] + ([("x0", x0)] if x0 is not None else [])
    model = denoiser.processing if prior is not None else denoiser
    for name, v in named:
        model.check_dtype(v.dtype)  # before any pass over the data
    bad = compute([(~da.isfinite(v)).sum() for _, v in named], client=ctx.client, what="input check",
                  stall_timeout=ctx.stall_timeout)
    for (name, _), count in zip(named, bad):
        if count:
            raise ValueError(f"{name} has {int(count)} non-finite values (NaN or Inf); clean or mask them before "
                             "reconstructing")
    if x0 is None:
        x0 = physics.A_adjoint(ys) / n
    chunks = working_chunks(x0.shape, x0.chunks, forms)
    x0 = x0.rechunk(chunks)
    if step_size is None:
        step_size = 1.0 / sum(f.norm_bound() for f in forms)
    problem = problem_record(physics, denoiser, algorithm, step_size, sigma_denoiser, red_weight,
                             measurements=tokenize(*[v.name for v in ys]), x0=x0.name, shape=list(x0.shape),
                             chunks=[c[0] for c in chunks])
    if checkpoint is None:
        # The iterate has to live somewhere larger than memory, and the result reads from it.
        checkpoint = tempfile.mkdtemp(prefix="daskrecon-")
        warnings.warn(f"no checkpoint given: the out-of-core iterate (two slots of {x0.nbytes / 2**30:.2f} GiB) is "
                      f"kept in {checkpoint}, which the result reads from; pass checkpoint=… to choose the place, "
                      "and delete it when done", UserWarning, stacklevel=3)
    ckpt = Checkpoint(checkpoint)
    history: list[dict] = []
    start = 0
    if ckpt.exists() and resume:
        ckpt.check(problem)
        meta = ckpt.meta()
        start, history = meta["iteration"], meta.get("extra", {}).get("history", [])
    elif ckpt.exists() and not overwrite:
        raise DaskreconError(f"{ckpt.url!r} already holds a checkpoint (iteration {ckpt.meta()['iteration']}); "
                             "pass resume=True to continue it or overwrite=True to start over")
    else:
        ckpt.save_dask(0, x0, problem, {"history": []}, client=ctx.client, stall_timeout=ctx.stall_timeout)

    truth = None if x_true is None else as_dask(x_true, "x_true").rechunk(chunks).astype(x0.dtype)

    def denoise(z: da.Array) -> da.Array:
        if prior is not None:
            return prior.prox(z, sigma_denoiser=sigma_denoiser)
        return denoiser(z, sigma_denoiser)

    bar = tqdm(total=n_iter, initial=start, disable=not progress, desc=f"{algorithm.upper()} (out of core)", unit="it")
    try:
        for k in range(start, n_iter):
            x = ckpt.committed()
            with span(f"daskrecon-iteration-{k + 1}"):
                grad = fidelity.grad(x, ys, physics)
                if algorithm == "pnp":
                    x_new = denoise(x - step_size * grad)
                else:
                    x_new = x - step_size * (grad + red_weight * (x - denoise(x)))
                x_new = x_new.astype(x.dtype).rechunk(x.chunks)
                also = {
                    "data_fidelity": fidelity.fn(x, ys, physics).sum(),
                    "change2": ((x_new - x).astype(np.float64) ** 2).sum(),
                    "norm2": (x.astype(np.float64) ** 2).sum(),
                }
                if truth is not None:
                    also["mse"] = ((da.clip(x_new, 0, 1) - truth).astype(np.float64) ** 2).mean()

                def record(v: dict, k: int = k) -> dict:
                    row = {"iteration": k + 1, "data_fidelity": float(v["data_fidelity"]),
                           "relative_change": math.sqrt(float(v["change2"])) / max(math.sqrt(float(v["norm2"])), 1e-12)}
                    if "mse" in v:
                        row["psnr"] = psnr_of_mse(float(v["mse"]))
                    history.append(row)
                    return {"history": history}

                ckpt.save_dask(k + 1, x_new, problem, record, also, client=ctx.client, stall_timeout=ctx.stall_timeout)
            row = history[-1]
            bar.set_postfix({k_: f"{v:.4g}" for k_, v in row.items() if k_ != "iteration"})
            bar.update(1)
            if callback is not None:
                callback(k + 1, ckpt.committed())
    finally:
        bar.close()
    return ckpt.committed(), history
