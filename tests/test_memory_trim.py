"""malloc='fast' keeps freed heap memory for speed, and gives it back when a worker nears its limit."""

import time

import daskrecon as dr
from daskrecon.runtime.memory_trim import TrimUnderPressure

from helpers import fragment_heap


def _rss(dask_worker=None):
    return dask_worker.monitor.get_process_memory()


def _peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _trims(dask_worker=None):
    return getattr(dask_worker.plugins.get(TrimUnderPressure.name), "trims", None)


def test_freed_memory_returns_to_the_os_under_pressure():
    limit = int(2.5 * 2**30)
    threshold = TrimUnderPressure().fraction * limit
    with dr.DistributedContext(n_workers=1, processes=True, dashboard_address="127.0.0.1:0", torch_threads=1,
                               memory_limit=limit, malloc="fast") as ctx:
        client = ctx.client
        assert list(client.run(_trims).values()) == [0]
        client.submit(fragment_heap, pure=False).result()
        assert list(client.run(_peak).values())[0] > threshold  # the heap really grew past the threshold
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and list(client.run(_rss).values())[0] > threshold:
            time.sleep(0.25)
        rss = list(client.run(_rss).values())[0]
        assert rss < threshold, f"worker kept {rss / 2**30:.2f} GiB"
        assert list(client.run(_trims).values())[0] >= 1
