"""`DistributedContext`: owns or attaches to a Dask cluster for the lifetime of a ``with`` block."""

from __future__ import annotations

import os
import warnings
from typing import Any

import dask
import torch
from distributed import Client, LocalCluster
from distributed.deploy import Cluster
from distributed.diagnostics.plugin import WorkerPlugin

from daskrecon.errors import ClusterConnectionError, DeviceError
from daskrecon.sharding import SHARDINGS, assign_owners

__all__ = ["DistributedContext"]

_DEVICE_MODES = (None, "cpu", "gpu")
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# glibc settings of local workers (``malloc=``). "safe" keeps distributed's: freed memory above
# 64 KiB goes back to the OS at once, so RSS follows the data and a memory limit is honoured.
# Setting a trim threshold also pins glibc's mmap threshold at 128 KiB, so every network
# activation is mmap'd and unmapped again (page faults): "fast" serves activations under 32 MiB
# from the heap and trims above 64 MiB — ~15 % faster PnP, but in benchmarks/bench_ooc_pnp.py a
# 2 GiB worker kept 1.84 GiB and paused for good. Measured by benchmarks/bench_pnp.py.
MALLOC_MODES = ("safe", "fast")
_MALLOC_FAST = {"MALLOC_TRIM_THRESHOLD_": str(64 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def scheduler_workers(client: Client) -> dict[str, dict[str, Any]]:
    """Each current worker's record on the scheduler (address -> info), asked for now.

    Not ``client.scheduler_info()["workers"]``: that returns the client's cached identity,
    which the client's own periodic refresh (``distributed.client.scheduler-info-interval``)
    replaces with one that lists no workers. A call that races the refresh then sees an empty
    cluster (seen in CI: operators sharded over "0 workers").
    """
    return dict(client.sync(client.scheduler.identity, n_workers=-1)["workers"])


class DistributedContext:
    """Connection to the Dask cluster that runs daskrecon's tasks.

    Use it as a context manager. A context that starts a cluster closes it on exit;
    a cluster or client it was given is left running.

    Parameters
    ----------
    cluster : None, str, distributed.Client or distributed.deploy.Cluster
        ``None`` starts a local cluster sized to this machine: one worker per GPU
        (``dask_cuda.LocalCUDACluster`` when it is installed) when GPUs are visible and
        ``device_mode`` allows them, else CPU worker processes. A string is a
        scheduler address (``"tcp://host:8786"``). A ``Cluster`` may come from
        dask-jobqueue (``SLURMCluster``...), dask-cuda or anything else.
    n_workers : int, optional
        Workers of the local cluster (default: the GPU count, else ``min(cores, 4)``).
    threads_per_worker : int, optional
        Dask threads per local worker (default 1).
    memory_limit : str or int, optional
        Memory limit per local worker (``"2GiB"``...), default ``"auto"``.
    malloc : {"safe", "fast"}
        glibc settings of local workers. ``"safe"`` (default): distributed's, freed memory
        returns to the OS at once, so memory limits hold (out-of-core runs). ``"fast"``:
        network activations reuse heap memory instead of being mapped and unmapped per call,
        ~15 % faster for in-memory reconstructions, but a worker keeps up to tens of MiB per
        thread it no longer uses — do not combine with a tight ``memory_limit``.
    device_mode : {None, "cpu", "gpu"}
        ``None``: GPUs when the workers have them, else CPU. ``"gpu"`` without a GPU
        raises :class:`~daskrecon.errors.DeviceError`.
    sharding : {"round_robin", "block"}
        Which worker owns which operator (see :func:`daskrecon.sharding.assign_owners`).
        Results never depend on it.
    seed : int, optional
        Seeds the driver's torch RNG. Noise drawn on workers is seeded per operator
        from the driver's RNG, so it does not depend on the number of workers.
    processes : bool
        Local cluster with worker processes (default) or threads.
    dashboard_address : str
        Where the local cluster's dashboard listens; localhost only by default.
    timeout : float
        Seconds to wait for a scheduler or for the first worker.
    torch_threads : int, optional
        torch intra-op threads per worker. Default for a local cluster: cores divided
        by ``n_workers * threads_per_worker`` so that the machine is not oversubscribed;
        attached clusters are left as they are unless this is given.
    fan_in : int
        Largest number of partial results one reduction task sums (default 4).
    backend, cleanup, seed_offset, deterministic
        Accepted for compatibility with ``deepinv.distributed.DistributedContext``.
        ``backend`` has no meaning on Dask (a warning is given if set); ``cleanup=False``
        keeps a cluster this context started running after exit; ``seed_offset`` is
        irrelevant since results do not depend on ranks; ``deterministic=True`` sets
        cuDNN to deterministic mode on the driver.
    **cluster_kwargs
        Passed to the local cluster class.

    Attributes
    ----------
    rank : int
        Always 0: this process is the driver.
    world_size : int
        Number of workers.
    device : torch.device
        Where results returned to the driver are placed.
    client : distributed.Client
    dashboard_link : str or None

    Examples
    --------
    >>> import daskrecon as dr
    >>> with dr.DistributedContext(n_workers=1, processes=False, dashboard_address=":0") as ctx:
    ...     ctx.world_size
    1
    """

    def __init__(
        self,
        cluster: None | str | Client | Cluster = None,
        *,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        memory_limit: str | int | None = None,
        device_mode: str | None = None,
        sharding: str = "round_robin",
        seed: int | None = None,
        processes: bool = True,
        dashboard_address: str = "127.0.0.1:8787",
        timeout: float = 30.0,
        torch_threads: int | None = None,
        fan_in: int = 4,
        backend: str | None = None,
        cleanup: bool = True,
        seed_offset: bool = True,
        deterministic: bool = False,
        malloc: str = "safe",
        **cluster_kwargs: Any,
    ) -> None:
        if malloc not in MALLOC_MODES:
            raise ValueError(f"malloc must be one of {MALLOC_MODES}, got {malloc!r}")
        if device_mode not in _DEVICE_MODES:
            raise ValueError(f"device_mode must be one of {_DEVICE_MODES}, got {device_mode!r}")
        if sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
        for name, value in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker),
                            ("torch_threads", torch_threads)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(fan_in, int) or fan_in < 2:
            raise ValueError(f"fan_in must be an int >= 2, got {fan_in!r}")
        if not (cluster is None or isinstance(cluster, (str, Client, Cluster))):
            raise TypeError(
                "cluster must be None (start a local cluster), a scheduler address string, "
                f"a distributed.Client or a Cluster object, got {type(cluster).__name__}"
            )
        if backend is not None:
            warnings.warn(f"backend={backend!r} is ignored: daskrecon communicates through Dask", stacklevel=2)
        self._cluster_arg = cluster
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker
        self.memory_limit = memory_limit
        self.device_mode = device_mode
        self.sharding = sharding
        self.seed = seed
        self.seed_offset = seed_offset
        self.deterministic = deterministic
        self.processes = processes
        self.dashboard_address = dashboard_address
        self.timeout = timeout
        self.torch_threads = torch_threads
        self.fan_in = fan_in
        self.cleanup = cleanup
        self.cluster_kwargs = cluster_kwargs
        self.malloc = malloc
        self.rank = 0
        self._client: Client | None = None
        self._cluster: Cluster | None = None
        self._owns_client = False
        self._owns_cluster = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> DistributedContext:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> DistributedContext:
        """Start or connect to the cluster (``__enter__`` calls this)."""
        if self._client is not None:
            return self
        if self.device_mode == "gpu" and self._cluster_arg is None and not torch.cuda.is_available():
            raise DeviceError(
                "device_mode='gpu' but torch sees no CUDA device on this machine; "
                "use device_mode=None (auto) or 'cpu', or pass a cluster whose workers have GPUs"
            )
        arg = self._cluster_arg
        if arg is None:
            self._cluster = self._start_local_cluster()
            self._owns_cluster = True
            self._client = Client(self._cluster)
            self._owns_client = True
        elif isinstance(arg, Client):
            self._client = arg
        else:
            self._client = self._connect(arg)
            self._owns_client = True
        try:
            self._client.wait_for_workers(1, timeout=self.timeout)
        except Exception as exc:
            self.close()
            raise ClusterConnectionError(
                f"no worker joined the cluster within timeout={self.timeout}s; "
                "scale the cluster (e.g. cluster.scale(jobs=...)) or raise timeout"
            ) from exc
        self._configure_workers()
        if self.seed is not None:
            torch.manual_seed(self.seed)
        if self.deterministic:
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        return self

    def close(self) -> None:
        """Close what this context started; leave what it was given running."""
        if self._client is not None and self._owns_client:
            self._client.close()
        if self._cluster is not None and self._owns_cluster and self.cleanup:
            self._cluster.close()
        self._client = None
        self._cluster = None

    def _connect(self, arg: str | Cluster) -> Client:
        try:
            return Client(arg, timeout=self.timeout)
        except (OSError, TimeoutError) as exc:
            where = arg if isinstance(arg, str) else getattr(arg, "scheduler_address", repr(arg))
            raise ClusterConnectionError(
                f"could not reach the Dask scheduler at {where!r} within timeout={self.timeout}s: {exc}. "
                "Check the address and that the scheduler is running, or pass cluster=None for a local cluster"
            ) from exc

    def _local_sizes(self, n_gpus: int) -> tuple[int, int, int]:
        cores = _available_cores()
        n_workers = self.n_workers or (n_gpus if n_gpus else max(1, min(cores, 4)))
        threads = self.threads_per_worker or 1
        torch_threads = self.torch_threads or max(1, cores // (n_workers * threads))
        return n_workers, threads, torch_threads

    def _start_local_cluster(self) -> Cluster:
        use_gpu = self.device_mode != "cpu" and torch.cuda.is_available()
        n_gpus = torch.cuda.device_count() if use_gpu else 0
        n_workers, threads, torch_threads = self._local_sizes(n_gpus)
        self._local_torch_threads = torch_threads
        kwargs = dict(
            n_workers=n_workers,
            threads_per_worker=threads,
            dashboard_address=self.dashboard_address,
        )
        if self.memory_limit is not None:
            kwargs["memory_limit"] = self.memory_limit
        kwargs.update(self.cluster_kwargs)
        ours = {k: str(torch_threads) for k in _THREAD_ENV}
        if self.malloc == "fast":
            ours.update(_MALLOC_FAST)
        env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **ours}
        # distributed lets this process's environment override the config, and its nanny writes
        # the pre-spawn environment into this process: set ours here for the start, then put
        # back what the driver had, so a later context starts from the same state.
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(ours)
        try:
            with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
                if use_gpu:
                    return self._start_gpu_cluster(kwargs)
                if self.processes:
                    kwargs.setdefault("host", "127.0.0.1")  # listen on localhost only
                return LocalCluster(processes=self.processes, **kwargs)
        except OSError as exc:
            raise ClusterConnectionError(f"could not start a local Dask cluster: {exc}") from exc
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _start_gpu_cluster(self, kwargs: dict) -> Cluster:
        kwargs = dict(kwargs, threads_per_worker=1)
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            from daskrecon._gpu import gpu_spec_cluster

            return gpu_spec_cluster(**kwargs)
        return LocalCUDACluster(**kwargs)

    def _configure_workers(self) -> None:
        from daskrecon._scheduler import ReleaseOrphanedRestrictions

        try:
            self.client.register_plugin(ReleaseOrphanedRestrictions())
        except Exception as exc:  # a remote scheduler without daskrecon installed
            warnings.warn(f"could not install daskrecon's scheduler plugin ({exc}); if every worker of the "
                          "cluster dies at once, work may wait for ever", stacklevel=3)
        threads = self.torch_threads or getattr(self, "_local_torch_threads", None)
        if threads is not None:
            self.client.register_plugin(_TorchThreads(threads), name="daskrecon-torch-threads")
        if self.device_mode == "gpu":
            has_gpu = self.client.run(torch.cuda.is_available)
            if not any(has_gpu.values()):
                raise DeviceError(
                    "device_mode='gpu' but no worker of the cluster sees a CUDA device "
                    f"(workers: {sorted(has_gpu)}); start GPU workers or use device_mode=None"
                )

    # ------------------------------------------------------------------ properties
    @property
    def client(self) -> Client:
        """The :class:`distributed.Client` (raises outside the ``with`` block)."""
        if self._client is None:
            raise RuntimeError("DistributedContext is not started: use it in a `with` block or call start()")
        return self._client

    @property
    def cluster(self) -> Cluster | None:
        """The cluster object, when one is known."""
        return self._cluster or getattr(self._client, "cluster", None)

    def workers(self) -> list[str]:
        """Addresses of the current workers, sorted (a stable order for sharding)."""
        return sorted(scheduler_workers(self.client))

    def worker_threads(self) -> dict[str, int]:
        """Threads of each current worker, by address, in :meth:`workers` order."""
        info = scheduler_workers(self.client)
        return {w: int(info[w].get("nthreads", 1)) for w in sorted(info)}

    @property
    def world_size(self) -> int:
        """Number of workers."""
        return len(self.workers())

    @property
    def is_dist(self) -> bool:
        """True while connected (work runs on a cluster); deepinv's older name."""
        return self._client is not None

    use_dist = is_dist

    @property
    def device(self) -> torch.device:
        """Device of tensors returned to the driver."""
        if self.device_mode != "cpu" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def dashboard_link(self) -> str | None:
        """URL of the Dask dashboard, when one is served."""
        try:
            return self.client.dashboard_link
        except Exception:  # no bokeh / no dashboard
            return None

    def owners(self, n_items: int) -> list[str]:
        """Worker address owning each of ``n_items`` items under this context's sharding."""
        workers = self.workers()
        return [workers[k] for k in assign_owners(n_items, len(workers), self.sharding)]

    def local_indices(self, num_items: int) -> list[int]:
        """All indices: the driver sees every item (deepinv compatibility)."""
        return list(range(num_items))

    def __repr__(self) -> str:
        if self._client is None:
            return "DistributedContext(not started)"
        return (
            f"DistributedContext(workers={self.world_size}, sharding={self.sharding!r}, "
            f"device_mode={self.device_mode!r}, dashboard={self.dashboard_link})"
        )


class _TorchThreads(WorkerPlugin):
    """Worker plugin: bound torch's intra-op threads on every (also restarted) worker."""

    idempotent = True

    def __init__(self, n_threads: int) -> None:
        self.n_threads = n_threads

    def setup(self, worker: Any) -> None:
        from daskrecon._worker import set_torch_threads

        set_torch_threads(self.n_threads)
