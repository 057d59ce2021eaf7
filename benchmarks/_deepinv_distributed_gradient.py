"""deepinv.distributed side of bench_gradient.py; run as one process or under torchrun."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import blur_problem, timeit  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepinv.optim import L2  # noqa: E402
from deepinv.physics import stack  # noqa: E402
from deepinv.distributed import DistributedContext, distribute  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--n-ops", type=int, default=16)
p.add_argument("--size", type=int, default=1024)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--use-fft", action="store_true", help="build the blurs with deepinv's own Blur(use_fft=True)")
args = p.parse_args()

ops, x, y = blur_problem(args.n_ops, args.size, use_fft=args.use_fft)
with DistributedContext(device_mode="cpu") as ctx:
    dphys = distribute(stack(*ops), ctx)
    dfid = distribute(L2(), ctx)

    def step():
        if dist.is_initialized():
            dist.barrier()
        return dfid.grad(x, y, dphys)

    r = timeit(step, args.repeats)
    if ctx.rank == 0:
        g = r.pop("_out")
        r.update(world_size=ctx.world_size, torch_threads=torch.get_num_threads(), checksum=float(g.double().sum()))
        print("RESULT " + json.dumps(r), flush=True)
