"""
On a GPU machine with dask-cuda
===============================

``DistributedContext(device_mode="gpu")`` alone starts one worker process per GPU, each seeing
its own GPU as ``cuda:0`` (``CUDA_VISIBLE_DEVICES``). For dask-cuda's extras (RMM pools, device
spilling, UCX), build a ``LocalCUDACluster`` (``pip install 'daskrecon[gpu]'``) and pass it, as
here. Operators and the denoiser are placed on each worker's GPU; the driver gets its results on
``ctx.device``. RMM is not a dependency of dask-cuda: torch is pointed at an RMM pool only
where RMM is installed, so that the two do not hold the GPU's memory twice.
"""

import torch

import daskrecon as dr
from daskrecon.demo import demo_problem
from daskrecon.models import bundled_denoiser

if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to show")
    else:
        import importlib.util

        from dask_cuda import LocalCUDACluster

        rmm = {"rmm_pool_size": "8GiB", "rmm_allocator_external_lib_list": ["torch"]} \
            if importlib.util.find_spec("rmm") else {}
        # dask-cuda's dashboard listens on every interface by default (":8787"): keep it on this machine
        cluster = LocalCUDACluster(threads_per_worker=1, dashboard_address="127.0.0.1:8787", **rmm)
        with dr.DistributedContext(cluster, device_mode="gpu") as ctx:
            print(ctx, ctx.device)
            x_true, ops, y = demo_problem(1024)
            dden = dr.distribute(bundled_denoiser(), ctx, patch_size=512, overlap=8)
            x = dr.reconstruct(dr.distribute(ops, ctx), y, dden, algorithm="red", n_iter=30, step_size=0.3,
                               red_weight=0.3, x_true=x_true)
        cluster.close()
