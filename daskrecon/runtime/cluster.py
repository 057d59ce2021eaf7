"""Local clusters whose worker processes never run the driver's script.

``LocalCluster(processes=True)`` starts each worker with multiprocessing's ``spawn``, which
makes the new process import the driver's ``__main__`` module first. A script that opens a
``DistributedContext`` at module level without ``if __name__ == "__main__":`` — as every
torchrun script and deepinv's distributed demos do — then runs again in every worker, each
of which tries to start a cluster of its own ("Nanny failed to start").

Here the scheduler runs in the driver (dashboard included) and each worker is a ``Nanny``
started by ``python -m distributed.cli.dask_spec`` in a fresh interpreter: its ``__main__``
is distributed's, not the user's, whether the driver is a script, ``python -c``, ``runpy``,
``python -m pkg.module`` or a notebook. The nanny still restarts its worker when it dies,
enforces the memory limit and applies the environment; the driver's Dask configuration
reaches the workers through ``DASK_INTERNAL_INHERIT_CONFIG``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import sys
import warnings
from typing import Any

import dask
from distributed import Client, Scheduler, SpecCluster
from distributed.deploy.subprocess import SubprocessWorker
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.worker_memory import parse_memory_limit

from daskrecon.errors import ClusterConnectionError, DaskreconError
from daskrecon.runtime.defaults import default
from daskrecon.runtime.waiting import bounded
from daskrecon.tasks import arrays as array_tasks

__all__ = ["MALLOC_MODES", "MIN_WORKER_MEMORY", "ScriptSafeWorker", "TorchThreads", "configure_workers", "local_cluster", "local_sizes", "scheduler_workers", "spawned_by_multiprocessing", "start_local_cluster"]

#: The least memory a local worker is given: an idle worker holds ~590 MiB here (torch, deepinv and
#: daskrecon loaded; measured), and Dask pauses a worker at 80 % of its limit (740 MiB for that much).
MIN_WORKER_MEMORY = 2**30

# LocalCluster keywords that configure the scheduler; every other keyword goes to the workers.
_SCHEDULER_KEYS = ("host", "scheduler_port", "protocol", "scheduler_kwargs", "blocked_handlers", "service_kwargs")


class ScriptSafeWorker(SubprocessWorker):
    """A nanny-managed worker in its own interpreter, started by ``python -m distributed.cli.dask_spec``.

    Unlike :class:`distributed.deploy.subprocess.SubprocessWorker`, it registers under its spec
    name (so that ``cluster.scale`` down finds it) and takes an environment.
    """

    def __init__(self, scheduler: str, name: Any = None, worker_kwargs: dict | None = None,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(scheduler, worker_class="distributed.Nanny", name=name, worker_kwargs=worker_kwargs)
        self.env = {str(k): str(v) for k, v in (env or {}).items()}

    async def _start(self) -> None:
        spec = {"cls": self.worker_class, "opts": {**self.worker_kwargs, "name": self.name}}
        cmd = [sys.executable, "-m", "distributed.cli.dask_spec", self.scheduler, "--spec", json.dumps(spec)]
        # A session of its own: a terminal's Ctrl-C reaches the driver alone, which closes the cluster
        # (killing each nanny and its worker), instead of every worker dying mid-task with a traceback. A
        # driver that dies without closing loses nothing either: its scheduler goes with it, and the
        # nannies close when it does (all gone 8 s after a SIGKILL of the driver, measured by hand; the test
        # in tests/test_reconstruct.py allows 30 s).
        self.process = await asyncio.create_subprocess_exec(*cmd, env={**os.environ, **self.env},
                                                            start_new_session=True)


def spawned_by_multiprocessing() -> bool:
    """Whether this process is a multiprocessing child re-importing its parent's script right now.

    A ``spawn`` child runs the script's module-level code as ``__mp_main__`` before its target,
    while multiprocessing marks it as still "inheriting" from its parent (the flag its own
    ``_check_not_importing_main`` reads); a cluster started there would be one more cluster per
    child. A context opened later, by the child's target function, is fine.
    """
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _driver_path() -> str:
    """The driver's ``sys.path`` as ``PYTHONPATH``: workers import what the driver imports.

    multiprocessing's spawn hands its children the parent's ``sys.path``; a fresh interpreter
    would not see, say, a module beside the driver's script.
    """
    entries = [os.path.abspath(p or os.getcwd()) for p in sys.path]
    return os.pathsep.join(dict.fromkeys(p for p in entries if os.path.isdir(p)))


def _inherited_config(overrides: dict) -> str:
    """The driver's Dask configuration (plus ``overrides``), serialized for the workers' environment."""
    config = dask.config.merge(dask.config.config, overrides)
    try:
        return dask.config.serialize(config)
    except TypeError:  # a value that is not JSON (an object set by the user): send what can be sent
        def plain(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: v for k, v in ((k, plain(v)) for k, v in node.items()) if v is not _SKIP}
            if isinstance(node, (list, tuple)):
                return [plain(v) for v in node]
            return node if node is None or isinstance(node, (str, int, float, bool)) else _SKIP

        return dask.config.serialize(plain(config))


_SKIP = object()
_logger = logging.getLogger(__name__)


def local_cluster(
    n_workers: int,
    threads_per_worker: int,
    *,
    memory_limit: str | int | None = "auto",
    dashboard_address: str | None = "127.0.0.1:8787",
    env: dict[str, str] | None = None,
    gpus: int = 0,
    **kwargs: Any,
) -> SpecCluster:
    """A local cluster: scheduler in this process, one nanny-managed worker process per worker.

    Parameters
    ----------
    n_workers, threads_per_worker : int
    memory_limit : str, int or None
        Per worker; ``"auto"`` divides this machine's memory among the workers.
    dashboard_address : str or None
        Where the scheduler's dashboard listens (``None``: no dashboard).
    env : dict, optional
        Environment of the worker processes (set before they start, like distributed's
        ``distributed.nanny.pre-spawn-environ``).
    gpus : int
        If > 0, worker ``i`` sees the GPUs rotated to start at ``i % gpus``
        (``CUDA_VISIBLE_DEVICES``), so ``cuda:0`` in its tasks is its own GPU, and declares
        the resource ``GPU=1``.
    **kwargs
        ``LocalCluster``-style options: ``host``, ``scheduler_port``, ``protocol``,
        ``scheduler_kwargs`` configure the scheduler, anything else is a ``Nanny`` option
        and must be JSON-serializable (it crosses a process boundary).

    Raises
    ------
    DaskreconError
        Called from a multiprocessing child that re-imported the driver's script.
    TypeError
        A worker option that cannot be sent to the worker process.
    """
    if spawned_by_multiprocessing():
        raise DaskreconError(
            "a DistributedContext was opened while a multiprocessing child process imported your script "
            "(your own code, or a library, started processes with the 'spawn' method, and they re-run the "
            "script's top level); put the code that opens the context under `if __name__ == \"__main__\":`"
        )
    host = kwargs.pop("host", "127.0.0.1")
    scheduler_opts = dict(kwargs.pop("scheduler_kwargs", None) or {})
    scheduler_opts.update(host=host, port=kwargs.pop("scheduler_port", 0), dashboard_address=dashboard_address,
                          dashboard=dashboard_address is not None)
    for key in ("protocol", "blocked_handlers", "service_kwargs"):
        if key in kwargs:
            scheduler_opts[key] = kwargs.pop(key)
    silence = kwargs.pop("silence_logs", logging.WARN)
    limit = parse_memory_limit(memory_limit, 1, n_workers, logger=_logger) if memory_limit is not None else None
    if limit is not None and limit < MIN_WORKER_MEMORY:
        raise ValueError(
            f"memory_limit gives each of the {n_workers} workers {limit / 2**20:.0f} MiB, less than the "
            f"{MIN_WORKER_MEMORY // 2**20} MiB a worker needs: a worker process holds ~600 MiB once torch and "
            "deepinv are loaded, Dask pauses it at 80 % of its limit and restarts it at 95 %, so it would restart "
            f"or pause for good before any task (memory_limit={memory_limit!r}); give more memory per worker, "
            "or fewer workers")
    worker_opts = {"nthreads": threads_per_worker, "host": host, "silence_logs": silence, **kwargs}
    if limit is not None:
        worker_opts["memory_limit"] = limit
    try:
        json.dumps(worker_opts)
    except TypeError as exc:
        raise TypeError(
            f"worker options {sorted(kwargs)} must be JSON values to reach the worker processes ({exc}); "
            "for anything else start the cluster yourself and pass it: DistributedContext(cluster)"
        ) from exc
    config = _inherited_config({"distributed": {"nanny": {"pre-spawn-environ": dict(env or {})}}})
    base_env = {"DASK_INTERNAL_INHERIT_CONFIG": config, "PYTHONPATH": _driver_path(), **(env or {})}
    workers = {}
    for i in range(n_workers):
        opts = dict(worker_opts)
        worker_env = dict(base_env)
        if gpus:
            worker_env["CUDA_VISIBLE_DEVICES"] = ",".join(str((i + k) % gpus) for k in range(gpus))
            opts["resources"] = {**opts.get("resources", {}), "GPU": 1}
        workers[i] = {"cls": ScriptSafeWorker, "options": {"worker_kwargs": opts, "env": worker_env}}
    # A template for cluster.scale(): new workers get the first one's options (a GPU box stays 1/GPU).
    template = workers[0] if workers else None
    return SpecCluster(
        workers=workers,
        scheduler={"cls": Scheduler, "options": scheduler_opts},
        worker=template,
        silence_logs=silence,
        name="daskrecon-local",
    )


def scheduler_workers(client: Client, timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """Each current worker's record on the scheduler (address -> info), asked for now.

    Not ``client.scheduler_info()["workers"]``: that returns the client's cached identity,
    which the client's own periodic refresh (``distributed.client.scheduler-info-interval``)
    replaces with one that lists no workers. A call that races the refresh then sees an empty
    cluster (seen in CI: operators sharded over "0 workers").
    """
    identity = bounded(client, client.scheduler.identity, n_workers=-1, what="asking the scheduler for its workers",
                       timeout=timeout)
    return dict(identity["workers"])


_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# oneDNN (torch's CPU convolutions) caches up to 1024 primitives, ~1.5-17 MiB each, one per
# layer and input shape: tiles and chunks at the image's borders have many shapes, and a 3-D
# out-of-core worker grew by 1 GiB of unmanaged memory this way (measured: 752 -> 1271 MiB
# after 27 window shapes; 840 with 8 entries). 16 keeps the shapes of the interior cached
# (2-D DnCNN tile: 0.279 s against 0.278 s with 1024; 0.303 s with none).
ONEDNN_CACHE = "16"
# glibc settings of local workers (``malloc=``). "safe" is distributed's: freed memory above
# 64 KiB goes back to the OS at once, but setting a trim threshold also pins glibc's mmap
# threshold at 128 KiB, so every activation and FFT buffer is mapped and page-faulted afresh.
# "fast" serves buffers under 32 MiB from the heap and trims above 64 MiB: 2.2x faster FFT
# gradients, 13 % faster PnP (benchmarks/bench_gradient.py, bench_pnp.py). Alone it let a 2 GiB
# out-of-core worker keep 1.84 GiB of freed memory and pause for good; with it comes
# daskrecon.runtime.memory_trim.TrimUnderPressure, which returns free heap pages whenever a worker
# passes half its limit (tested), so it is the default.
MALLOC_MODES = ("safe", "fast")
_MALLOC_FAST = {"MALLOC_TRIM_THRESHOLD_": str(64 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def local_sizes(n_gpus: int, n_workers: int | None, threads_per_worker: int | None,
                torch_threads: int | None) -> tuple[int, int, int]:
    """Workers, threads per worker and torch threads of a local cluster: one per GPU, else up to 4 workers,
    torch threads so that workers x threads never oversubscribe the cores."""
    cores = _available_cores()
    n_workers = n_workers or (n_gpus if n_gpus else max(1, min(cores, 4)))
    threads = threads_per_worker or 1
    torch_threads = torch_threads or max(1, cores // (n_workers * threads))
    return n_workers, threads, torch_threads


def start_local_cluster(*, n_workers: int | None, threads_per_worker: int | None, torch_threads: int | None,
                        memory_limit: Any, device_mode: str | None, processes: bool, dashboard_address: str,
                        malloc: str, cluster_kwargs: dict) -> tuple[Any, int, int]:
    """A local cluster sized to this machine: ``(cluster, n_workers, torch_threads)``.

    Worker processes start in fresh interpreters (:func:`local_cluster`), one per GPU when
    there are GPUs (``device_mode`` allowing), with the thread and allocator environment of
    ``malloc``; ``processes=False`` gives threads of this process.
    """
    import torch
    from distributed import LocalCluster

    use_gpu = device_mode != "cpu" and torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if use_gpu else 0
    n_workers, threads, torch_threads = local_sizes(n_gpus, n_workers, threads_per_worker, torch_threads)
    if use_gpu:
        threads = 1  # one task per GPU at a time (dask-cuda's default)
    ours = {k: str(torch_threads) for k in _THREAD_ENV}
    ours["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)
    if malloc == "fast":
        ours.update(_MALLOC_FAST)
    env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **ours}
    memory_limit = memory_limit if memory_limit is not None else "auto"
    try:
        if not processes:  # threads of this process: nothing to spawn, nothing to re-import
            cluster = LocalCluster(processes=False, n_workers=n_workers, threads_per_worker=threads,
                                   dashboard_address=dashboard_address, memory_limit=memory_limit, **cluster_kwargs)
        elif sys.platform == "win32":
            cluster = _start_spawned_cluster(n_workers, threads, memory_limit, env, ours, dashboard_address,
                                             cluster_kwargs)
        else:
            # Worker processes started from a fresh interpreter: they never run the user's script,
            # so a context opened at module level without a main guard works.
            cluster = local_cluster(n_workers, threads, memory_limit=memory_limit, dashboard_address=dashboard_address,
                                    env=env, gpus=n_gpus, **cluster_kwargs)
    except OSError as exc:
        raise ClusterConnectionError(f"could not start a local Dask cluster: {exc}") from exc
    return cluster, n_workers, torch_threads


def _start_spawned_cluster(n_workers: int, threads: int, memory_limit: Any, env: dict, ours: dict,
                           dashboard_address: str, cluster_kwargs: dict) -> Any:
    """Windows: distributed's LocalCluster (its workers re-import the script: it needs a main guard)."""
    from distributed import LocalCluster

    if spawned_by_multiprocessing():
        raise DaskreconError(
            "DistributedContext() ran again inside a worker process that imported your script: on Windows "
            "the script must open the context under `if __name__ == \"__main__\":`"
        )
    # distributed lets this process's environment override the config, and its nanny writes
    # the pre-spawn environment into this process: set ours here for the start, then put
    # back what the driver had, so a later context starts from the same state.
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(ours)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
            return LocalCluster(processes=True, n_workers=n_workers, threads_per_worker=threads,
                                dashboard_address=dashboard_address, memory_limit=memory_limit,
                                **{"host": "127.0.0.1", **cluster_kwargs})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def configure_workers(client: Client, *, malloc: str, torch_threads: int | None, device_mode: str | None,
                      timeout: float, on_membership: Any, tf32: bool = False) -> int | None:
    """Install daskrecon's plugins on a cluster; the membership counter's start (``None``: not tracked).

    The scheduler plugin that releases tasks restricted to departed workers (and announces
    joins and departures to ``on_membership``), the memory trim with ``malloc="fast"``, the
    torch thread count, the release of the GPU libraries' pages on workers that use no GPU
    (:class:`~daskrecon.runtime.memory_trim.ReleaseGpuLibraries`), fp32 or TF32 arithmetic on GPUs
    (``tf32``; not for ``device_mode="cpu"``), and a check that ``device_mode="gpu"`` finds GPUs.
    """
    import torch

    from daskrecon.errors import DeviceError
    from daskrecon.runtime.memory_trim import ReleaseGpuLibraries, TrimUnderPressure
    from daskrecon.runtime.scheduler_plugin import MEMBERSHIP_TOPIC, ReleaseOrphanedRestrictions

    membership = None
    try:
        plugin = ReleaseOrphanedRestrictions()
        bounded(client, client._register_scheduler_plugin, plugin=plugin, name=plugin.name, idempotent=True,
                what="installing daskrecon's scheduler plugin", timeout=timeout)
    except Exception as exc:  # a remote scheduler without daskrecon installed
        warnings.warn(f"could not install daskrecon's scheduler plugin ({exc}); when a worker leaves, "
                      "its operators' tasks wait until stall_timeout and then fail", stacklevel=4)
    else:
        membership = 0
        client.subscribe_topic(MEMBERSHIP_TOPIC, on_membership)
    if malloc == "fast":  # keep the fast allocator from holding freed memory near the limit
        bounded(client, client._register_worker_plugin, plugin=TrimUnderPressure(), name=TrimUnderPressure.name,
                idempotent=True, what="installing the memory trim on the workers", timeout=timeout)
    if torch_threads is not None:
        bounded(client, client._register_worker_plugin, plugin=TorchThreads(torch_threads),
                name="daskrecon-torch-threads", idempotent=True, what="setting torch threads on the workers",
                timeout=timeout)
    if device_mode != "gpu" and default("context.release-gpu-libraries"):
        plugin = ReleaseGpuLibraries(always=device_mode == "cpu")
        bounded(client, client._register_worker_plugin, plugin=plugin, name=plugin.name, idempotent=True,
                what="releasing the GPU libraries' pages on CPU workers", timeout=timeout)
    if device_mode != "cpu":
        bounded(client, client._register_worker_plugin, plugin=GpuFloat32(tf32), name="daskrecon-gpu-float32",
                idempotent=True, what="setting the GPUs' fp32 arithmetic on the workers", timeout=timeout)
    if device_mode == "gpu":
        has_gpu = bounded(client, client._run, torch.cuda.is_available, what="asking the workers for GPUs",
                          timeout=timeout)
        if not any(has_gpu.values()):
            raise DeviceError(
                "device_mode='gpu' but no worker of the cluster sees a CUDA device "
                f"(workers: {sorted(has_gpu)}); start GPU workers or use device_mode=None"
            )
    return membership


class GpuFloat32(WorkerPlugin):
    """Worker plugin: fp32 convolutions and matrix products on the GPU in IEEE fp32, or TF32 (``tf32``),
    on every (also restarted) worker; torch's own default rounds cuDNN's to TF32."""

    idempotent = True

    def __init__(self, tf32: bool) -> None:
        self.tf32 = tf32

    def setup(self, worker: Any) -> None:
        array_tasks.set_tf32(self.tf32)


class TorchThreads(WorkerPlugin):
    """Worker plugin: bound torch's intra-op threads on every (also restarted) worker."""

    idempotent = True

    def __init__(self, n_threads: int) -> None:
        self.n_threads = n_threads

    def setup(self, worker: Any) -> None:
        array_tasks.set_torch_threads(self.n_threads)
