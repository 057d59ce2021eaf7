"""deepinv.distributed side of bench_tiling.py; run as one process or under torchrun."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import timeit  # noqa: E402
from _models import make_model  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepinv.distributed import DistributedContext, distribute  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--size", type=int, required=True)
p.add_argument("--patch", type=int, required=True)
p.add_argument("--overlap", type=int, required=True)
p.add_argument("--repeats", type=int, default=1)
p.add_argument("--device-mode", default="cpu", choices=["cpu", "gpu"])
args = p.parse_args()

model, sigma = make_model(args.model)
x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
with DistributedContext(device_mode=args.device_mode) as ctx:
    x = x.to(ctx.device)
    dden = distribute(model, ctx, patch_size=args.patch, overlap=args.overlap)

    def step(inp=x):
        if dist.is_initialized():
            dist.barrier()
        with torch.no_grad():
            out = dden(inp, sigma)
        if out.is_cuda:
            torch.cuda.synchronize()
        return out

    step(x[..., : 2 * args.patch, : 2 * args.patch].contiguous())  # warm-up on a small image
    r = timeit(step, args.repeats, warmup=0)
    if ctx.rank == 0:
        out = r.pop("_out")
        r.update(world_size=ctx.world_size, torch_threads=torch.get_num_threads(), checksum=float(out.double().sum()))
        print("RESULT " + json.dumps(r), flush=True)
