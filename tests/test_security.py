"""The multi-node setup the README documents: a TLS-secured cluster handed to the context."""

import torch
import deepinv as dinv
from deepinv.optim import L2

import daskrecon as dr
from daskrecon.runtime.cluster import scheduler_workers
from daskrecon.testing import assert_allclose

from helpers import blurs, noisy_measurements


def test_a_tls_cluster_runs_a_gradient():
    from distributed import Client, LocalCluster
    from distributed.security import Security

    sec = Security.temporary()  # self-signed CA, certificate and key, encryption required
    assert sec.require_encryption
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, security=sec, protocol="tls",
                      dashboard_address="127.0.0.1:0", host="127.0.0.1") as cluster, Client(cluster, security=sec) as client:
        assert client.scheduler.address.startswith("tls://")
        workers = scheduler_workers(client)
        assert len(workers) == 1 and all(a.startswith("tls://") for a in workers)
        ops = blurs(2)
        x = torch.rand(1, 3, 24, 20)
        y = noisy_measurements(ops, torch.rand(1, 3, 24, 20))
        with dr.DistributedContext(client) as ctx:
            g = dr.distribute(L2(), ctx).grad(x, y, dr.distribute(ops, ctx))
        assert_allclose(g, L2().grad(x, y, dinv.physics.stack(*ops)), atol=1e-5)
