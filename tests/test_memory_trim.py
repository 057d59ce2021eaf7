"""malloc='fast' keeps freed heap memory for speed, and gives it back when a worker nears its limit;
CPU workers give back the pages of GPU libraries they never use."""

import ctypes
import mmap
import re
import sys
import time

import dask
import numpy as np
import pytest
import torch
from helpers import fragment_heap

import daskrecon as dr
from daskrecon.runtime.memory_trim import ReleaseGpuLibraries, TrimUnderPressure, release_library_pages


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


def _mapped(path, size, *, write=False):
    """``path`` mapped privately, every page touched; written (then made read-only) with ``write``."""
    f = open(path, "rb" if not write else "r+b")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
    m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=prot)
    if write:
        m[:] = b"\x07" * size  # private copies: the file keeps its bytes
        view = ctypes.c_char.from_buffer(m)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(ctypes.addressof(view), size, mmap.PROT_READ) == 0
        del view
    assert sum(m[i] for i in range(0, size, mmap.PAGESIZE)) >= 0  # touch every page
    return f, m


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise are Linux's")
def test_released_library_pages_leave_resident_memory_and_come_back_unchanged(tmp_path):
    size = 64 * 2**20
    lib, written = tmp_path / "libfake_gpu.so", tmp_path / "libfake_written.so"
    content = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    lib.write_bytes(content)
    written.write_bytes(content)
    f1, clean = _mapped(lib, size)
    f2, dirty = _mapped(written, size, write=True)
    try:
        released = release_library_pages(re.compile(r"/libfake_(gpu|written)\.so$"))
        # the clean mapping left resident memory; the written one (now read-only) kept its pages
        assert size * 0.9 < released < size * 1.5
        assert clean[:] == content
        assert dirty[:] == b"\x07" * size
    finally:
        clean.close(), dirty.close(), f1.close(), f2.close()


def _released(dask_worker=None):
    return getattr(dask_worker.plugins.get(ReleaseGpuLibraries.name), "released", None)


def _denoise(x):
    import deepinv as dinv
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        return dinv.models.DnCNN(in_channels=1, out_channels=1, pretrained=None, depth=4)(x)


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU build of torch maps no GPU library to release")
def test_cpu_workers_give_back_the_gpu_libraries_pages_and_compute_the_same():
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    seen = {}
    for release in (True, False):
        with dask.config.set({"daskrecon.context.release-gpu-libraries": release}):
            with dr.DistributedContext(n_workers=1, processes=True, dashboard_address="127.0.0.1:0",
                                       torch_threads=1, device_mode="cpu") as ctx:
                released = list(ctx.client.run(_released).values())[0]
                rss = list(ctx.client.run(_rss).values())[0]
                seen[release] = (released, rss, ctx.client.submit(_denoise, x, pure=False).result())
    (released, rss_on, y_on), (none, rss_off, y_off) = seen[True], seen[False]
    assert none is None  # turned off: the plugin is not installed
    assert released > 100 * 2**20, f"released {released / 2**20:.0f} MiB"
    assert rss_on < rss_off - 100 * 2**20, (rss_on / 2**20, rss_off / 2**20)
    assert torch.equal(y_on, y_off)
