"""Code that runs inside the Dask scheduler (kept free of torch and deepinv imports)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Sequence
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["MEMBERSHIP_TOPIC", "PLACED", "ReleaseOrphanedRestrictions", "task_view"]

#: Annotation marking daskrecon's placed tasks (``dask.annotate(daskrecon=PLACED)``).
PLACED = "placed"
#: Event topic on which the plugin announces workers joining and leaving.
MEMBERSHIP_TOPIC = "daskrecon-membership"


class ReleaseOrphanedRestrictions(SchedulerPlugin):
    """Keep restricted tasks runnable when the workers they name are gone.

    daskrecon runs a task that needs operator ``i`` on the worker that holds operator ``i``
    (``workers=[owner]``, strictly: work stealing must not move it away). When that worker
    leaves the cluster, distributed would keep such a task in ``no-worker`` for ever, and a
    replacement worker (new address) only picks up tasks whose restrictions name it. This
    plugin drops the worker restriction of a daskrecon task (annotated
    ``daskrecon="placed"``) or of any loosely restricted task once none of the workers it
    names is connected: the task then runs anywhere, and rebuilds its operator there from
    its lineage. It also announces joins and departures on :data:`MEMBERSHIP_TOPIC`, so
    drivers re-plan their placement without asking the scheduler on every call.
    """

    name = "daskrecon-release-orphaned-restrictions"

    def __init__(self) -> None:
        self.scheduler: Any = None
        self._release_pending = False

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def add_worker(self, scheduler: Any = None, worker: str | None = None) -> None:
        # Runs just before the scheduler hands no-worker tasks to the new worker.
        self._release(scheduler)
        scheduler.log_event(MEMBERSHIP_TOPIC, {"action": "add", "worker": worker})

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        scheduler.log_event(MEMBERSHIP_TOPIC, {"action": "remove", "worker": worker})
        self._reschedule(scheduler, self._release(scheduler))

    def transition(self, key: Hashable, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        # A task submitted (or re-run) for an owner that has just left lands here; it cannot be
        # rescheduled from inside a transition, so do it right after.
        if finish != "no-worker" or self.scheduler is None or self._release_pending:
            return
        ts = self.scheduler.tasks.get(key)
        if ts is not None and _orphaned(ts, self.scheduler.workers):
            self._release_pending = True
            asyncio.get_running_loop().call_soon(self._deferred)

    def _deferred(self) -> None:
        self._release_pending = False
        self._reschedule(self.scheduler, self._release(self.scheduler))

    @staticmethod
    def _release(scheduler: Any) -> list[Hashable]:
        released = []
        for ts in list(scheduler.unrunnable):
            if _orphaned(ts, scheduler.workers):
                ts.worker_restrictions = None
                released.append(ts.key)
        return released

    @staticmethod
    def _reschedule(scheduler: Any, keys: list[Hashable]) -> None:
        if keys and scheduler.running:
            scheduler.transitions({k: "processing" for k in keys}, stimulus_id=f"daskrecon-release-{time.time()}")


def _orphaned(ts: Any, workers: Any) -> bool:
    """A daskrecon (or loosely) restricted task none of whose named workers is connected."""
    if not ts.worker_restrictions or ts.host_restrictions or ts.worker_restrictions & workers.keys():
        return False
    return bool(ts.loose_restrictions) or (ts.annotations or {}).get("daskrecon") == PLACED


def task_view(keys: Sequence[Hashable], dask_scheduler: Any = None, limit: int = 5000) -> dict:
    """States of ``keys`` and of every unfinished task they wait on (for :mod:`daskrecon.runtime.waiting`).

    Returns ``{"tasks": {key: (state, processing_on, worker_restrictions, loose)},
    "workers": {address: status}}``; tasks already in memory are left out.
    """
    tasks = dask_scheduler.tasks
    out: dict[Hashable, tuple] = {}
    stack = [tasks[k] for k in keys if k in tasks]
    while stack and len(out) < limit:
        ts = stack.pop()
        if ts.key in out or ts.state == "memory":
            continue
        out[ts.key] = (
            ts.state,
            ts.processing_on.address if ts.processing_on is not None else None,
            sorted(ts.worker_restrictions) if ts.worker_restrictions else None,
            bool(ts.loose_restrictions),
        )
        stack.extend(d for d in ts.dependencies if d.state != "memory")
    workers = {addr: getattr(ws.status, "name", str(ws.status)) for addr, ws in dask_scheduler.workers.items()}
    return {"tasks": out, "workers": workers}
