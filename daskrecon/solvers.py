"""`reconstruct()`: plug-and-play reconstructions on the cluster, in memory or out of core, with checkpoints.

The problem is planned once (:mod:`daskrecon.problem`), the algorithm is a step rule
(:mod:`daskrecon.algorithms`) and every iteration is one Dask graph run by the engine
(:mod:`daskrecon.engine`). Tensors in, tensor out; dask arrays in, dask array out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np
import torch

from daskrecon import engine, graph
from daskrecon.algorithms import ALGORITHMS, step_rule
from daskrecon.fidelity import DistributedDataFidelity
from daskrecon.operators import FFTConvolution, specialize
from daskrecon.physics import DistributedPhysics
from daskrecon.problem import Problem, plan_problem
from daskrecon.processing import DistributedPrior, DistributedProcessing
from daskrecon.signal import DistributedSignal
from daskrecon.tasks import operators as operator_tasks
from daskrecon.waiting import compute, gather

__all__ = ["ALGORITHMS", "reconstruct", "step_size_bound"]


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
    x0: torch.Tensor | da.Array | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callable[[int, DistributedSignal], Any] | None = None,
    progress: bool = True,
    x_true: torch.Tensor | da.Array | None = None,
    return_history: bool = False,
    storage: str = "auto",
    chunks: tuple[int, int] | None = None,
    tol: float | None = None,
    max_time: float | None = None,
) -> torch.Tensor | da.Array | tuple[torch.Tensor | da.Array, list[dict]]:
    """Solve ``min_x Σ_i d_i(A_i x, y_i) + prior(x)`` with a plug-and-play algorithm.

    Parameters
    ----------
    physics : DistributedPhysics
        From :func:`daskrecon.distribute`.
    y : TensorList, list of tensors or dask arrays, or DistributedMeasurements
        One measurement per operator.
    denoiser : DistributedProcessing or DistributedPrior
        A distributed denoiser (its ``prox`` for a prior).
    data_fidelity : DistributedDataFidelity, optional
        Default: ``L2()`` on every operator.
    algorithm : {"pnp", "red", "fista"}
        ``"pnp"``: proximal gradient ``x ← D_σ(x − τ ∇f(x))``. ``"red"``: gradient descent on
        ``f + λ·RED``: ``x ← x − τ (∇f(x) + λ (x − D_σ(x)))``. ``"fista"``: accelerated
        proximal gradient with the same prior, deepinv's ``FISTA`` iteration
        (:class:`daskrecon.algorithms.FISTA`; its state, ``x`` and the extrapolated ``z``,
        is checkpointed whole).
    n_iter : int
        Iterations in total (a resumed run continues up to ``n_iter``).
    step_size : float, optional
        ``τ``; default ``1 / L`` with ``L`` an upper bound of ``‖A‖²`` (:func:`step_size_bound`).
    sigma_denoiser : float
        Noise level given to the denoiser.
    red_weight : float
        ``λ`` of RED.
    x0 : torch.Tensor or dask array, optional
        Start; default ``Aᵀy / N``, computed on the workers.
    checkpoint : str, optional
        A directory or fsspec URL; the algorithm's state is committed there every
        ``checkpoint_every`` iterations (crash-safe: see :mod:`daskrecon.checkpoint`).
    resume : bool
        Continue from the last commit of ``checkpoint``. The final result is bitwise the
        one of an uninterrupted run. A checkpoint of another problem is refused with the list
        of what differs.
    overwrite : bool
        Allow starting over (``resume=False``) in a directory that holds a checkpoint.
    callback : callable, optional
        ``callback(iteration, x)`` after each completed iteration (1-based); ``x`` is the
        iterate's :class:`~daskrecon.signal.DistributedSignal` (``x.data`` is a tensor when
        small, ``x.array`` the dask array).
    progress : bool
        Show a progress bar with the data-fidelity value ``f(x)`` at the start of each
        iteration, the relative change and, with ``x_true``, the PSNR.
    x_true : torch.Tensor or dask array, optional
        Ground truth, for the PSNR only.
    return_history : bool
        Also return the per-iteration metrics.
    storage : {"auto", "memory", "zarr"}
        Where the iterate lives: in cluster memory, or streamed from one Zarr slot to the
        other. ``"auto"``: in memory when several copies of it fit comfortably in the workers'
        total memory limit, else Zarr.
    chunks : (int, int), optional
        Chunk height and width of the iterate. Default: planned from the problem alone
        (:func:`daskrecon.chunking.plan_chunks`: whole denoiser tiles, large chunks, a small
        image in one piece), or a dask ``x0``'s. Results do not depend on the cluster.
    tol : float, optional
        Stopping rule: stop after the first iteration whose relative change
        ``‖x_{k+1} − x_k‖ / ‖x_k‖`` is at most ``tol`` (``n_iter`` stays the cap).
    max_time : float, optional
        Stopping rule: a wall-clock budget in seconds; no iteration starts once it is spent
        (at least one runs). With ``checkpoint``, the state at the stop is committed, and
        ``resume=True`` continues from it.

    Returns
    -------
    x : torch.Tensor or dask.array.Array
        The last iterate: a tensor when the inputs were tensors, else a dask array (in
        cluster memory, or reading the last committed Zarr slot).
    history : list of dict
        Only with ``return_history=True``: one dict per iteration since the start (a
        resumed run includes the checkpointed ones), with ``"iteration"`` (1-based),
        ``"data_fidelity"`` (``f(x)`` at the start of the iteration), ``"relative_change"``
        (``‖x_{k+1} − x_k‖ / ‖x_k‖``) and, with ``x_true``, ``"psnr"``; the last row of a
        run ended by a stopping rule has ``"stop"`` (``"tol"`` or ``"max_time"``).

    Notes
    -----
    Every iteration is one Dask graph, computed once: per-operator gradient tasks next to
    their operators (or chunk by chunk for operators with a chunk-wise form,
    :mod:`daskrecon.local`), summed along a tree fixed by operator index, the step, the
    tiled denoiser (``map_overlap``) and the metrics. The iterate never travels to the
    driver: it stays in cluster memory, or — when it does not fit, e.g. ``da.from_zarr``
    inputs larger than the cluster — streams from one slot of a Zarr checkpoint to the
    other, committed atomically. Without ``checkpoint`` that store is a new temporary
    directory, named in a ``UserWarning`` and left in place (the result reads from it).
    The result is bitwise the same on any number of workers and in either storage.

    Raises
    ------
    ValueError
        Non-finite values in ``y`` or ``x0``; ``y`` of the wrong length; an unknown
        algorithm; a checkpoint of another problem (:class:`CheckpointMismatchError`).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {algorithm!r}")
    if not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative int, got {n_iter!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    engine.check_stopping(tol, max_time)  # before the problem is planned (one pass over the inputs)
    problem, x0_arr = plan_problem(physics, y, denoiser, data_fidelity=data_fidelity, x0=x0, x_true=x_true,
                                   sigma_denoiser=sigma_denoiser, storage=storage, chunks=chunks)
    if step_size is None:
        step_size = 1.0 / step_size_bound(problem)
    rule = step_rule(algorithm, step_size, red_weight=red_weight)
    start = x0_arr if x0_arr is not None else (lambda: graph.adjoint_sum(problem, scale=1.0 / problem.num_operators))
    signals, history = engine.run(problem, rule, start, n_iter=n_iter, checkpoint=checkpoint,
                                  checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite,
                                  callback=callback, progress=progress, tol=tol, max_time=max_time)
    x = signals["x"].array
    if _tensor_inputs(y, x0):
        ctx = problem.ctx
        x = torch.from_numpy(np.asarray(compute([x], client=ctx.client, what="the result",
                                                stall_timeout=ctx.stall_timeout)[0])).to(ctx.device)
    return (x, history) if return_history else x


def step_size_bound(problem: Problem) -> float:
    """An upper bound ``L`` of the data term's Lipschitz constant: ``scale · Σ_i ‖A_i‖²``.

    Chunk-wise operators give ``‖A_i‖²`` in closed form (:meth:`LocalOperator.norm_bound`),
    as do circular blurs with a non-negative kernel that sums to one (``‖A_i‖ = 1``); the
    others run their own power method on their worker, from a vector made there.
    """
    ctx, physics = problem.ctx, problem.physics
    bound, pending = 0.0, []
    for i, form in enumerate(problem.forms):
        if form is not None:
            bound += form.norm_bound()
        elif _normalized_circular_blur(physics, i):
            bound += 1.0
        else:
            pending.append(i)
    if pending:
        futs = physics.placement.map(operator_tasks.sqnorm_from_shape, objects=[physics.objects],
                                     shared=(problem.shape, str(problem.dtype), 50, 1e-3), indices=pending)
        labels = physics.placement.labels(futs, pending)
        bound += float(sum(gather(ctx.client, futs, what="operator norm", labels=labels,
                                  stall_timeout=ctx.stall_timeout)))
    return bound * problem.scale


def _normalized_circular_blur(physics: DistributedPhysics, i: int) -> bool:
    """A circular blur whose non-negative kernel sums to 1 has ``‖A‖ = 1`` exactly."""
    src = physics._sources[i]
    if not (isinstance(src, torch.nn.Module) and isinstance(specialize(src), FFTConvolution)):
        return False
    f = src.filter.detach()
    return bool((f >= 0).all()) and bool(torch.allclose(f.sum(dim=(-2, -1)), torch.ones(()), atol=1e-5))


def _tensor_inputs(y: Any, x0: Any) -> bool:
    if isinstance(x0, da.Array):
        return False
    entries = y if isinstance(y, (list, tuple)) else [y]
    return not any(isinstance(v, da.Array) for v in entries)

