"""A one-worker-per-GPU cluster without dask-cuda (used when dask-cuda is not installed)."""

from __future__ import annotations

from typing import Any

import torch
from distributed import Nanny, Scheduler, SpecCluster

__all__ = ["gpu_spec_cluster"]


def gpu_spec_cluster(
    n_workers: int | None = None,
    dashboard_address: str = "127.0.0.1:8787",
    memory_limit: str | int = "auto",
    **_: Any,
) -> SpecCluster:
    """One nanny-managed worker per visible GPU, each seeing only its own device.

    Inside a task ``cuda:0`` is then that worker's GPU (dask-cuda's convention).
    """
    n = n_workers or torch.cuda.device_count()
    workers = {
        f"gpu-{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "memory_limit": memory_limit,
                "env": {"CUDA_VISIBLE_DEVICES": str(i % max(1, torch.cuda.device_count()))},
                "resources": {"GPU": 1},
                "host": "127.0.0.1",
            },
        }
        for i in range(n)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": dashboard_address, "host": "127.0.0.1"}}
    return SpecCluster(scheduler=scheduler, workers=workers)
