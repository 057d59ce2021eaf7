"""
On a GPU machine with dask-cuda
===============================

``DistributedContext()`` starts one worker per GPU (``LocalCUDACluster`` when dask-cuda is
installed: ``pip install 'daskrecon[gpu]'``; otherwise one nanny per GPU with its own
``CUDA_VISIBLE_DEVICES``). Operators and the denoiser are placed on each worker's GPU; the
driver gets its results on ``ctx.device``. To tune the cluster, build it yourself and pass it.
"""

import torch

import daskrecon as dr
from daskrecon.demo import demo_problem
from daskrecon.models import bundled_denoiser

if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to show")
    else:
        from dask_cuda import LocalCUDACluster

        # dask-cuda's dashboard listens on every interface by default (":8787"): keep it on this machine
        cluster = LocalCUDACluster(threads_per_worker=1, rmm_allocator_external_lib_list=["torch"],
                                   dashboard_address="127.0.0.1:8787")
        with dr.DistributedContext(cluster, device_mode="gpu") as ctx:
            print(ctx, ctx.device)
            x_true, ops, y = demo_problem(1024)
            dden = dr.distribute(bundled_denoiser(), ctx, patch_size=512, overlap=8)
            x = dr.reconstruct(dr.distribute(ops, ctx), y, dden, algorithm="red", n_iter=30, step_size=0.3,
                               red_weight=0.3, x_true=x_true)
        cluster.close()
