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

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from distributed import span
from tqdm.auto import tqdm

from daskrecon.engine.algorithms import StepRule
from daskrecon.engine.checkpoint import Checkpoint
from daskrecon.engine.linsolve import Workspace
from daskrecon.engine.options import ReconstructOptions
from daskrecon.engine.problem import Problem, remove_stored_inputs, store_inputs, with_stager
from daskrecon.engine.signal import DistributedSignal, Pending, advance, submit
from daskrecon.errors import DaskreconError
from daskrecon.planning.schedules import check_covers, value_at
from daskrecon.runtime.halos import Stager

__all__ = ["open_checkpoint", "psnr", "psnr_of_mse", "run"]


def psnr(x: Any, ref: Any) -> float:
    """PSNR in dB of ``x`` (clipped to [0, 1]) against ``ref`` (tensors)."""
    return psnr_of_mse(((x.clamp(0, 1) - ref) ** 2).mean().item())


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a [0, 1] signal with mean squared error ``mse``."""
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def run(problem: Problem, rule: StepRule, x0: Any, options: ReconstructOptions, *, store: Checkpoint | None = None,
        callback: Callable[[int, DistributedSignal], Any] | None = None) -> tuple[dict[str, DistributedSignal], list[dict]]:
    """Run ``rule`` for ``options.n_iter`` iterations in total (a resumed run continues), or until a stopping rule.

    Parameters
    ----------
    problem : Problem
    rule : StepRule
    x0 : dask array or callable
        The start, or a function of the problem returning it lazily (called only when not resuming).
    options : ReconstructOptions
        What this reads: ``n_iter``; ``checkpoint`` (a directory, an fsspec URL or a
        :class:`~daskrecon.engine.checkpoint.Checkpoint`: the whole state is committed there every
        ``checkpoint_every`` iterations, every iteration when it streams through Zarr; it must
        be new, empty or daskrecon's, else ``overwrite``, and every worker must see it), or
        ``scratch`` (where a state that streams lives without one: a new folder under it,
        default the driver's temporary directory, checked to be seen by every worker);
        ``resume`` / ``overwrite``; ``progress`` (a progress bar with the metrics); ``tol``
        (stop after the first iteration whose relative change, deepinv's residual criterion
        ``‖x_k − x_{k+1}‖ / (‖x_{k+1}‖ + 1e-6)`` per batch element averaged, is at most ``tol``); ``max_time`` (no iteration starts once this many seconds of this call
        are spent; at least one runs). The results never depend on them, only how many run.
    store : Checkpoint, optional
        ``options.checkpoint`` opened already (claimed and checked by the caller).
    callback : callable, optional
        ``callback(iteration, x)`` after each iteration, ``x`` the iterate's
        :class:`~daskrecon.engine.signal.DistributedSignal` (its ``.data`` is a tensor when small).
        Without one, a rule with ``pipelined`` submits iteration k + 1 before iteration k's
        metrics are back (the same results).

    Returns
    -------
    state : dict of DistributedSignal
    history : list of dict
        One row per iteration; the last row of a run ended by a stopping rule has ``"stop"``
        (``"tol"`` or ``"max_time"``).
    """
    t0 = time.monotonic()
    check_covers(rule.step_sizes, options.n_iter, "step_size")
    check_covers(problem.sigma_schedule, options.n_iter, "sigma_denoiser")
    record = {**problem.record, **rule.settings()}
    reduced = rule.reduced_axes(problem)
    if reduced:  # a checkpoint whose state arrays have other shapes is another run's
        record["reduced_state"] = {name: list(axes) for name, axes in sorted(reduced.items())}
    store = store if store is not None else open_checkpoint(problem.ctx, options)
    start, history = _resumed(store, record, options)
    streamed = problem.storage == "zarr"
    temporary = streamed and store is None
    if temporary:
        # The iterate has to live somewhere larger than memory, and the result reads from it.
        # (the caller removes it once a result computed from it is no longer read from it, or says where it is)
        store = Checkpoint.temporary(problem.ctx, options.scratch, why=f"the iterate streams through Zarr (two slots "
                                     f"of {problem.nbytes / 2**30:.2f} GiB) and no checkpoint was given")
    try:
        if streamed:  # the driver's inputs are read from the store, not carried by every graph
            problem = store_inputs(problem, store)
        rule.check(problem)
        # Out of core, stencils exchange halos through scratch Zarr arrays next to the state
        # (daskrecon.runtime.halos): no stage holds a front of chunks for the next.
        stager = Stager(store) if streamed else None
        problem = with_stager(problem, stager)
        loop = _Loop(problem, rule, store, streamed, record, options, callback, history, t0)
        try:
            loop.begin(x0, start)
            return loop.signals, loop.iterate(start)
        except BaseException:
            loop.cancel()  # before the scratch arrays and a temporary folder go: nothing of the run writes after
            raise
        finally:
            if stager is not None:
                stager.cleanup()
                remove_stored_inputs(problem, store)
    except BaseException:
        if temporary:  # a run that failed in a folder whose name it never gave cannot be resumed: not kept
            with contextlib.suppress(OSError):
                store.remove()
        raise


def open_checkpoint(ctx: Any, options: ReconstructOptions) -> Checkpoint | None:
    """``options.checkpoint`` claimed (new, empty, daskrecon's, or ``overwrite``) and seen by every worker."""
    checkpoint = options.checkpoint
    if not checkpoint:
        return None
    store = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    store.claim(overwrite=options.overwrite)
    store.ensure_shared(ctx, why="the checkpoint, which the workers write")
    return store


def _resumed(store: Checkpoint | None, record: dict, options: ReconstructOptions) -> tuple[int, list]:
    """Where the run starts (its iteration, its history so far): a resumed checkpoint's, else 0."""
    if store is None or not store.exists():
        return 0, []
    if options.resume:
        store.check(record)
        meta = store.meta()
        if meta["iteration"] > options.n_iter:
            # A checkpoint keeps its last iterate only: the one asked for is gone.
            warnings.warn(f"{store.url!r} holds iteration {meta['iteration']}, past n_iter={options.n_iter}: its "
                          f"iterate (and history) is returned as it is; pass overwrite=True instead of resume=True "
                          f"to run {options.n_iter} iterations from the start", UserWarning, stacklevel=4)
        return meta["iteration"], list(meta.get("extra", {}).get("history", []))
    if not options.overwrite:
        raise DaskreconError(f"{store.url!r} already holds a checkpoint (iteration {store.meta()['iteration']}); "
                             "pass resume=True to continue it or overwrite=True to start over")
    return 0, []


class _Loop:
    """The iterations of one run: submit iteration k (after k − 1's metrics, or before them when
    pipelined), report each in order (history row, bar, callback), stop on a rule, commit."""

    def __init__(self, problem: Problem, rule: StepRule, store: Checkpoint | None, streamed: bool, record: dict,
                 options: ReconstructOptions, callback: Callable | None, history: list, t0: float) -> None:
        self.problem, self.rule, self.store, self.streamed = problem, rule, store, streamed
        self.record, self.options, self.callback, self.history, self.t0 = record, options, callback, history, t0
        # Pipelined: iteration k+1 is submitted before iteration k's metrics come back, so the
        # workers never wait for the driver's round trip. Only for steps that merely build a graph,
        # in cluster memory, without a callback (it is shown the iterate of its iteration).
        self.pipelined = rule.pipelined and not streamed and callback is None
        self.pending: tuple[Pending, Callable] | None = None  # submitted, not yet reported
        self.signals: dict[str, DistributedSignal] = {}
        self.bar: Any = None
        self.committed = 0
        self.constant_writes = 0  # commits of this run that wrote the rule's constant state
        self.submissions: list[Pending] = []  # pipelined: up to two in flight

    def cancel(self) -> None:
        """Cancel the submissions in flight and wait for their running tasks (the run failed or was interrupted)."""
        for pending in self.submissions:
            pending.cancel()
        self.submissions = []

    def begin(self, x0: Any, start: int) -> None:
        """The state at iteration ``start``: restored from the checkpoint, or the rule's start (iteration 0)."""
        problem, rule = self.problem, self.rule
        rule.prepare(problem, Workspace(problem, self.store, self.streamed))
        reduced = rule.reduced_axes(problem)
        self.signals = {}
        for name in rule.state:
            shape, chunks = problem.reduced(reduced.get(name, ()))
            self.signals[name] = DistributedSignal(problem.ctx, shape, problem.dtype, store=self.store, chunks=chunks,
                                                   name=name, in_memory=not self.streamed)
        if start:
            for s in self.signals.values():
                s.restore()
        else:
            initial = rule.start(problem, x0(problem) if callable(x0) else x0)
            # The start is committed as iteration 0 when the state streams (it must live in the store).
            advance(self.signals, initial, iteration=0, commit=self.streamed, record=self.record,
                    extra={"history": []}, unchanged=self.constant_to_skip(self.streamed))
        self.committed = start

    def constant_to_skip(self, commit: bool) -> tuple[str, ...]:
        """The constant state this commit need not write: none until both checkpoint slots hold it.

        Call once per submission: a committing call is counted (it writes the constant state while
        fewer than two have). Counted per run, so a resumed run writes it twice again (a checkpoint from a run that
        stopped after one commit has it in one slot only).
        """
        if not commit or self.store is None:
            return ()
        if self.constant_writes < 2:
            self.constant_writes += 1
            return ()
        return tuple(self.rule.constant)

    def iterate(self, start: int) -> list[dict]:
        """Iterations ``start + 1 ..`` up to ``n_iter`` or a stopping rule; the history."""
        opts = self.options
        self.bar = tqdm(total=opts.n_iter, initial=start, disable=not opts.progress, desc=self.rule.name.upper(),
                        unit="it")
        stop = None
        try:
            for k in range(start, opts.n_iter):
                if opts.max_time is not None and k > start and time.monotonic() - self.t0 >= opts.max_time:
                    stop = "max_time"
                    break
                commit = self.store is not None and (self.streamed or (k + 1) % opts.checkpoint_every == 0
                                                     or k + 1 == opts.n_iter)
                if commit and self.report():  # a commit writes the store's free slot: never two in flight
                    stop = "tol"
                    break
                submitted = self.submit(k, commit)
                if self.report():  # the iteration before (pipelined): stopping here drops iteration k + 1
                    stop = "tol"
                    break
                self.pending = submitted
                if not self.pipelined and self.report():
                    stop = "tol"
                    break
            if self.report():
                stop = "tol"
        finally:
            self.bar.close()
        if stop is not None and self.history:
            self.commit_at_stop(stop)
        return self.history

    def submit(self, k: int, commit: bool) -> tuple[Pending, Callable]:
        """Build and submit iteration ``k + 1``'s graph, on the state of the last one submitted."""
        state = dict(self.pending[0].kept) if self.pending is not None else \
            {name: s.array for name, s in self.signals.items()}
        if self.problem.stager is not None:  # the graphs built before are computed: reuse their scratch arrays
            self.problem.stager.rewind(0)
        with span(f"daskrecon-iteration-{k + 1}"):
            # Per-iteration values (schedules): the rule's step size and the denoiser's σ at k.
            new, value, metrics = self.rule.at(k).step(self.problem.at(k), state, k)
            info = self.rule.report()
            if len(self.rule.step_sizes) > 1:  # a schedule's values go into the history rows
                info["step_size"] = value_at(self.rule.step_sizes, k)
            if len(self.problem.sigma_schedule) > 1:
                info["sigma_denoiser"] = value_at(self.problem.sigma_schedule, k)

            def extra(values: dict, k: int = k, info: dict = info) -> dict:
                self.history.append({**_row(k + 1, values, self.problem), **info})
                return {"history": self.history}

            pending = submit(self.signals, new, iteration=k + 1, also={"value": value, "metrics": metrics},
                             commit=commit, record=self.record, extra=extra, unchanged=self.constant_to_skip(commit))
            self.submissions = [p for p in self.submissions if not p.done] + [pending]
            return pending, extra

    def report(self) -> bool:
        """Report the pending iteration, if any: history row, bar, callback; whether ``tol`` stops the run."""
        if self.pending is None:
            return False
        (submitted, extra), self.pending = self.pending, None
        values = submitted.finish()
        if submitted.commits:
            self.committed = submitted.iteration
        else:
            extra(values)
        row = self.history[-1]
        self.bar.set_postfix({key: f"{v:.4g}" for key, v in row.items() if isinstance(v, float)})
        self.bar.update(1)
        if self.callback is not None:
            self.callback(submitted.iteration, self.signals["x"])
        return self.options.tol is not None and row["relative_change"] <= self.options.tol

    def commit_at_stop(self, stop: str) -> None:
        """Mark the last row with why the run stopped, and commit the state there with its history."""
        store, history = self.store, self.history
        history[-1]["stop"] = stop
        done = history[-1]["iteration"]
        if store is not None and self.committed != done:
            # The run ends here: commit the last state (in memory, so no recomputation) with its history.
            advance(self.signals, {name: s.array for name, s in self.signals.items()}, iteration=done, commit=True,
                    record=self.record, extra={"history": history}, unchanged=self.constant_to_skip(True))
        elif store is not None:
            store.commit(done, store.meta()["slot"], self.record, {"history": history})


def _row(iteration: int, values: dict, problem: Problem) -> dict:
    m = np.asarray(values["metrics"], dtype=np.float64)
    batch = (m.size - 2) // 2
    err2, pixels = float(m[-2]), float(m[-1])
    # deepinv's residual criterion (BaseOptim's crit_conv="residual", thres_conv): per batch element
    # ‖x_k − x_{k+1}‖ / (‖x_{k+1}‖ + 1e-6), averaged over the batch, so `tol` stops where deepinv's does.
    change = np.sqrt(m[:batch]) / (np.sqrt(m[batch:2 * batch]) + 1e-6)
    row = {"iteration": iteration, "data_fidelity": float(values["value"]) * problem.scale,
           "relative_change": float(change.mean())}
    if problem.truth is not None:
        row["psnr"] = psnr_of_mse(err2 / pixels)
    row.update(problem.precision_row)  # the denoiser's reduced precision and its measured error, if any
    return row
