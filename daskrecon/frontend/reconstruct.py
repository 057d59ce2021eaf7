"""`reconstruct()`: plug-and-play reconstructions on the cluster, in memory or out of core, with checkpoints.

The problem is planned once (:mod:`daskrecon.engine.problem`), the algorithm is a step rule
(:mod:`daskrecon.engine.algorithms`) and every iteration is one Dask graph run by the engine
(:mod:`daskrecon.engine.loop`). Tensors in, tensor out; dask arrays in, dask array out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np
import torch
from deepinv.optim.data_fidelity import L2
from deepinv.utils import TensorList

from daskrecon.engine import iteration as graph
from daskrecon.engine import loop as engine
from daskrecon.engine.algorithms import ALGORITHMS, StepRule, step_rule
from daskrecon.engine.checkpoint import Checkpoint
from daskrecon.engine.linsolve import Workspace, lipschitz
from daskrecon.engine.options import ReconstructOptions
from daskrecon.engine.problem import Denoising, Problem, plan, with_precision
from daskrecon.engine.signal import DistributedSignal
from daskrecon.errors import MeasurementError
from daskrecon.frontend.context import one_context
from daskrecon.frontend.fidelity import DistributedDataFidelity
from daskrecon.frontend.measurements import DistributedMeasurements
from daskrecon.frontend.physics import DistributedPhysics
from daskrecon.frontend.processing import DistributedPrior, DistributedProcessing
from daskrecon.frontend.xarrays import is_dataarray, unwrap, wrap
from daskrecon.planning.schedules import as_schedule
from daskrecon.runtime.arrays import convert_hint
from daskrecon.runtime.waiting import compute, gather
from daskrecon.tasks import operators as operator_tasks
from daskrecon.tasks.substitutes import FFTConvolution, specialize

__all__ = ["ALGORITHMS", "default_step_size", "plan_problem", "reconstruct", "step_size_bound"]


def reconstruct(
    physics: DistributedPhysics,
    y: Any,
    denoiser: DistributedProcessing | DistributedPrior | None,
    *,
    data_fidelity: DistributedDataFidelity | None = None,
    algorithm: str | StepRule | None = None,
    n_iter: int | None = None,
    step_size: float | Sequence[float] | None = None,
    sigma_denoiser: float | Sequence[float] | None = None,
    red_weight: float | None = None,
    x0: torch.Tensor | da.Array | None = None,
    checkpoint: str | None = None,
    scratch: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callable[[int, DistributedSignal], Any] | None = None,
    progress: bool | None = None,
    x_true: torch.Tensor | da.Array | None = None,
    return_history: bool = False,
    storage: str | None = None,
    chunks: tuple[int, int] | None = None,
    tol: float | None = None,
    max_time: float | None = None,
    n_subsets: int | None = None,
    seed: int | None = None,
    cg_max_iter: int | None = None,
    cg_tol: float | None = None,
    prox_solver: str | None = None,
    precision: str | None = None,
    precision_tol: float | None = None,
) -> torch.Tensor | da.Array | tuple[torch.Tensor | da.Array, list[dict]]:
    """Solve ``min_x Σ_i d_i(A_i x, y_i) + prior(x)`` with a plug-and-play algorithm.

    (``algorithm``, ``n_iter``, ``sigma_denoiser``, ``red_weight``, ``storage``,
    ``checkpoint_every``, ``progress``, ``cg_max_iter``, ``cg_tol`` and ``prox_solver`` default
    to ``None``: the configured value, ``daskrecon.reconstruct.*`` in ``dask.config`` — the
    defaults below unless set; see ``docs/configuration.md``.)

    Parameters
    ----------
    physics : DistributedPhysics
        From :func:`daskrecon.frontend.distribute`.
    y : TensorList, list of tensors or dask arrays, or DistributedMeasurements
        One measurement per operator. ``xarray.DataArray`` entries (numpy- or dask-backed, in
        deepinv's axis order whatever their dims' names) give a ``DataArray`` result with the
        dims, attributes and coordinates of ``x0`` if it is one, else of the first of them
        (coordinates along an axis whose size the operators change are dropped).
    denoiser : DistributedProcessing or DistributedPrior or None
        A distributed denoiser (its ``prox`` for a prior). ``None`` for ``"mlem"``,
        ``"osem"`` and ``"bsrem"`` without a prior, and for ``"sirt"``.
    data_fidelity : DistributedDataFidelity, optional
        Default: ``L2()`` on every operator.
    algorithm : {"pnp", "red", "fista", "fista-red", "hqs", "admm", "os-pnp", "svrg", "mlem", "osem", "sirt", "bsrem"} or StepRule
        ``"pnp"``: proximal gradient ``x ← D_σ(x − τ ∇f(x))``. ``"red"``: gradient descent on
        ``f + λ·RED``: ``x ← x − τ (∇f(x) + λ (x − D_σ(x)))``. ``"fista"``: accelerated
        proximal gradient with the same prior, deepinv's ``FISTA`` iteration
        (:class:`daskrecon.engine.algorithms.FISTA`; its state, ``x`` and the extrapolated ``z``,
        is checkpointed whole); ``"fista-red"`` the same momentum with RED's gradient step
        (:class:`~daskrecon.engine.algorithms.FISTARED`). ``"hqs"`` / ``"admm"``: splitting methods whose data-term
        prox is a conjugate gradient on the cluster (L2 fidelity; ``τ`` is their ``γ``;
        :class:`~daskrecon.engine.algorithms.HQS`, :class:`~daskrecon.engine.algorithms.ADMM`).
        ``"os-pnp"`` / ``"svrg"``: one subset of the operators per iteration (ordered
        subsets; variance-reduced), ``n_subsets`` subsets visited in an order drawn from
        ``seed`` (:class:`~daskrecon.engine.algorithms.OSPnP`, :class:`~daskrecon.engine.algorithms.SVRG`).
        ``"mlem"`` / ``"osem"``: expectation maximization for Poisson data (Richardson–Lucy
        for blurs; ordered subsets), positive and with no step size, from ones by default;
        with a denoiser, the one-step-late prior term ``λ (u − D_σ(u))``, ``λ`` the
        ``red_weight`` (:class:`~daskrecon.engine.algorithms.MLEM`,
        :class:`~daskrecon.engine.algorithms.OSEM`). ``"sirt"``: the CT workhorse, row- and
        column-normalized residual steps, ``τ`` default 1, no prior
        (:class:`~daskrecon.engine.algorithms.SIRT`). ``"bsrem"``: block sequential regularized EM,
        deepinv's convergent relaxed OSEM, ``n_subsets`` subsets in a fixed order, ``τ`` the relaxation
        (default 1), with a distributed prior's gradient (e.g. ``deepinv.optim.RDP``, the
        relative-difference prior) or RED's for a denoiser, weight ``red_weight``
        (:class:`~daskrecon.engine.algorithms.BSREM`).
        A :class:`~daskrecon.engine.algorithms.StepRule` instance runs as given (its own step size
        and options).
    n_iter : int
        Iterations in total (a resumed run continues up to ``n_iter``).
    step_size : float or sequence of float, optional
        ``τ``; default ``1 / L`` with ``L`` the Lipschitz constant of ``∇f``
        (:func:`default_step_size`: exact by a distributed power method, computed once and
        cached with the physics; a closed-form bound for out-of-core problems whose operators
        all have one). A sequence gives one value per iteration (at least ``n_iter``), as
        deepinv's ``params_algo`` lists: ``step_size[k]`` at iteration ``k`` (from 0).
    sigma_denoiser : float or sequence of float
        Noise level given to the denoiser; a sequence, one per iteration like ``step_size``
        (DPIR's decreasing schedule: ``deepinv.optim.dpir.get_DPIR_params``). A checkpoint records
        the schedules: a resumed run continues them.
    red_weight : float
        ``λ`` of RED and FISTA-RED.
    x0 : torch.Tensor or dask array, optional
        Start; default ``Aᵀy / N``, computed on the workers.
    checkpoint : str, optional
        A directory or fsspec URL; the algorithm's state is committed there every
        ``checkpoint_every`` iterations (crash-safe: see :mod:`daskrecon.engine.checkpoint`). It must
        be new, empty or a daskrecon checkpoint: a folder of other files is refused unless
        ``overwrite=True``, and even then none of them is changed. The driver and every
        worker must see it (a shared file system or an fsspec URL): checked before the first
        write (:class:`~daskrecon.errors.StorageNotSharedError` otherwise).
    scratch : str, optional
        A folder (or fsspec URL) under which an out-of-core run without ``checkpoint`` keeps its
        iterate, and the power method of the default step size its vectors: a new folder is
        made there and checked to be seen by every worker. Default: the driver's temporary
        directory (``tempfile.gettempdir()``), which workers on other machines do not see —
        such a run is refused with a message naming them, never run on storage they miss.
    resume : bool
        Continue from the last commit of ``checkpoint``. The final result is bitwise the
        one of an uninterrupted run. A checkpoint of another problem is refused with the list
        of what differs.
    overwrite : bool
        Allow starting over (``resume=False``) in a directory that holds a checkpoint, or
        writing into a folder that holds other files (they are left unchanged).
    callback : callable, optional
        ``callback(iteration, x)`` after each completed iteration (1-based); ``x`` is the
        iterate's :class:`~daskrecon.engine.signal.DistributedSignal` (``x.data`` is a tensor when
        small, ``x.array`` the dask array). Without one, PnP, RED and FISTA pipeline their
        iterations (iteration k + 1 is submitted before iteration k's metrics are back; same
        results); with one, each iteration is reported before the next is submitted.
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
    chunks : (int, int) or (int, int, int), optional
        Chunk height and width of the iterate (depth, height and width for a
        ``(B, C, D, H, W)`` volume). Default: planned from the problem alone
        (:func:`daskrecon.planning.chunking.plan_chunks`: whole denoiser tiles, large chunks, a small
        image in one piece), or a dask ``x0``'s. Results do not depend on the cluster.
    tol : float, optional
        Stopping rule: stop after the first iteration whose relative change is at most ``tol``
        (``n_iter`` stays the cap). The relative change is deepinv's residual criterion
        (``thres_conv`` with ``crit_conv="residual"``): ``‖x_k − x_{k+1}‖ / (‖x_{k+1}‖ + 1e-6)`` per batch
        element, averaged over the batch. deepinv checks it from its third iteration on; daskrecon
        from the first.
    max_time : float, optional
        Stopping rule: a wall-clock budget in seconds; no iteration starts once it is spent
        (at least one runs). With ``checkpoint``, the state at the stop is committed, and
        ``resume=True`` continues from it.
    n_subsets : int, optional
        Operator subsets of ``"os-pnp"`` and ``"svrg"`` (required for them).
    seed : int, optional
        Seed of the subset schedule; default the context's ``seed`` (0 without one). The
        schedule depends on it and the iteration number only: results are bitwise the same
        on any number of workers and after a resume.
    cg_max_iter, cg_tol : int, float
        Conjugate gradient of ``"hqs"`` and ``"admm"``: at most ``cg_max_iter`` iterations,
        until the residual falls by ``cg_tol``. Their history rows add ``"cg_iterations"``
        and ``"cg_residual"``.
    prox_solver : {"auto", "cg", "fourier"}
        How ``"hqs"`` and ``"admm"`` solve the data prox: ``"auto"`` in closed form (one FFT,
        no iterations) when every operator is a circular convolution and the image's FFT
        fits a worker, by conjugate gradient otherwise; ``"cg"`` always iterates;
        ``"fourier"`` insists (a ``ValueError`` names the operator that prevents it).
    precision : {"fp32", "bf16", "fp16", "auto"}, optional
        What the denoiser's tiles run in for this run (default: the denoiser's own
        ``precision``, fp32 unless set); the data term, the tree, the step and the metrics stay
        fp32. A reduced precision is probed first on a window of the start, against fp32, on a
        worker (:mod:`daskrecon.planning.precision`): over ``precision_tol`` an asked-for one is
        refused (:class:`~daskrecon.errors.PrecisionError`), ``"auto"`` falls back to fp32
        with a warning. The history rows then add ``"precision"``, ``"precision_max_error"``
        and ``"precision_rel_error"``; a checkpoint resumes only in the precision it was made
        in. Bitwise the same on any number of workers within a precision.
    precision_tol : float, optional
        Largest relative L2 error of the probe against fp32 (default: the denoiser's, 2e-2).

    Returns
    -------
    x : torch.Tensor or dask.array.Array
        The last iterate: a tensor when the inputs were tensors, else a dask array (in
        cluster memory, or reading the last committed Zarr slot).
    history : list of dict
        Only with ``return_history=True``: one dict per iteration since the start (a
        resumed run includes the checkpointed ones), with ``"iteration"`` (1-based),
        ``"data_fidelity"`` (``f(x)`` at the start of the iteration), ``"relative_change"``
        (``‖x_k − x_{k+1}‖ / (‖x_{k+1}‖ + 1e-6)``, per batch element, averaged; see ``tol``) and, with
        ``x_true``, ``"psnr"`` (of ``x_{k+1}`` clipped to [0, 1], peak 1, the mean squared error taken over
        the whole batch: the image as displayed; deepinv's ``PSNR`` metric does not clip); the last row
        of a run ended by a stopping rule has ``"stop"`` (``"tol"`` or ``"max_time"``).

    Notes
    -----
    Every iteration is one Dask graph, computed once: per-operator gradient tasks next to
    their operators (or chunk by chunk for operators with a chunk-wise form,
    :mod:`daskrecon.operators.chunkwise`), summed along a tree fixed by operator index, the step, the
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
    opts = ReconstructOptions(  # checked here, once, before any pass over the inputs; handed on whole
        algorithm=algorithm, n_iter=n_iter, step_size=step_size, sigma_denoiser=sigma_denoiser, red_weight=red_weight,
        n_subsets=n_subsets, seed=seed, cg_max_iter=cg_max_iter, cg_tol=cg_tol, prox_solver=prox_solver,
        storage=storage, chunks=chunks, checkpoint=checkpoint, scratch=scratch, checkpoint_every=checkpoint_every,
        resume=resume, overwrite=overwrite, progress=progress, tol=tol, max_time=max_time, precision=precision,
        precision_tol=precision_tol)
    template = next((v for v in [x0, *(y if isinstance(y, (list, tuple)) else [y])] if is_dataarray(v)), None)
    if template is not None:  # xarray in: computed by position, the result wrapped like the template
        y = [unwrap(v, f"y[{i}]") for i, v in enumerate(y)] if isinstance(y, (list, tuple)) else unwrap(y, "y")
        x0, x_true = unwrap(x0, "x0"), unwrap(x_true, "x_true")
    kind = opts.algorithm if isinstance(opts.algorithm, StepRule) else ALGORITHMS.get(opts.algorithm)
    if denoiser is None and not (kind is not None and kind.prior_optional):
        raise TypeError(f"algorithm {opts.algorithm!r} needs a denoiser: dr.distribute(denoiser, ctx); only "
                        f"{', '.join(repr(k) for k, c in ALGORITHMS.items() if c.prior_optional)} run without one")
    problem, x0_arr = plan_problem(physics, y, denoiser, data_fidelity=data_fidelity, x0=x0, x_true=x_true,
                                   sigma_denoiser=opts.sigma_denoiser, storage=opts.storage, chunks=opts.chunks)
    problem = _in_precision(problem, x0_arr, opts)
    store = engine.open_checkpoint(problem.ctx, opts)  # after every check of the inputs, before any write
    if isinstance(opts.algorithm, StepRule):
        rule = opts.algorithm
    else:
        tau = opts.step_size if opts.step_size is not None or not kind.uses_step_size else \
            default_step_size(problem, store=store, scratch=opts.scratch)
        rule = step_rule(opts.algorithm, tau or 1.0, red_weight=opts.red_weight, n_subsets=opts.n_subsets,
                         seed=problem.ctx.seed if opts.seed is None else opts.seed, cg_max_iter=opts.cg_max_iter,
                         cg_tol=opts.cg_tol, prox_solver=opts.prox_solver)
    if x0 is None and rule.initial(problem) is not None:  # the rule's own start (EM: ones), not Aᵀy / N
        start = rule.initial
    else:
        start = x0_arr if x0_arr is not None else (lambda p: graph.adjoint_sum(p, scale=1.0 / p.num_operators))
    signals, history = engine.run(problem, rule, start, opts, store=store, callback=callback)
    x = signals["x"].array
    temporary = signals["x"].store if store is None else None  # out of core without a checkpoint: the run's own
    if _tensor_inputs(y, x0):
        ctx = problem.ctx
        x = torch.from_numpy(np.asarray(compute([x], client=ctx.client, what="the result",
                                                stall_timeout=ctx.stall_timeout)[0])).to(ctx.device)
        if temporary is not None:
            temporary.remove()  # the tensor holds the result: nothing reads the folder any more
    elif temporary is not None:
        warnings.warn(f"no checkpoint given: the out-of-core iterate (two slots of {problem.nbytes / 2**30:.2f} GiB) "
                      f"is kept in {temporary.url}, which the result reads from; pass checkpoint=… to choose the "
                      "place, and delete it when done", UserWarning, stacklevel=2)
    if template is not None:
        x = wrap(x, template)
    return (x, history) if return_history else x


def plan_problem(physics: DistributedPhysics, y: Any, denoiser: DistributedProcessing | DistributedPrior, *,
                 data_fidelity: DistributedDataFidelity | None, x0: Any, x_true: Any, sigma_denoiser: float | Sequence[float] | None,
                 storage: str = "auto", chunks: Any = None) -> tuple[Problem, da.Array | None]:
    """Check the objects :func:`reconstruct` was given, then plan the problem (:func:`daskrecon.engine.problem.plan`).

    The engine takes the denoiser as a :class:`~daskrecon.engine.problem.Denoising` (a
    prior's ``prox`` with ``sigma_denoiser``, or the denoiser's own method with ``sigma``),
    the fidelity (default: ``L2()`` on every operator) and one measurement per operator.
    """
    if not isinstance(physics, DistributedPhysics):
        raise TypeError("physics must be a DistributedPhysics: dr.distribute(physics, ctx)")
    sigmas = as_schedule(0.0 if sigma_denoiser is None else sigma_denoiser, "sigma_denoiser", positive=False)
    if denoiser is None:
        denoising = Denoising(None, "", (), {}, sigmas)
    elif isinstance(denoiser, DistributedPrior):
        denoising = Denoising(denoiser.processing, "prox", (), {"sigma_denoiser": sigmas[0]}, sigmas, "sigma_denoiser")
    elif isinstance(denoiser, DistributedProcessing):
        denoising = Denoising(denoiser, denoiser.method, (sigmas[0],), {}, sigmas)
    else:
        raise TypeError("denoiser must be a DistributedProcessing or DistributedPrior: dr.distribute(denoiser, ctx)")
    if data_fidelity is not None and not isinstance(data_fidelity, DistributedDataFidelity):
        raise TypeError(f"data_fidelity must be a DistributedDataFidelity: dr.distribute(data_fidelity, ctx) "
                        f"(e.g. deepinv.optim.L2()), got {type(data_fidelity).__name__}")
    if denoising.processing is not None:
        denoising.processing.warn_training_mode()
    one_context(physics=physics.ctx, **({} if denoising.processing is None else {"denoiser": denoising.processing.ctx}),
                **({} if data_fidelity is None else {"data_fidelity": data_fidelity.ctx}),
                **({"y": y.ctx} if isinstance(y, DistributedMeasurements) else {}))
    fidelity = data_fidelity or DistributedDataFidelity(physics.ctx, L2())
    return plan(physics, _entries(y, physics.num_operators), denoising, fidelity, x0=x0, x_true=x_true,
                storage=storage, chunks=chunks)


def _in_precision(problem: Problem, x0: da.Array | None, opts: ReconstructOptions) -> Problem:
    """``problem`` with its denoiser's precision chosen: probed on a window of the start when not fp32."""
    proc = problem.denoiser
    requested = None if proc is None else opts.precision or proc.precision
    if requested is None or requested == "fp32":
        return problem
    start = x0 if x0 is not None else graph.adjoint_sum(problem, scale=1.0 / problem.num_operators)
    report = proc.resolve_precision(start, problem.denoise_method, problem.denoise_args, problem.denoise_kwargs,
                                    precision=requested, tol=opts.precision_tol)
    return with_precision(problem, report)


def _entries(y: Any, n: int) -> list:
    """One measurement per operator: tensors, dask arrays, or the futures of DistributedMeasurements."""
    if isinstance(y, DistributedMeasurements):
        if len(y) != n:
            raise MeasurementError(f"y has {len(y)} measurements but the physics has {n} operators")
        return list(y.futures)
    if isinstance(y, torch.Tensor):
        y = [y]
    if not isinstance(y, (TensorList, list, tuple)):
        raise TypeError(f"y must be a TensorList, a list of tensors or dask arrays, or DistributedMeasurements, "
                        f"got {type(y).__name__}")
    ys = [y[i] for i in range(len(y))]
    if len(ys) != n:
        raise MeasurementError(f"y has {len(ys)} entries but the physics has {n} operators")
    for i, v in enumerate(ys):
        if not isinstance(v, (torch.Tensor, da.Array)):
            raise TypeError(f"y[{i}] must be a torch.Tensor or a dask array, got {type(v).__name__}{convert_hint(v)}")
    return ys


def default_step_size(problem: Problem, *, store: Checkpoint | None = None, scratch: str | None = None) -> float:
    """``1 / L``, ``L`` the Lipschitz constant of the data term's gradient.

    In memory (and for operators without a closed-form norm): ``L = scale · ‖Σ_i A_iᵀA_i / σ_i²‖``
    by the distributed power method (:func:`daskrecon.engine.linsolve.lipschitz`), cached with the
    physics. Out of core, when every operator has a closed-form norm, the bound of
    :func:`step_size_bound` (no extra pass over a volume larger than the cluster).

    Out of core, the power method's vectors live in ``store`` (the run's checkpoint) when
    given, else in a new folder under ``scratch`` (see :func:`reconstruct`); removed after.
    """
    if problem.storage == "zarr" and all(f is not None for f in problem.forms):
        return 1.0 / step_size_bound(problem)
    fids = [problem.fidelity.source(i) for i in range(problem.num_operators)]
    if not all(isinstance(f, L2) for f in fids):  # not quadratic: no normal operator, the per-operator bound
        return 1.0 / step_size_bound(problem)
    if problem.storage != "zarr":
        return 1.0 / lipschitz(problem, Workspace(problem))
    why = "the power method of the default step size keeps image-sized vectors there"
    where = store.child("scratch_power") if store is not None else Checkpoint.temporary(
        problem.ctx, scratch, prefix="daskrecon-power-", why=why)
    try:
        return 1.0 / lipschitz(problem, Workspace(problem, where, streamed=True))
    finally:
        where.remove()


def step_size_bound(problem: Problem) -> float:
    """An upper bound ``L`` of the data term's Lipschitz constant: ``scale · Σ_i ‖A_i‖² / σ_i²``.

    Chunk-wise operators give ``‖A_i‖²`` in closed form (:meth:`LocalOperator.norm_bound`),
    as do circular blurs with a non-negative kernel that sums to one (``‖A_i‖ = 1``); the
    others run their own power method on their worker, from a vector made there. ``σ_i`` is
    the noise level of an ``L2(sigma)`` fidelity (1 for others).
    """
    ctx, physics = problem.ctx, problem.physics
    weights = [float(getattr(f, "norm", 1.0)) if isinstance(f, L2) else 1.0
               for f in (problem.fidelity.source(i) for i in range(problem.num_operators))]
    bound, pending = 0.0, []
    for i, form in enumerate(problem.forms):
        if form is not None:
            bound += weights[i] * form.norm_bound(problem.shape)
        elif _normalized_circular_blur(physics, i):
            bound += weights[i]
        else:
            pending.append(i)
    if pending:
        futs = physics.placement.map(operator_tasks.sqnorm_from_shape, objects=[physics.objects],
                                     shared=(problem.shape, str(problem.dtype), 50, 1e-3), indices=pending)
        labels = physics.placement.labels(futs, pending)
        norms = gather(ctx.client, futs, what="operator norm", labels=labels, stall_timeout=ctx.stall_timeout)
        bound += sum(weights[i] * float(v) for i, v in zip(pending, norms))
    return bound * problem.scale


def _normalized_circular_blur(physics: DistributedPhysics, i: int) -> bool:
    """A circular blur whose non-negative kernel sums to 1 has ``‖A‖ = 1`` exactly."""
    src = physics.sources[i]
    if not (isinstance(src, torch.nn.Module) and isinstance(specialize(src), FFTConvolution)):
        return False
    f = src.filter.detach()
    return bool((f >= 0).all()) and bool(torch.allclose(f.sum(dim=(-2, -1)), torch.ones(()), atol=1e-5))


def _tensor_inputs(y: Any, x0: Any) -> bool:
    if isinstance(x0, da.Array):
        return False
    entries = y if isinstance(y, (list, tuple)) else [y]
    return not any(isinstance(v, da.Array) for v in entries)

