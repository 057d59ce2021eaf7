"""`reconstruct()`: plug-and-play reconstructions driven from the client, with checkpoints.

Each iteration is one data-fidelity gradient (one task per operator, tree-reduced on the
workers) and one tiled denoiser pass, inside a Dask span named for the iteration, so the
dashboard shows time per iteration.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import cloudpickle
import dask.array as da
import numpy as np
import torch
from deepinv.optim import L2
from deepinv.utils import TensorList

from daskrecon._arrays import entries, gather_arrays, place
from daskrecon.checkpoint import Checkpoint
from daskrecon.errors import DaskreconError, MeasurementError
from daskrecon.fidelity import DistributedDataFidelity
from daskrecon.physics import DistributedPhysics
from daskrecon.processing import DistributedPrior, DistributedProcessing

__all__ = ["ALGORITHMS", "reconstruct"]

ALGORITHMS = ("pnp", "red")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} non-finite values (NaN or Inf); clean or mask them before reconstructing")


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().numpy()
        if isinstance(p, np.ndarray):
            h.update(str((p.shape, p.dtype)).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(cloudpickle.dumps(p))
    return h.hexdigest()[:16]


def problem_record(physics: DistributedPhysics, denoiser: Any, algorithm: str, step_size: float, sigma: float,
                   lamb: float, *, measurements: str, x0: str, shape: list[int], **more: Any) -> dict:
    """What defines a reconstruction problem, each part hashed, so a resume can name what differs."""
    model = getattr(denoiser, "processing", denoiser)
    return {
        "algorithm": algorithm,
        "operators": physics.fingerprint(),
        "measurements": measurements,
        "x0": x0,
        "shape": list(shape),
        **more,
        "step_size": repr(float(step_size)),
        "sigma_denoiser": repr(float(sigma)),
        "red_weight": repr(float(lamb)),
        "denoiser": getattr(model, "fingerprint", lambda: type(model).__name__)(),
        "tiling": repr((getattr(model, "patch_size", None), getattr(model, "overlap", None),
                        getattr(model, "max_batch_size", None), getattr(model, "blend", None))),
    }


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of ``x`` (clipped to [0, 1]) against ``ref``."""
    return psnr_of_mse(torch.mean((x.clamp(0, 1) - ref) ** 2).item())


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a [0, 1] signal with mean squared error ``mse``."""
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def reconstruct(
    physics: DistributedPhysics,
    y: Any,
    denoiser: DistributedProcessing | DistributedPrior,
    *,
    data_fidelity: DistributedDataFidelity | None = None,
    algorithm: str = "pnp",
    n_iter: int = 20,
    step_size: float | None = None,
    sigma_denoiser: float = 0.05,
    red_weight: float = 1.0,
    x0: torch.Tensor | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callable[[int, torch.Tensor], Any] | None = None,
    progress: bool = True,
    x_true: torch.Tensor | None = None,
    return_history: bool = False,
) -> torch.Tensor | da.Array | tuple[torch.Tensor | da.Array, list[dict]]:
    """Solve ``min_x Σ_i d_i(A_i x, y_i) + prior(x)`` with a plug-and-play algorithm.

    Parameters
    ----------
    physics : DistributedPhysics
        From :func:`daskrecon.distribute`.
    y : TensorList or DistributedMeasurements
        One measurement per operator.
    denoiser : DistributedProcessing or DistributedPrior
        A distributed denoiser (its ``prox`` for a prior).
    data_fidelity : DistributedDataFidelity, optional
        Default: ``L2()`` on every operator.
    algorithm : {"pnp", "red"}
        ``"pnp"``: proximal gradient ``x ← D_σ(x − τ ∇f(x))``. ``"red"``: gradient descent on
        ``f + λ·RED``: ``x ← x − τ (∇f(x) + λ (x − D_σ(x)))``.
    n_iter : int
        Iterations in total (a resumed run continues up to ``n_iter``).
    step_size : float, optional
        ``τ``; default ``1 / ‖A‖²`` from the per-operator bound ``Σ_i ‖A_i‖²``.
    sigma_denoiser : float
        Noise level given to the denoiser.
    red_weight : float
        ``λ`` of RED.
    x0 : torch.Tensor, optional
        Start; default ``Aᵀy / N``.
    checkpoint : str, optional
        A local directory; the iterate is committed there every ``checkpoint_every``
        iterations (crash-safe: see :mod:`daskrecon.checkpoint`).
    resume : bool
        Continue from the last committed iterate of ``checkpoint``. The final result is
        bitwise the one of an uninterrupted run. A checkpoint of another problem is
        refused with the list of what differs.
    overwrite : bool
        Allow starting over (``resume=False``) in a directory that holds a checkpoint.
    callback : callable, optional
        ``callback(iteration, x)`` after each completed iteration (1-based).
    progress : bool
        Show a progress bar with the data-fidelity value ``f(x)`` at the start of each
        iteration (a by-product of the gradient pass), the relative change and, when
        ``x_true`` is given, the PSNR.
    x_true : torch.Tensor, optional
        Ground truth, for the PSNR only.
    return_history : bool
        Also return the per-iteration metrics.

    Returns
    -------
    x : torch.Tensor or dask.array.Array
        The last iterate.
    history : list of dict
        Only with ``return_history=True``: one dict per iteration since the start (a
        resumed run includes the checkpointed ones), with ``"iteration"`` (1-based),
        ``"data_fidelity"`` (``f(x)`` at the start of the iteration), ``"relative_change"``
        (``‖x_{k+1} − x_k‖ / ‖x_k‖``) and, with ``x_true``, ``"psnr"``.

    Notes
    -----
    **Out of core.** When ``y`` (a list with one array per operator) or ``x0`` are dask
    arrays — e.g. ``da.from_zarr`` — and every operator is local
    (:mod:`daskrecon.local`), each iteration is one lazy graph streamed chunk by chunk
    from the committed iterate in ``checkpoint`` (a Zarr store, local or fsspec URL) to
    the free slot, and committed atomically: memory is bounded by the chunks in flight,
    not the image. The result is a dask array reading the last committed iterate.
    Without ``checkpoint`` that store is a new temporary directory, named in a
    ``UserWarning`` and left in place (the result reads from it).

    Raises
    ------
    ValueError
        Non-finite values in ``y`` or ``x0``; ``y`` of the wrong length; an unknown
        algorithm; a checkpoint of another problem (:class:`CheckpointMismatchError`).
    """
    from distributed import span
    from tqdm.auto import tqdm

    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if not isinstance(physics, DistributedPhysics):
        raise TypeError("physics must be a DistributedPhysics: dr.distribute(physics, ctx)")
    if not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative int, got {n_iter!r}")
    if isinstance(x0, da.Array) or (isinstance(y, (list, tuple)) and any(isinstance(v, da.Array) for v in y)):
        from daskrecon.streaming import reconstruct_chunked

        out, history = reconstruct_chunked(
            physics, y, denoiser, data_fidelity=data_fidelity, algorithm=algorithm, n_iter=n_iter,
            step_size=step_size, sigma_denoiser=sigma_denoiser, red_weight=red_weight, x0=x0,
            checkpoint=checkpoint, resume=resume, overwrite=overwrite, callback=callback, progress=progress,
            x_true=x_true,
        )
        return (out, history) if return_history else out
    ctx = physics.ctx
    if isinstance(y, (TensorList, list, tuple)):
        ys = entries(y)
        if len(ys) != physics.num_operators:
            raise MeasurementError(f"y has {len(ys)} entries but the physics has {physics.num_operators} operators")
        for i, t in enumerate(ys):
            _check_finite(f"y[{i}]", t)
    else:
        ys = []
    fidelity = data_fidelity or DistributedDataFidelity(ctx, L2())
    prior = denoiser if isinstance(denoiser, DistributedPrior) else None
    if prior is None and not isinstance(denoiser, DistributedProcessing):
        raise TypeError("denoiser must be a DistributedProcessing or DistributedPrior: dr.distribute(denoiser, ctx)")
    if x0 is None:
        x0 = physics.A_adjoint(y) / physics.num_operators
    _check_finite("x0", x0)
    model = denoiser.processing if prior is not None else denoiser
    model.check_dtype(x0.dtype)
    for i, t in enumerate(ys):
        if t.is_complex() and not x0.is_complex():
            raise TypeError(f"y[{i}] is complex but x0 is real: the denoiser takes real images")
    if step_size is None:
        step_size = 1.0 / float(physics.compute_sqnorm(x0, verbose=False))
    problem = problem_record(physics, denoiser, algorithm, step_size, sigma_denoiser, red_weight,
                             measurements=_digest(*ys), x0=_digest(x0), shape=list(x0.shape))

    ckpt = Checkpoint(checkpoint) if checkpoint else None
    start, x, history = 0, x0.clone(), []
    if ckpt is not None and ckpt.exists():
        if resume:
            ckpt.check(problem)
            saved = ckpt.load()
            start, x, history = saved.iteration, torch.from_numpy(saved.x).to(x0), saved.extra.get("history", [])
        elif not overwrite:
            raise DaskreconError(
                f"{checkpoint!r} already holds a checkpoint (iteration {ckpt.load().iteration}); "
                "pass resume=True to continue it or overwrite=True to start over"
            )
    client = ctx.client
    proc = prior.processing if prior is not None else denoiser
    den_args, den_kwargs = ((), {"sigma_denoiser": sigma_denoiser}) if prior is not None else ((sigma_denoiser,), {})
    den_method = "prox" if prior is not None else denoiser.method

    def denoise_placed(fut: Any, labels: dict | None = None) -> torch.Tensor:
        return proc.run_placed(fut, x0.shape, x0.dtype, den_method, den_args, den_kwargs, labels=labels).to(x0.device)

    bar = tqdm(total=n_iter, initial=start, disable=not progress, desc=f"{algorithm.upper()}", unit="it")
    try:
        for k in range(start, n_iter):
            with span(f"daskrecon-iteration-{k + 1}"):
                # x goes to the cluster once; x − τ∇f is formed there and denoised there.
                x_fut = place(client, x.detach().cpu().numpy())
                if algorithm == "pnp":
                    z_fut, value_fut, labels = fidelity.step(x_fut, y, physics, step_size)
                    x_new = denoise_placed(z_fut, labels)
                    value = float(gather_arrays(client, [value_fut], "data fidelity", labels=labels,
                                                stall_timeout=ctx.stall_timeout)[0])
                else:
                    # RED needs D(x) assembled on the driver anyway: combine there, one gather of [∇f, f].
                    denoised = denoise_placed(x_fut)
                    grad, value = fidelity.grad_and_value(x_fut, y, physics, x.shape)
                    x_new = x - step_size * (grad.to(x) + red_weight * (x - denoised))
            change = float(torch.linalg.vector_norm(x_new - x) / max(float(torch.linalg.vector_norm(x)), 1e-12))
            x = x_new
            row = {"iteration": k + 1, "data_fidelity": value, "relative_change": change}
            if x_true is not None:
                row["psnr"] = psnr(x, x_true)
            history.append(row)
            if ckpt is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == n_iter):
                ckpt.save(k + 1, x.cpu().numpy(), problem, {"history": history})
            bar.set_postfix({k_: (f"{v:.4g}" if isinstance(v, float) else v) for k_, v in row.items() if k_ != "iteration"})
            bar.update(1)
            if callback is not None:
                callback(k + 1, x)
    finally:
        bar.close()
    return (x, history) if return_history else x
