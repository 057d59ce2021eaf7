"""deepinv.distributed side of bench_training.py: one unrolled training step, one process or torchrun."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import peak_rss_mib, timeit  # noqa: E402
from _training_problem import add_arguments, problem, train_step  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepinv.distributed import DistributedContext, distribute  # noqa: E402
from deepinv.physics import stack  # noqa: E402

p = argparse.ArgumentParser()
add_arguments(p)
p.add_argument("--device-mode", default="cpu", choices=["cpu", "gpu"])
args = p.parse_args()
ops, y, x_true, build = problem(args.size, args.depth, args.nf, args.unroll)
with DistributedContext(device_mode=args.device_mode) as ctx:
    y, x_true = y.to(ctx.device), x_true.to(ctx.device)
    dphys = distribute(stack(*ops), ctx)
    model = distribute(build(), ctx, patch_size=args.patch, overlap=args.overlap, max_batch_size=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def run():
        if dist.is_initialized():
            dist.barrier()
        return train_step(model, opt, y, dphys, x_true)  # its loss.item() waits for the GPU

    r = timeit(run, args.repeats, warmup=1)
    peaks = [peak_rss_mib()]
    if dist.is_initialized():
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, peaks[0])
        peaks = gathered
    if ctx.rank == 0:
        r.update(world_size=ctx.world_size, loss=r.pop("_out"), peak_rss_mib_per_process=peaks)
        print("RESULT " + json.dumps(r), flush=True)
