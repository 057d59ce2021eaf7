"""`DistributedContext`: owns or attaches to a Dask cluster for the lifetime of a ``with`` block."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from distributed import Client
from distributed.deploy import Cluster

from daskrecon.errors import ContextMismatchError, DeviceError
from daskrecon.frontend.collectives import SingleRank
from daskrecon.planning.sharding import SHARDINGS, assign_owners
from daskrecon.runtime.cluster import MALLOC_MODES, MIN_WORKER_MEMORY, configure_workers, scheduler_workers
from daskrecon.runtime.connection import Connection, connect
from daskrecon.runtime.defaults import pick
from daskrecon.runtime.roster import WorkerRoster

__all__ = ["DistributedContext", "one_context"]

_DEVICE_MODES = (None, "cpu", "gpu")


class DistributedContext(SingleRank):
    """Connection to the Dask cluster that runs daskrecon's tasks.

    Use it as a context manager. A context that starts a cluster closes it on exit;
    a cluster or client it was given is left running.

    (``sharding``, ``dashboard_address``, ``timeout``, ``fan_in``, ``stall_timeout`` and
    ``malloc`` default to ``None``: the configured value, ``daskrecon.context.*`` in
    ``dask.config`` — the defaults below unless set; see ``docs/configuration.md``.)

    Parameters
    ----------
    cluster : None, str, distributed.Client or distributed.deploy.Cluster
        ``None`` starts a local cluster sized to this machine: one worker per GPU when GPUs
        are visible and ``device_mode`` allows them (each sees its own GPU as ``cuda:0``),
        else CPU worker processes. Its workers start in fresh interpreters
        (:mod:`daskrecon.runtime.cluster`), so a script may open the context at module level without
        ``if __name__ == "__main__":``. For dask-cuda's extras (RMM pools, device spilling,
        UCX), pass a ``dask_cuda.LocalCUDACluster`` instead. A string is a
        scheduler address (``"tcp://host:8786"``). A ``Cluster`` may come from
        dask-jobqueue (``SLURMCluster``...), dask-cuda or anything else.
    n_workers : int, optional
        Workers of the local cluster (default: the GPU count, else ``min(cores, 4)``).
    threads_per_worker : int, optional
        Dask threads per local worker (default 1).
    memory_limit : str or int, optional
        Memory limit per local worker (``"2GiB"``...), default ``"auto"``.
    malloc : {"fast", "safe"}
        glibc settings of local workers. ``"fast"`` (default): activations and FFT buffers reuse
        heap memory instead of being page-faulted afresh per call (2.2x faster FFT gradients, 13 %
        faster PnP here), returned to the OS when a worker passes half its memory limit
        (:class:`~daskrecon.runtime.memory_trim.TrimUnderPressure`). ``"safe"``: distributed's.
    device_mode : {None, "cpu", "gpu"}
        ``None``: GPUs when the workers have them, else CPU. ``"gpu"`` without a GPU
        raises :class:`~daskrecon.errors.DeviceError`.
    sharding : {"round_robin", "block"}
        Which worker owns which operator (:func:`daskrecon.planning.sharding.assign_owners`; default
        ``"round_robin"``). Results never depend on it.
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
    stall_timeout : float
        Seconds a call may go without progress (a task finishing, changing state or executing on
        a worker that answers) before :class:`~daskrecon.errors.StalledError` names what is stuck
        (default 120); an input that cannot be transferred raises
        :class:`~daskrecon.errors.TransferError` at once.
    tf32 : bool
        Let the workers' GPUs round fp32 convolutions and matrix products to TF32 (cuDNN's and
        cuBLAS's ``allow_tf32``). Default ``False``: fp32 on a GPU worker is IEEE fp32, so the
        tiles equal the untiled network and the operators deepinv's, as on CPUs; TF32 is faster
        on tensor cores but rounds to a 10-bit mantissa (about 1e-3 relative) without measuring
        it — ``precision="bf16"``/``"fp16"`` run faster still, with a measured error budget
        (docs/precision.md). CPU workers are unaffected.
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
        Always 0: this process, the driver, is the only rank.
    world_size : int
        Always 1: every call returns its whole result to the driver, so deepinv's collectives
        are those of a one-rank group (:mod:`daskrecon.frontend.collectives`).
    num_workers : int
        Number of Dask workers.
    local_cluster_options : dict
        What a local cluster is started with (``cluster=None``).
    use_dist : bool
        ``False``: no ``torch.distributed`` process group (code guarded by it runs as in one process).
    device : torch.device
        Where results returned to the driver are placed.
    client : distributed.Client
    dashboard_link : str or None

    Examples
    --------
    >>> import daskrecon as dr
    >>> with dr.DistributedContext(n_workers=2, processes=False, dashboard_address="127.0.0.1:0") as ctx:
    ...     ctx.num_workers, ctx.world_size
    (2, 1)
    """

    def __init__(
        self,
        cluster: None | str | Client | Cluster = None,
        *,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        memory_limit: str | int | None = None,
        device_mode: str | None = None,
        sharding: str | None = None,
        seed: int | None = None,
        processes: bool = True,
        dashboard_address: str | None = None,
        timeout: float | None = None,
        torch_threads: int | None = None,
        fan_in: int | None = None,
        stall_timeout: float | None = None,
        backend: str | None = None,
        cleanup: bool = True,
        seed_offset: bool = True,
        deterministic: bool = False,
        malloc: str | None = None,
        tf32: bool | None = None,
        **cluster_kwargs: Any,
    ) -> None:
        # None: the configured default (daskrecon.context.* in dask.config: docs/configuration.md)
        sharding, dashboard_address = pick(sharding, "context.sharding"), pick(dashboard_address,
                                                                             "context.dashboard-address")
        timeout, fan_in = pick(timeout, "context.timeout"), pick(fan_in, "context.fan-in")
        stall_timeout, malloc = pick(stall_timeout, "context.stall-timeout"), pick(malloc, "context.malloc")
        tf32 = pick(tf32, "context.tf32")
        if not isinstance(tf32, bool):
            raise TypeError(f"tf32 must be True or False, got {tf32!r}")
        _check_options(cluster, malloc, device_mode, sharding, fan_in, stall_timeout,
                       n_workers=n_workers, threads_per_worker=threads_per_worker, torch_threads=torch_threads)
        if backend is not None:
            warnings.warn(f"backend={backend!r} is ignored: daskrecon communicates through Dask", stacklevel=2)
        self._cluster_arg = cluster
        self.local_cluster_options = {
            "n_workers": n_workers, "threads_per_worker": threads_per_worker, "torch_threads": torch_threads,
            "memory_limit": memory_limit, "device_mode": device_mode, "processes": processes,
            "dashboard_address": dashboard_address, "malloc": malloc, "cluster_kwargs": cluster_kwargs}
        self.device_mode, self.sharding, self.torch_threads, self.malloc = device_mode, sharding, torch_threads, malloc
        self.tf32 = tf32
        self.seed, self.seed_offset, self.deterministic, self.cleanup = seed, seed_offset, deterministic, cleanup
        self.timeout, self.fan_in, self.stall_timeout = timeout, fan_in, float(stall_timeout)
        self.rank = 0
        self._conn: Connection | None = None
        self._roster: WorkerRoster | None = None

    def __enter__(self) -> DistributedContext:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> DistributedContext:
        """Start or connect to the cluster (``__enter__`` calls this)."""
        if self._conn is not None:
            return self
        if self.device_mode == "gpu" and self._cluster_arg is None and not torch.cuda.is_available():
            raise DeviceError(
                "device_mode='gpu' but torch sees no CUDA device on this machine; "
                "use device_mode=None (auto) or 'cpu', or pass a cluster whose workers have GPUs"
            )
        self._conn = connect(self._cluster_arg, timeout=self.timeout, local=self.local_cluster_options)
        self._roster = WorkerRoster(self._conn.client, self.stall_timeout)
        try:
            self._roster.track(configure_workers(
                self._conn.client, malloc=self.malloc, torch_threads=self.torch_threads or self._conn.torch_threads,
                device_mode=self.device_mode, timeout=self.setup_timeout, on_membership=self._roster.on_change,
                tf32=self.tf32))
        except Exception:
            self.close()
            raise
        if self._cluster_arg is not None:  # a local cluster's limit was checked before it started
            _warn_small_workers(self._conn.client, self.setup_timeout)
        if self.seed is not None:
            torch.manual_seed(self.seed)
        if self.deterministic:
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        return self

    def close(self) -> None:
        """Close what this context started; leave what it was given running."""
        if self._roster is not None:
            self._roster.close()
        if self._conn is not None:
            self._conn.close(self.cleanup)
        self._conn = self._roster = None

    @property
    def client(self) -> Client:
        """The :class:`distributed.Client` (raises outside the ``with`` block)."""
        if self._conn is None:
            raise RuntimeError("DistributedContext is not started: use it in a `with` block or call start()")
        return self._conn.client

    @property
    def cluster(self) -> Cluster | None:
        """The cluster object, when one is known."""
        if self._conn is None:
            return None
        return self._conn.cluster or getattr(self._conn.client, "cluster", None)

    @property
    def membership(self) -> int | None:
        """A counter that changes whenever a worker joins or leaves (``None``: not tracked); placements
        compare it to decide whether to re-plan without asking the scheduler on every call."""
        return None if self._roster is None else self._roster.generation

    def workers(self) -> list[str]:
        """Addresses of the current workers, sorted (a stable order for sharding)."""
        return list(self.worker_threads())

    def worker_threads(self) -> dict[str, int]:
        """Threads of each current worker, by address, sorted (asked of the scheduler again only after a
        join or departure is announced, or every 30 s: :class:`~daskrecon.runtime.roster.WorkerRoster`)."""
        _ = self.client  # raises when not started
        return self._roster.threads()

    @property
    def setup_timeout(self) -> float:
        """Bound on set-up calls to every worker (plugins): they may still be importing torch."""
        return max(self.timeout, self.stall_timeout, 60.0)

    @property
    def num_workers(self) -> int:
        """Number of Dask workers now (``world_size`` is the number of *ranks*: 1, the driver)."""
        return len(self.workers())

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`close`."""
        return self._conn is not None

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

    def __repr__(self) -> str:
        if self._conn is None:
            return "DistributedContext(not started)"
        return (
            f"DistributedContext(workers={self.num_workers}, sharding={self.sharding!r}, "
            f"device_mode={self.device_mode!r}, dashboard={self.dashboard_link})"
        )


def one_context(**contexts: DistributedContext) -> DistributedContext:
    """The context shared by the objects a call combines, named by keyword (``physics=dphys.ctx, ...``).

    Raises
    ------
    RuntimeError
        One of them is not started (any more).
    ContextMismatchError
        They come from contexts with different clients: their operators, models and futures live on
        different clusters (or belong to another client), and mixing them fails later in distributed's
        words, or hangs.
    """
    (first_name, first), *rest = contexts.items()
    for name, ctx in rest:
        if ctx is not first and ctx.client is not first.client:
            raise ContextMismatchError(
                f"{first_name} and {name} were distributed with different DistributedContexts "
                f"({first_name}: {_where(first)}; {name}: {_where(ctx)}): distribute every object of one call "
                "with the same context, dr.distribute(obj, ctx)")
    return first


def _warn_small_workers(client: Client, timeout: float) -> None:
    """Warn when workers of a cluster we were given have a memory limit no worker runs daskrecon's tasks in."""
    small = {w: info.get("memory_limit") for w, info in scheduler_workers(client, timeout).items()
             if 0 < (info.get("memory_limit") or 0) < MIN_WORKER_MEMORY}
    if small:
        warnings.warn(
            f"{len(small)} worker(s) have a memory limit under {MIN_WORKER_MEMORY // 2**20} MiB "
            f"({', '.join(f'{w}: {m / 2**20:.0f} MiB' for w, m in sorted(small.items())[:4])}): a worker process "
            "holds ~600 MiB once torch and deepinv are loaded, and Dask pauses it at 80 % of its limit and "
            "restarts it at 95 %; start them with more (dask worker --memory-limit 2GiB, or the cluster class's "
            "memory option)", UserWarning, stacklevel=3)


def _where(ctx: DistributedContext) -> str:
    try:
        return f"scheduler {ctx.client.scheduler.address}, client {ctx.client.id}"
    except Exception:  # a client without a scheduler comm: its id still tells them apart
        return f"client {ctx.client.id}"


def _check_options(cluster: Any, malloc: str, device_mode: str | None, sharding: str, fan_in: Any, stall_timeout: Any,
                   **counts: Any) -> None:
    """Raise on options a context cannot start with (before anything starts)."""
    if malloc not in MALLOC_MODES:
        raise ValueError(f"malloc must be one of {MALLOC_MODES}, got {malloc!r}")
    if device_mode not in _DEVICE_MODES:
        raise ValueError(f"device_mode must be one of {_DEVICE_MODES}, got {device_mode!r}")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    for name, value in counts.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(fan_in, int) or fan_in < 2:
        raise ValueError(f"fan_in must be an int >= 2, got {fan_in!r}")
    if not isinstance(stall_timeout, (int, float)) or not stall_timeout > 0:
        raise ValueError(f"stall_timeout must be a positive number of seconds, got {stall_timeout!r}")
    if not (cluster is None or isinstance(cluster, (str, Client, Cluster))):
        raise TypeError(
            "cluster must be None (start a local cluster), a scheduler address string, "
            f"a distributed.Client or a Cluster object, got {type(cluster).__name__}"
        )
