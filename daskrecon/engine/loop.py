"""The one loop every algorithm runs on: one Dask graph per iteration, the iterate on the cluster.

Iteration ``k`` builds the step rule's graph (:mod:`daskrecon.engine.algorithms`) — per-operator
gradients next to their operators, the fixed-index tree, the step, the tiled denoiser,
the metrics — and submits it once, inside the Dask span ``daskrecon-iteration-k``. The
state arrays are :class:`~daskrecon.engine.signal.DistributedSignal` objects: persisted in cluster
memory, or streamed from one Zarr slot to the other when the problem does not fit the
cluster; the driver receives the metrics only. Progress, history, callbacks, checkpoints
and resume live here, once, for every algorithm.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

from distributed import span
from tqdm.auto import tqdm

from daskrecon.engine.algorithms import StepRule
from daskrecon.engine.checkpoint import Checkpoint
from daskrecon.engine.linsolve import Workspace
from daskrecon.engine.problem import Problem, remove_staged_inputs, stage_inputs
from daskrecon.engine.signal import DistributedSignal, Pending, advance, submit
from daskrecon.errors import DaskreconError
from daskrecon.runtime.halos import Stager, rewind, staged

__all__ = ["check_stopping", "psnr", "psnr_of_mse", "run"]


def psnr(x: Any, ref: Any) -> float:
    """PSNR in dB of ``x`` (clipped to [0, 1]) against ``ref`` (tensors)."""
    return psnr_of_mse(((x.clamp(0, 1) - ref) ** 2).mean().item())


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a [0, 1] signal with mean squared error ``mse``."""
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def check_stopping(tol: float | None, max_time: float | None) -> None:
    """Raise ``ValueError`` for a negative ``tol`` or a non-positive ``max_time``."""
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if max_time is not None and not max_time > 0:
        raise ValueError(f"max_time must be > 0 seconds, got {max_time!r}")


def run(
    problem: Problem,
    rule: StepRule,
    x0: Any,
    *,
    n_iter: int,
    checkpoint: str | Checkpoint | None = None,
    scratch: str | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callable[[int, DistributedSignal], Any] | None = None,
    progress: bool = True,
    tol: float | None = None,
    max_time: float | None = None,
) -> tuple[dict[str, DistributedSignal], list[dict]]:
    """Run ``rule`` for ``n_iter`` iterations in total (a resumed run continues), or until a stopping rule.

    Parameters
    ----------
    problem : Problem
    rule : StepRule
    x0 : dask array or callable
        The start, or a function of the problem returning it lazily (called only when not resuming).
    n_iter : int
    checkpoint : str or Checkpoint, optional
        Directory or fsspec URL; the whole state is committed there every
        ``checkpoint_every`` iterations (every iteration when the state streams through Zarr).
        It must be new, empty or daskrecon's (else ``overwrite=True``), and every worker
        must see it (:mod:`daskrecon.runtime.storage`; checked before the first write).
    scratch : str, optional
        Where a state that streams through Zarr lives without a ``checkpoint``: a new folder
        under this one (default: the driver's temporary directory), checked to be seen by
        every worker.
    resume, overwrite : bool
        Continue the checkpoint's run, or start over in a directory that holds one.
    callback : callable, optional
        ``callback(iteration, x)`` after each iteration, ``x`` the iterate's
        :class:`~daskrecon.engine.signal.DistributedSignal` (its ``.data`` is a tensor when small).
        Without one, a rule with ``pipelined`` submits iteration k + 1 before iteration k's
        metrics are back (the same results).
    progress : bool
        A progress bar with the iteration's metrics.
    tol : float, optional
        Stop after the first iteration whose relative change ``‖x_{k+1} − x_k‖ / ‖x_k‖`` is
        at most ``tol``.
    max_time : float, optional
        Wall-clock budget in seconds for this call: no iteration starts once it is spent (at
        least one runs). The results do not depend on it, only how many iterations run.

    Returns
    -------
    state : dict of DistributedSignal
    history : list of dict
        One row per iteration; the last row of a run ended by a stopping rule has ``"stop"``
        (``"tol"`` or ``"max_time"``).
    """
    check_stopping(tol, max_time)
    t0 = time.monotonic()
    record = {**problem.record, **rule.settings()}
    store = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint) if checkpoint else None
    if store is not None:
        store.claim(overwrite=overwrite)
        store.ensure_shared(problem.ctx, why="the checkpoint, which the workers write")
    start, history = 0, []
    if store is not None and store.exists():
        if resume:
            store.check(record)
            meta = store.meta()
            start, history = meta["iteration"], list(meta.get("extra", {}).get("history", []))
        elif not overwrite:
            raise DaskreconError(f"{store.url!r} already holds a checkpoint (iteration {store.meta()['iteration']}); "
                                 "pass resume=True to continue it or overwrite=True to start over")
    streamed = problem.storage == "zarr"
    if streamed and store is None:
        # The iterate has to live somewhere larger than memory, and the result reads from it.
        store = Checkpoint.temporary(problem.ctx, scratch, why=f"the iterate streams through Zarr (two slots of "
                                     f"{problem.nbytes / 2**30:.2f} GiB) and no checkpoint was given")
        warnings.warn(f"no checkpoint given: the out-of-core iterate (two slots of {problem.nbytes / 2**30:.2f} GiB) "
                      f"is kept in {store.url}, which the result reads from; pass checkpoint=… to choose the place, "
                      "and delete it when done", UserWarning, stacklevel=3)
    if streamed:  # the driver's inputs are read from the store, not carried by every graph
        problem = stage_inputs(problem, store)
    rule.check(problem)
    # Out of core, stencils exchange halos through scratch Zarr arrays next to the state
    # (daskrecon.runtime.halos): no stage holds a front of chunks for the next.
    stager = Stager(store) if streamed else None
    try:
        with staged(stager):
            return _run(problem, rule, x0, store, streamed, start, history, record, t0, n_iter=n_iter,
                        checkpoint_every=checkpoint_every, callback=callback, progress=progress, tol=tol,
                        max_time=max_time)
    finally:
        if stager is not None:
            stager.cleanup()
            remove_staged_inputs(problem, store)


def _run(problem: Problem, rule: StepRule, x0: Any, store: Checkpoint | None, streamed: bool, start: int,
         history: list, record: dict, t0: float, *, n_iter: int, checkpoint_every: int, callback: Callable | None,
         progress: bool, tol: float | None, max_time: float | None) -> tuple[dict[str, DistributedSignal], list[dict]]:
    ctx = problem.ctx
    rule.prepare(problem, Workspace(problem, store, streamed))
    signals = {name: DistributedSignal(ctx, problem.shape, problem.dtype, store=store, chunks=problem.chunks,
                                       name=name, in_memory=not streamed) for name in rule.state}
    if start:
        for s in signals.values():
            s.restore()
    else:
        initial = rule.start(problem, x0(problem) if callable(x0) else x0)
        # The start is committed as iteration 0 when the state streams (it must live in the store).
        advance(signals, initial, iteration=0, commit=streamed, record=record, extra={"history": []})

    bar = tqdm(total=n_iter, initial=start, disable=not progress, desc=rule.name.upper(), unit="it")
    stop, committed = None, start
    # Pipelined: iteration k+1 is submitted before iteration k's metrics come back, so the
    # workers never wait for the driver's round trip. Only for steps that merely build a graph,
    # in cluster memory, without a callback (it is shown the iterate of its iteration).
    pipelined = rule.pipelined and not streamed and callback is None
    pending: tuple[Pending, Callable] | None = None  # submitted, not yet reported

    def report() -> bool:
        """Report the pending iteration, if any: history row, bar, callback; whether ``tol`` stops the run."""
        nonlocal committed, pending
        if pending is None:
            return False
        (submitted, extra), pending = pending, None
        values = submitted.finish()
        if submitted.commits:
            committed = submitted.iteration
        else:
            extra(values)
        row = history[-1]
        bar.set_postfix({key: f"{v:.4g}" for key, v in row.items() if isinstance(v, float)})
        bar.update(1)
        if callback is not None:
            callback(submitted.iteration, signals["x"])
        return tol is not None and row["relative_change"] <= tol

    try:
        for k in range(start, n_iter):
            if max_time is not None and k > start and time.monotonic() - t0 >= max_time:
                stop = "max_time"
                break
            commit = store is not None and (streamed or (k + 1) % checkpoint_every == 0 or k + 1 == n_iter)
            # A commit writes the store's free slot: never two in flight.
            if commit and report():
                stop = "tol"
                break
            if pending is not None:
                state = dict(pending[0].kept)
            else:
                state = {name: s.array for name, s in signals.items()}
            rewind(0)  # out of core: the graphs built before are computed; reuse their scratch arrays

            with span(f"daskrecon-iteration-{k + 1}"):
                new, value, metrics = rule.step(problem, state, k)
                info = rule.report()

                def extra(values: dict, k: int = k, info: dict = info) -> dict:
                    history.append({**_row(k + 1, values, problem), **info})
                    return {"history": history}

                submitted = submit(signals, new, iteration=k + 1, also={"value": value, "metrics": metrics},
                                   commit=commit, record=record, extra=extra)
            if report():  # the iteration before (pipelined): stopping here drops iteration k + 1
                stop = "tol"
                break
            pending = (submitted, extra)
            if not pipelined and report():
                stop = "tol"
                break
        if report():
            stop = "tol"
    finally:
        bar.close()
    if stop is not None and history:
        history[-1]["stop"] = stop
        done = history[-1]["iteration"]
        if store is not None and committed != done:
            # The run ends here: commit the last state (in memory, so no recomputation) with its history.
            advance(signals, {name: s.array for name, s in signals.items()}, iteration=done, commit=True,
                    record=record, extra={"history": history})
        elif store is not None:
            store.commit(done, store.meta()["slot"], record, {"history": history})
    return signals, history


def _row(iteration: int, values: dict, problem: Problem) -> dict:
    change2, norm2, err2, pixels = (float(v) for v in values["metrics"])
    row = {"iteration": iteration, "data_fidelity": float(values["value"]) * problem.scale,
           "relative_change": math.sqrt(change2) / max(math.sqrt(norm2), 1e-12)}
    if problem.truth is not None:
        row["psnr"] = psnr_of_mse(err2 / pixels)
    return row
