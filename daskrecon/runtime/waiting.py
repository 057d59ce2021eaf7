"""Waiting for results on the driver, with a bound: no call of daskrecon waits for ever.

Distributed can leave a task waiting with nothing to wake it: a worker fails to fetch one
of its inputs from another worker (the holder cannot serialize it) and keeps the task
"waiting" while the scheduler believes it is processing; a task restricted to workers
that are gone, or paused; a worker that stops answering. A plain ``Client.gather`` then
blocks for ever. :func:`gather` and :func:`compute` wait in short slices instead and,
when a slice passes with nothing finished, look at what the awaited tasks are doing:

* a task whose input is in the ``error`` state on the worker that should run it raises
  :class:`~daskrecon.errors.TransferError` at once;
* when for ``stall_timeout`` seconds no awaited task (nor any task it depends on) has
  finished, changed state or been executing on a worker that answers,
  :class:`~daskrecon.errors.StalledError` is raised, naming the stuck items, their state,
  and the workers that did not answer.

A long task that is executing is progress: only a call that is really stuck times out.
"""

from __future__ import annotations

import queue
import time
import traceback
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any, NoReturn

from distributed import Client, Future, futures_of
from distributed.comm.core import CommClosedError

from daskrecon.errors import DaskreconError, StalledError, TransferError, WorkerTaskError
from daskrecon.runtime.scheduler_plugin import task_view
from daskrecon.tasks.registry import running_keys, task_states

__all__ = ["DEFAULT_STALL_TIMEOUT", "bounded", "cancel", "compute", "drain", "gather"]

#: Seconds without any progress before a call raises :class:`StalledError`.
DEFAULT_STALL_TIMEOUT = 120.0
#: How many times :func:`bounded` sends again a call that reached a worker as it left.
DEPARTURE_RETRIES = 3
_FIRST_LOOK = 1.0  # a call shorter than this is never inspected
_PROBE_TIMEOUT = 10.0  # at most this long for a worker or the scheduler to describe its tasks
_RUNNING = ("executing", "long-running")


def gather(
    client: Client,
    futures: Sequence[Future],
    *,
    what: str = "task",
    labels: Mapping[Hashable, str] | None = None,
    stall_timeout: float | None = None,
) -> list[Any]:
    """Results of ``futures``, in order; raise instead of waiting for ever.

    Parameters
    ----------
    client : distributed.Client
    futures : sequence of Future
    what : str
        What the futures are, for messages ("operator", "tile batch"): a failed future
        ``i`` is reported as ``<what> index i``.
    labels : mapping, optional
        Key -> description of tasks the futures depend on ("operator 3"), used to name the
        stuck item when the stuck task is not one of ``futures`` (a tree sum waits on
        operator tasks).
    stall_timeout : float, optional
        Seconds without progress before :class:`StalledError` (default
        :data:`DEFAULT_STALL_TIMEOUT`).

    Raises
    ------
    WorkerTaskError
        A task raised on a worker (the message carries the worker's traceback).
    TransferError
        A task cannot start because an input failed to transfer between workers.
    StalledError
        Nothing progressed for ``stall_timeout`` seconds.
    """
    futures = list(futures)
    names = {f.key: f"{what} index {i}" for i, f in enumerate(futures)}
    names.update(labels or {})
    watchdog = _Watchdog(client, futures, names, stall_timeout)
    pending = [f for f in futures if not f.done()]
    # Each future reports its completion once, into a queue. Re-waiting on the pending futures
    # (distributed.wait with FIRST_COMPLETED, slice after slice) would leave one waiter per
    # pending future behind at every call: O(futures x completions) objects on the driver,
    # gigabytes for a few thousand chunks over a long iteration.
    finished: queue.SimpleQueue = queue.SimpleQueue()
    for f in pending:
        f.add_done_callback(finished.put)
    left = len(pending)
    while left:
        try:
            batch = [finished.get(timeout=watchdog.slice())]
        except queue.Empty:
            watchdog.inspect()
            continue
        while True:
            try:
                batch.append(finished.get_nowait())
            except queue.Empty:
                break
        left -= len(batch)
        if any(f.status != "finished" for f in batch):
            break  # an error or a cancellation: reported below, at once
        watchdog.progressed()
    return _collect(client, futures, what, watchdog.stall_timeout)


def compute(
    collections: Sequence[Any],
    *,
    client: Client | None = None,
    what: str = "computation",
    labels: Mapping[Hashable, str] | None = None,
    stall_timeout: float | None = None,
    optimize_graph: bool = True,
    writes: bool = False,
) -> list[Any]:
    """``dask.compute(*collections)`` in one graph, with the guarantees of :func:`gather`.

    ``client`` defaults to Dask's current client; without one, the local scheduler runs
    the graph (no worker can hang it). ``optimize_graph=False`` keeps every task's key,
    so that tasks already persisted on the cluster are reused, not recomputed under a
    fused name. ``writes``: the graph writes to storage; when the call fails or is
    interrupted, its tasks are cancelled and those running are waited for (:func:`drain`,
    at most a minute), so that nothing writes there once the caller cleans up.
    """
    import dask

    if client is None:
        from distributed import default_client

        try:
            client = default_client()
        except ValueError:
            return list(dask.compute(*collections))
    futures = client.compute(list(collections), optimize_graph=optimize_graph)
    try:
        return gather(client, futures, what=what, labels=labels, stall_timeout=stall_timeout)
    except BaseException:
        if writes:
            _stop(client, futures, DEFAULT_STALL_TIMEOUT if stall_timeout is None else stall_timeout)
        raise
    finally:
        del futures


def cancel(client: Client, futures: Collection[Future], reason: str = "daskrecon cancelled it") -> None:
    """``client.cancel(futures)`` without losing the client's other futures.

    distributed's cancel walks each key's dependents on the scheduler and asserts that every one
    is wanted by a client (``Scheduler.stimulus_cancel``); a persisted iterate whose dependents are
    intermediate tasks of the next graph (a pipelined iteration, a metric) fails that assertion. The
    scheduler then drops the client's connection, the client reconnects and every future it held is
    cancelled: a user's own persisted arrays ("lost dependencies"), the placed operators, the model.
    Releasing the keys is what the cancel ends with anyway: the scheduler forgets each task no
    client wants any more (its unstarted work never runs), the rest of the graph with it, and the
    futures here end as cancelled, as ``client.cancel`` leaves them.
    """
    keys = list({f.key for f in futures_of(list(futures))})
    if not keys or client.status not in ("running", "connecting", "newly-created"):
        return

    async def release() -> None:  # the futures' states live on the client's event loop (as in Client._cancel)
        client._send_to_scheduler({"op": "client-releases-keys", "keys": keys, "client": client.id})
        for key in keys:
            state = client.futures.pop(key, None)
            if state is not None:
                state.cancel(reason=reason)

    client.sync(release, callback_timeout=10)


def _stop(client: Client, futures: list[Future], timeout: float) -> None:
    """Cancel ``futures`` and wait for the tasks the workers are running then.

    The graph's keys are not known here (an optimized graph fuses them), and a failed task
    has already made the scheduler release the others: what the workers run is asked of them
    (another client's tasks running at that moment are waited for too, within the bound).
    """
    try:
        cancel(client, futures)
        answers = bounded(client, client._run, running_keys, on_error="return", what="asking the workers what runs",
                          timeout=min(timeout, 60.0))
        started = {k for running in answers.values() if isinstance(running, list) for k in running}
        drain(client, started, min(timeout, 60.0))
    except Exception:  # the cluster is gone: nothing runs any more
        pass


def bounded(client: Client, coroutine_function: Any, *args: Any, what: str, timeout: float | None = None,
            **kwargs: Any) -> Any:
    """Run one of the client's coroutines (an RPC to the scheduler or to every worker) with a time bound.

    ``client.register_plugin`` or ``client.run`` wait for every worker's answer; one frozen
    worker makes them wait for ever. This raises :class:`StalledError` naming ``what`` instead.

    A worker that leaves while the call reaches it (killed, scaled down, pre-empted) fails the
    whole call with ``CommClosedError`` though the others answered: the call is sent again, to the
    workers there are then (at most :data:`DEPARTURE_RETRIES` times). A plugin registration with
    ``idempotent=True`` is re-sent with ``idempotent=False``: the first attempt stored the plugin
    on the scheduler, where an idempotent registration would stop without reaching the workers.
    """
    timeout = DEFAULT_STALL_TIMEOUT if timeout is None else float(timeout)
    for attempt in range(DEPARTURE_RETRIES + 1):
        try:
            return client.sync(coroutine_function, *args, callback_timeout=timeout, **kwargs)
        except TimeoutError as exc:
            raise StalledError(
                f"{what} got no answer within {timeout:g} s: a worker or the scheduler does not respond "
                "(frozen, overloaded or cut off); check the dashboard, or raise DistributedContext(stall_timeout=...)"
            ) from exc
        except CommClosedError:
            if attempt == DEPARTURE_RETRIES or client.status != "running":
                raise
            time.sleep(0.5)  # time for the scheduler to drop the worker that left
            if kwargs.get("idempotent"):
                kwargs = {**kwargs, "idempotent": False}
    raise AssertionError("unreachable")


def drain(client: Client, keys: Collection[Hashable], timeout: float) -> bool:
    """Wait until no worker runs one of ``keys``; whether that happened within ``timeout`` seconds.

    A cancelled task that has started runs to its end on its worker (distributed cannot stop a
    thread): one that writes chunks writes them after the cancellation. Whoever removes the
    folder those chunks go to waits for it, or the folder comes back, made by the late writes.
    Workers that do not answer are not waited for.
    """
    keys = set(keys)
    deadline = time.monotonic() + timeout
    while keys:
        try:
            answers = bounded(client, client._run, running_keys, on_error="return", what="asking the workers what runs",
                              timeout=max(1.0, deadline - time.monotonic()))
        except StalledError:
            return False
        except Exception:  # the cluster is going or gone: nothing more will run
            return True
        if not any(k in keys for running in answers.values() if isinstance(running, list) for k in running):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _collect(client: Client, futures: list[Future], what: str, timeout: float) -> list[Any]:
    """``client.gather`` within ``timeout`` seconds, turning a worker exception into :class:`WorkerTaskError`.

    The results are finished, but fetching them still needs the workers holding them: one
    frozen after finishing would make a plain gather wait for ever.
    """
    try:
        return client.sync(client._gather, futures, callback_timeout=timeout)
    except TimeoutError as exc:
        if any(f.status != "finished" for f in futures):
            return _worker_error(futures, what, exc)  # a task raised TimeoutError itself
        holders = {}
        try:
            holders = client.sync(client.scheduler.who_has, keys=[f.key for f in futures], callback_timeout=10)
        except Exception:
            pass
        workers = sorted({w for ws in holders.values() for w in ws})
        raise StalledError(
            f"the results of {len(futures)} finished {what}(s) could not be fetched within {timeout:g} s "
            f"(stall_timeout) from {workers or 'their workers'}: a worker holding them does not answer; "
            "raise DistributedContext(stall_timeout=...) if the results are only large and the network slow"
        ) from exc
    except DaskreconError:
        raise  # our own checks, raised on a worker: the message already names the argument
    except Exception as exc:
        return _worker_error(futures, what, exc)


def _worker_error(futures: list[Future], what: str, exc: BaseException) -> NoReturn:
    failed = [i for i, f in enumerate(futures) if f.status in ("error", "cancelled", "lost")]
    where = f" (failed for {what} index {failed[0]})" if failed else ""
    notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))  # the task's own context
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    raise WorkerTaskError(
        f"{type(exc).__name__} in a worker task{where}: {exc}{notes}\n--- worker traceback ---\n{tb}"
    ) from exc


class _Watchdog:
    """Decides whether a wait is still making progress (see the module docstring)."""

    def __init__(self, client: Client, futures: list[Future], names: dict, stall_timeout: float | None) -> None:
        self.client = client
        self.futures = futures
        self.keys = [f.key for f in futures]
        self.names = names
        self.stall_timeout = DEFAULT_STALL_TIMEOUT if stall_timeout is None else float(stall_timeout)
        if not self.stall_timeout > 0:
            raise ValueError(f"stall_timeout must be > 0 seconds, got {stall_timeout!r}")
        self.probe_timeout = min(_PROBE_TIMEOUT, max(1.0, self.stall_timeout / 2))
        self.started = self.last_progress = time.monotonic()
        self.signature: frozenset | None = None
        self.last_view: dict = {}

    def slice(self) -> float:
        """How long the next wait may block before the state is looked at."""
        waited = time.monotonic() - self.started
        if waited < _FIRST_LOOK:
            return _FIRST_LOOK - waited
        return min(5.0, max(0.5, self.stall_timeout / 8))

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def inspect(self) -> None:
        """Raise if the awaited tasks are stuck; note progress otherwise."""
        view = self._scheduler_view()
        if view is None:  # the scheduler cannot describe its tasks (no daskrecon there): time only
            self._maybe_stall({}, [], "the scheduler could not be asked for task states")
            return
        tasks = view["tasks"]
        self.last_view = view
        by_worker: dict[str, list] = {}
        for key, (state, worker, _restrictions, _loose) in tasks.items():
            if state == "processing" and worker:
                by_worker.setdefault(worker, []).append(key)
        running, silent = False, []
        for worker, keys in by_worker.items():
            states = self._worker_view(worker, keys)
            if states is None:
                silent.append(worker)
                continue
            for key, st in states.items():
                if st is None:
                    continue
                state, failed_inputs = st
                if failed_inputs:
                    self._raise_transfer(key, worker, failed_inputs)
                if state in _RUNNING:
                    running = True
        signature = frozenset((k, v[0], v[1]) for k, v in tasks.items())
        if running or signature != self.signature:
            self.signature = signature
            self.progressed()
            return
        self._maybe_stall(tasks, silent, "")

    # ------------------------------------------------------------------ probes
    def _scheduler_view(self) -> dict | None:
        try:
            return self.client.sync(self.client._run_on_scheduler, task_view, self.keys,
                                    callback_timeout=self.probe_timeout)
        except Exception:
            return None

    def _worker_view(self, worker: str, keys: list) -> dict | None:
        try:
            out = self.client.sync(self.client._run, task_states, keys, workers=[worker], on_error="return",
                                   callback_timeout=self.probe_timeout)
        except Exception:
            return None
        result = out.get(worker)
        return result if isinstance(result, dict) else None

    # ------------------------------------------------------------------ reports
    def _name(self, key: Hashable) -> str:
        return self.names.get(key) or f"task {key!r}"

    def _raise_transfer(self, key: Hashable, worker: str, failed: dict) -> None:
        holders = {}
        try:
            holders = self.client.sync(self.client.scheduler.who_has, keys=list(failed),
                                       callback_timeout=self.probe_timeout)
        except Exception:
            pass
        parts = []
        for dep, reason in failed.items():
            src = ", ".join(holders.get(dep, ())) or "another worker"
            parts.append(f"input {dep!r} could not be fetched from {src}" + (f" ({reason})" if reason else ""))
        self._cancel()
        raise TransferError(
            f"{self._name(key)} cannot start on {worker}: " + "; ".join(parts) + ". Distributed would leave it "
            "waiting for ever. The usual cause is a task result that cannot be serialized (the holder's log "
            "says why); daskrecon never moves operators or models between workers, so report this if it comes "
            "from a daskrecon call"
        )

    def _maybe_stall(self, tasks: dict, silent: list[str], note: str) -> None:
        idle = time.monotonic() - self.last_progress
        if idle < self.stall_timeout:
            return
        workers = self.last_view.get("workers", {})
        stuck = sorted(tasks.items(), key=lambda kv: (kv[0] not in self.names, str(kv[0])))[:5]
        lines = []
        for key, (state, worker, restrictions, loose) in stuck:
            where = f" on {worker}" if worker else ""
            why = ""
            if state == "no-worker" and restrictions:
                gone = [w for w in restrictions if w not in workers]
                paused = [w for w in restrictions if workers.get(w) == "paused"]
                if gone and len(gone) == len(restrictions):
                    why = f": it may run only on {restrictions}, which left the cluster"
                elif paused:
                    why = f": it may run only on {paused}, paused (memory above the pause threshold)"
                else:
                    why = f": it may run only on {restrictions}"
            elif state == "no-worker":
                why = ": no worker can run it (none connected, or none with its resources)"
            lines.append(f"  {self._name(key)}: {state}{where}{why}")
        if silent:
            lines.append(f"  workers that did not answer within {self.probe_timeout:g} s: {sorted(silent)}")
        if note:
            lines.append(f"  {note}")
        self._cancel()
        raise StalledError(
            f"no progress for {idle:.0f} s (stall_timeout={self.stall_timeout:g} s) while waiting for "
            f"{len(self.keys)} result(s):\n" + "\n".join(lines or ["  (no task state could be read)"]) +
            "\nRaise DistributedContext(stall_timeout=...) if the cluster is only slow."
        )

    def _cancel(self) -> None:
        try:  # free the cluster from work nobody will collect
            cancel(self.client, self.futures, reason="daskrecon gave up waiting")
        except Exception:
            pass
