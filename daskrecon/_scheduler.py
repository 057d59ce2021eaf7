"""Code that runs inside the Dask scheduler (kept free of torch and deepinv imports)."""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["ReleaseOrphanedRestrictions"]


class ReleaseOrphanedRestrictions(SchedulerPlugin):
    """Let loosely restricted tasks run on a new worker when every worker they name is gone.

    daskrecon submits per-operator tasks with ``workers=[owner], allow_other_workers=True``.
    When the owner dies and another worker is alive, distributed runs them elsewhere. But
    when *no* worker is alive (the only worker of a cluster died), they wait in
    ``no-worker``, and a replacement worker only picks up queued tasks whose restrictions
    name it (``bulk_schedule_unrunnable_after_adding_worker``): they would wait forever.
    This hook runs just before that step and drops such orphaned restrictions.
    """

    name = "daskrecon-release-orphaned-restrictions"

    def add_worker(self, scheduler: Any = None, worker: str | None = None) -> None:
        alive = scheduler.workers.keys()
        for ts in list(scheduler.unrunnable):
            if ts.loose_restrictions and ts.worker_restrictions and not (ts.worker_restrictions & alive):
                ts.worker_restrictions = None
