"""deepinv.distributed side of bench_pnp.py (deepinv's own PnP demo loop); one process or torchrun."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import timeit  # noqa: E402
from _pnp_problem import problem  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepinv.distributed import DistributedContext, distribute  # noqa: E402
from deepinv.optim import L2, PnP  # noqa: E402
from deepinv.physics import stack  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--size", type=int, default=512)
p.add_argument("--iterations", type=int, default=5)
p.add_argument("--repeats", type=int, default=1)
p.add_argument("--device-mode", default="cpu", choices=["cpu", "gpu"])
args = p.parse_args()
ops, y, model, x_true = problem(args.size)
with DistributedContext(device_mode=args.device_mode) as ctx:
    y, x_true = y.to(ctx.device), x_true.to(ctx.device)
    dphys = distribute(stack(*ops), ctx)
    dfid = distribute(L2(), ctx)
    prior = PnP(denoiser=distribute(model, ctx, patch_size=256, overlap=20))

    def run():
        if dist.is_initialized():
            dist.barrier()
        x = torch.zeros_like(x_true)
        with torch.no_grad():
            for _ in range(args.iterations):
                x = prior.prox(x - 0.3 * dfid.grad(x, y, dphys), sigma_denoiser=0.05)
        if x.is_cuda:
            torch.cuda.synchronize()
        return x

    r = timeit(run, args.repeats, warmup=0)
    if ctx.rank == 0:
        out = r.pop("_out")
        r.update(world_size=ctx.world_size, checksum=float(out.double().sum()))
        print("RESULT " + json.dumps(r), flush=True)
