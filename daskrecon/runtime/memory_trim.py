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

A second plugin, :class:`ReleaseGpuLibraries`, gives back memory a CPU worker holds for nothing:
the CUDA build of torch (PyPI's default) maps cuBLAS, nvJitLink, NVRTC, Triton and the rest at
import and touches 233 MiB of their pages while loading them (measured here: ``import daskrecon``
818 MiB resident, 585 MiB after the release; a tiled denoiser afterwards brings none of them
back: ``benchmarks/bench_worker_floor.py``). Those are clean pages of library files, read-only and
never written, so the worker can unmap them (``madvise(MADV_DONTNEED)``): they stay in the page
cache, shared with any other process that maps them, and come back from it if a GPU path ever
touches them. Nothing changes but the worker's resident size, which is what distributed's memory
limit counts.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import time
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin
from tornado.ioloop import PeriodicCallback

__all__ = ["GPU_LIBRARIES", "ReleaseGpuLibraries", "TrimUnderPressure", "malloc_trim", "release_library_pages"]

_NAME = "daskrecon-trim"

#: Paths of the shared libraries that only a GPU uses: NVIDIA's wheels (``nvidia/...``), Triton,
#: and torch's and NCCL's CUDA parts.
GPU_LIBRARIES = re.compile(
    r"/nvidia/|/triton/|/lib(torch_cuda|c10_cuda|nccl|cudnn|cublas|cusparse|cufft|curand|cusolver|cudart"
    r"|nvrtc|nvJitLink|nvshmem|cupti|cufile|nvToolsExt)[^/]*$")
_MADV_DONTNEED = 4
_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+$")


def malloc_trim() -> bool:
    """Return the process's free heap pages to the OS (glibc); False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _library_mappings(pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    """Address ranges of read-only file mappings matching ``pattern`` that hold no private copies."""
    found, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if _MAPPING.match(fields[0]):  # a mapping's header: range, perms, offset, device, inode[, path]
                path = fields[5] if len(fields) > 5 else ""
                readonly = "w" not in fields[1]
                current = (tuple(int(v, 16) for v in fields[0].split("-"))
                           if readonly and path.startswith("/") and pattern.search(path) else None)
            elif current is not None and fields[0] == "Anonymous:":
                if int(fields[1]) == 0:  # no page of it was ever written (relocated): all are the file's
                    found.append(current)
                current = None
    return found


def release_library_pages(pattern: re.Pattern[str] = GPU_LIBRARIES) -> int:
    """Unmap this process's resident pages of the shared libraries matching ``pattern``.

    Only read-only file mappings none of whose pages the process wrote are advised
    (``MADV_DONTNEED``), so every page released is a clean copy of the library file: it stays in
    the page cache (other processes keep sharing it) and an access maps it back; nothing is lost.

    Parameters
    ----------
    pattern : re.Pattern
        Matched against each mapping's path in ``/proc/self/smaps``; default :data:`GPU_LIBRARIES`.

    Returns
    -------
    int
        Bytes of resident memory released (0 off Linux).
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        ranges = _library_mappings(pattern)
        before = _resident_bytes()
    except (OSError, AttributeError):
        return 0
    # Between reading the map and advising, a range could only change owner if its library were
    # unloaded; torch never unloads the CUDA libraries, so the ranges read are still theirs.
    for start, end in ranges:
        libc.madvise(start, end - start, _MADV_DONTNEED)
    return max(0, before - _resident_bytes())


class ReleaseGpuLibraries(WorkerPlugin):
    """Worker plugin: after importing torch and deepinv, release the GPU libraries' pages (see module).

    Installed on workers that use no GPU: ``DistributedContext(device_mode="cpu")``, or
    ``device_mode=None`` on workers where torch sees no CUDA device. Turned off by
    ``dask.config.set({"daskrecon.context.release-gpu-libraries": False})``.

    Parameters
    ----------
    always : bool
        Release even where torch sees a CUDA device (``device_mode="cpu"``: tasks never use it).
    """

    idempotent = True
    name = "daskrecon-release-gpu-libraries"

    def __init__(self, always: bool = False) -> None:
        self.always = always
        self.released: int | None = None

    def setup(self, worker: Any) -> None:
        # The imports map (and touch) the libraries; every daskrecon task needs them anyway, so
        # importing them first means no task maps them again after the release.
        import deepinv  # noqa: F401
        import torch

        if self.always or not torch.cuda.is_available():
            self.released = release_library_pages()


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
