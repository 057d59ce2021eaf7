"""connect(): a client on a cluster started, reached or given; closes only what it started."""

import time

import pytest
from distributed import Client, LocalCluster

from daskrecon.errors import ClusterConnectionError
from daskrecon.runtime.connection import Connection, connect


def test_a_given_client_or_cluster_is_left_running():
    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        given = connect(client, timeout=10, local={})
        assert given.client is client and not given.owns_client and not given.owns_cluster
        given.close()
        assert client.status == "running"
        reached = connect(cluster, timeout=10, local={})
        assert reached.owns_client and not reached.owns_cluster and reached.client is not client
        reached.close()
        assert reached.client.status == "closed" and cluster.status.name == "running"
        assert client.submit(sum, [1, 2]).result() == 3


def test_an_unreachable_scheduler_is_named_in_time():
    t0 = time.monotonic()
    with pytest.raises(ClusterConnectionError, match=r"tcp://127.0.0.1:9.*cluster=None"):
        connect("tcp://127.0.0.1:9", timeout=1, local={})
    assert time.monotonic() - t0 < 30


def test_a_cluster_without_workers_is_refused_and_the_client_closed():
    with LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            pytest.raises(ClusterConnectionError, match="no worker joined the cluster within .*dask worker"):
        connect(cluster.scheduler_address, timeout=1, local={})


def test_close_leaves_the_cluster_without_cleanup():
    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        conn = Connection(Client(cluster), cluster, owns_client=True, owns_cluster=True)
        conn.close(cleanup=False)
        assert conn.client.status == "closed" and cluster.status.name == "running"
