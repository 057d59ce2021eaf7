"""Give freed heap memory back to the OS when a worker nears its memory limit.

glibc's defaults keep freed memory for reuse: network activations and FFT buffers come back
from the heap instead of being mapped (and page-faulted) afresh — 2.2× faster FFT-heavy
gradients here (``benchmarks/bench_gradient.py``). But freed memory in the middle of the
heap stays with the process, so a worker's resident size can sit above distributed's pause
threshold with little live data, and the worker pauses for good (seen in
``benchmarks/bench_ooc_pnp.py``). distributed's answer is ``MALLOC_TRIM_THRESHOLD_=65536``,
which pays the page faults on every call. This plugin keeps the fast allocator and instead
calls ``malloc_trim(0)`` (which returns free pages anywhere in the heap) whenever the
worker's memory grows past a fraction of its limit, at most once per ``min_interval``.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin
from tornado.ioloop import PeriodicCallback

__all__ = ["TrimUnderPressure", "malloc_trim"]

_NAME = "daskrecon-trim"


def malloc_trim() -> bool:
    """Return the process's free heap pages to the OS (glibc); False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class TrimUnderPressure(WorkerPlugin):
    """Worker plugin: ``malloc_trim`` when process memory passes ``fraction`` of the limit (see module).

    Parameters
    ----------
    fraction : float
        Of the worker's memory limit; below distributed's spill (0.7) and pause (0.8)
        thresholds, so that memory the process only keeps is released before they act.
    interval : float
        Seconds between checks.
    min_interval : float
        Least seconds between two trims while memory stays high without growing.
    """

    idempotent = True
    name = _NAME

    def __init__(self, fraction: float = 0.5, interval: float = 0.5, min_interval: float = 5.0) -> None:
        self.fraction, self.interval, self.min_interval = fraction, interval, min_interval
        self.trims = 0

    def setup(self, worker: Any) -> None:
        limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
        if not limit:
            return  # no limit: nothing to protect
        self._worker, self._limit = worker, limit
        self._last, self._after = 0.0, 0.0
        pc = PeriodicCallback(self._check, self.interval * 1000)
        worker.periodic_callbacks[_NAME] = pc
        pc.start()

    def _check(self) -> None:
        rss = self._worker.monitor.get_process_memory()
        now = time.monotonic()
        high = rss > self.fraction * self._limit
        grown = rss - self._after > 0.05 * self._limit
        if high and (grown or now - self._last > self.min_interval):
            malloc_trim()
            self.trims += 1
            self._last, self._after = now, self._worker.monitor.get_process_memory()

    def teardown(self, worker: Any) -> None:
        pc = worker.periodic_callbacks.pop(_NAME, None)
        if pc is not None:
            pc.stop()
