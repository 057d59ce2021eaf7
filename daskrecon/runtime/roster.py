"""`WorkerRoster`: the cluster's current workers, asked of the scheduler only when they may have changed.

Every placement asks "which workers are there?" before it submits. Asking the scheduler each
time costs a round trip per call; the roster keeps the answer and a membership counter that
daskrecon's scheduler plugin (:mod:`daskrecon.runtime.scheduler_plugin`) advances on every join
and departure, and asks again only when the counter moved or the answer is older than a bound.

A subscription reaches the scheduler asynchronously, so a join announced meanwhile would be
missed: the roster trusts no cached answer until an event of its own has come back through the
subscription (it sends one, on each uncached call until it arrives).
"""

from __future__ import annotations

import time
from typing import Any

from distributed import Client

from daskrecon.runtime.cluster import scheduler_workers
from daskrecon.runtime.scheduler_plugin import MEMBERSHIP_TOPIC
from daskrecon.runtime.waiting import bounded

__all__ = ["WorkerRoster"]

WORKERS_TTL = 30.0  # seconds a cached worker list is trusted without an announced change


class WorkerRoster:
    """The workers of ``client``'s cluster and their threads, cached between announced changes.

    Parameters
    ----------
    client : distributed.Client
    stall_timeout : float
        Bound on asking the scheduler.
    """

    def __init__(self, client: Client, stall_timeout: float) -> None:
        self.client = client
        self.stall_timeout = stall_timeout
        self.generation: int | None = None  # None: changes are not announced (no plugin), ask every time
        self.listening = False  # an event came back through the subscription: announcements arrive
        self._seen: tuple[int, dict[str, int], float] | None = None

    def track(self, generation: int | None) -> None:
        """Start counting announced changes from ``generation`` (``None``: the plugin is not installed)."""
        self.generation = generation
        self.listening = False
        self._seen = None

    def on_change(self, event: Any) -> None:
        """Subscriber of the membership topic; runs on the client's event loop, so it only marks the list stale."""
        if self.generation is not None:
            self.generation += 1
            self.listening = True

    def threads(self) -> dict[str, int]:
        """Threads of each current worker, by address, sorted (a stable order for sharding)."""
        generation, now = self.generation, time.monotonic()
        seen = self._seen
        if generation is not None and seen is not None and seen[0] == generation and now - seen[2] < WORKERS_TTL:
            return dict(seen[1])
        if generation is not None and not self.listening:
            bounded(self.client, self.client.scheduler.log_event, topic=MEMBERSHIP_TOPIC,  # back once subscribed
                    msg={"action": "listening"}, what="announcing a subscription", timeout=self.stall_timeout)
        info = scheduler_workers(self.client, self.stall_timeout)
        threads = {w: int(info[w].get("nthreads", 1)) for w in sorted(info)}
        if generation is not None and self.listening and self.generation == generation:
            self._seen = (generation, threads, now)
        return dict(threads)

    def close(self) -> None:
        """Stop listening for changes (the client may already be closed)."""
        if self.generation is not None:
            try:
                self.client.unsubscribe_topic(MEMBERSHIP_TOPIC)
            except Exception:  # a closed client has nothing to unsubscribe
                pass
        self.generation = None
        self.listening = False
        self._seen = None
