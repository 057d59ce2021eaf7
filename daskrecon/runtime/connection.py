"""Opening a client on a cluster — started here, reached by address, or given — and waiting for its workers.

:class:`~daskrecon.frontend.context.DistributedContext` holds one :class:`Connection` between its
``start`` and ``close``; what the connection started it closes, what it was given it leaves running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distributed import Client
from distributed.deploy import Cluster

from daskrecon.errors import ClusterConnectionError
from daskrecon.runtime.cluster import start_local_cluster

__all__ = ["Connection", "connect"]


@dataclass
class Connection:
    """A client, the cluster behind it when known, and which of them this connection started."""

    client: Client
    cluster: Cluster | None = None
    owns_client: bool = False
    owns_cluster: bool = False
    torch_threads: int | None = None  # torch threads chosen for the workers of a cluster started here

    def close(self, cleanup: bool = True) -> None:
        """Close what this connection started (the cluster only with ``cleanup``); leave the rest running."""
        if self.owns_client:
            self.client.close()
        if self.cluster is not None and self.owns_cluster and cleanup:
            self.cluster.close()


def connect(arg: None | str | Client | Cluster, *, timeout: float, local: dict[str, Any]) -> Connection:
    """A connection to ``arg`` whose workers have joined.

    Parameters
    ----------
    arg : None, str, Client or Cluster
        ``None`` starts a local cluster with ``local`` (the keywords of
        :func:`~daskrecon.runtime.cluster.start_local_cluster`) and waits for all its workers (they
        start in their own processes, and sharding over the first alone would pin every operator
        to it); otherwise waits for one worker.
    timeout : float
        Seconds to reach a scheduler and for the first worker (at least 120 s for a local cluster's
        workers, which import torch).

    Raises
    ------
    ClusterConnectionError
        The scheduler cannot be reached, or the workers do not join in time.
    """
    if arg is None:
        cluster, n_workers, torch_threads = start_local_cluster(**local)
        conn = Connection(Client(cluster), cluster, owns_client=True, owns_cluster=True, torch_threads=torch_threads)
        expect, wait_s = n_workers, max(timeout, 120.0)
    elif isinstance(arg, Client):
        conn, expect, wait_s = Connection(arg), 1, timeout
    else:
        conn, expect, wait_s = Connection(_client_of(arg, timeout), owns_client=True), 1, timeout
    try:
        conn.client.wait_for_workers(expect, timeout=wait_s)
    except Exception as exc:
        conn.close()
        raise ClusterConnectionError(
            f"{'the local workers did not all join' if conn.owns_cluster else 'no worker joined'} the cluster within "
            f"{wait_s:g} s; " + ("their processes' errors are printed above" if conn.owns_cluster else
                                "start workers (dask worker <scheduler address>), scale the cluster (e.g. "
                                "cluster.scale(jobs=...)) or raise timeout")
        ) from exc
    return conn


def _client_of(arg: str | Cluster, timeout: float) -> Client:
    try:
        return Client(arg, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        where = arg if isinstance(arg, str) else getattr(arg, "scheduler_address", repr(arg))
        err = ClusterConnectionError(
            f"could not reach the Dask scheduler at {where!r} within timeout={timeout}s: {exc}. "
            "Check the address and that the scheduler is running, or pass cluster=None for a local cluster"
        )
        err.unreachable = (where, f"within timeout={timeout}s: {exc}")
        raise err from exc
