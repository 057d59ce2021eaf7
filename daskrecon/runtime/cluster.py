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
from typing import Any

import dask
from distributed import Client, Scheduler, SpecCluster
from distributed.deploy.subprocess import SubprocessWorker
from distributed.worker_memory import parse_memory_limit

from daskrecon.errors import DaskreconError
from daskrecon.runtime.waiting import bounded

__all__ = ["ScriptSafeWorker", "local_cluster", "scheduler_workers", "spawned_by_multiprocessing"]

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
        self.process = await asyncio.create_subprocess_exec(*cmd, env={**os.environ, **self.env})


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
