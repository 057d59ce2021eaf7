"""Bytes of each out-of-core iteration's graph, with the driver's inputs staged in the store and without.

A 1x1xSxS image (S = 1024 by default), a reflect blur and an Inpainting mask (half the
pixels), measurements and x_true given as tensors, PnP with a small DnCNN, 3 iterations
out of core (``storage="zarr"``) on 2 workers. Every graph the engine submits is pickled
(as the client sends it) and measured: once as daskrecon runs, once with the staging of
inputs switched off (``daskrecon.engine.loop.store_inputs`` replaced by the identity), where the
measurements, the mask and x_true ride inside every iteration's graph.

Writes benchmarks/results/graph_bytes.json.

    python benchmarks/bench_graph_bytes.py [--size 1024]
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402


def _run(size: int, staged: bool) -> list[int]:
    import deepinv as dinv
    import distributed
    import torch

    import daskrecon as dr
    from daskrecon.engine import loop as engine

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, size, size, generator=g)
    ops = [dinv.physics.Blur(filter=torch.ones(1, 1, 3, 3) / 9, padding="reflect"),
           dinv.physics.Inpainting(img_size=(1, size, size), mask=0.5, rng=torch.Generator().manual_seed(1))]
    y = [op(x) for op in ops]
    sizes: list[int] = []
    persist = distributed.Client.persist

    def recording(self, collections, *args, **kwargs):
        graph = {}
        for c in collections if isinstance(collections, (list, tuple)) else [collections]:
            graph.update(dict(c.__dask_graph__()))
        sizes.append(len(pickle.dumps(graph, protocol=5)))
        return persist(self, collections, *args, **kwargs)

    stage, remove = engine.store_inputs, engine.remove_stored_inputs
    distributed.Client.persist = recording
    if not staged:
        engine.store_inputs, engine.remove_stored_inputs = (lambda p, s: p), (lambda p, s: None)
    try:
        with dr.DistributedContext(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as ctx, \
                tempfile.TemporaryDirectory() as tmp:
            model = dinv.models.DnCNN(1, 1, pretrained=None, depth=3, nf=8).eval()
            dr.reconstruct(dr.distribute(ops, ctx), y, dr.distribute(model, ctx, patch_size=256, overlap=4),
                           n_iter=3, step_size=0.5, x_true=x, storage="zarr", checkpoint=tmp, progress=False)
    finally:
        distributed.Client.persist = persist
        engine.store_inputs, engine.remove_stored_inputs = stage, remove
    return sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    args = p.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    staged, unstaged = _run(args.size, True), _run(args.size, False)
    image = 4 * args.size ** 2
    res = {"workload": vars(args), "machine": machine(), "image_bytes": image,
           "graph_bytes_staged": staged, "graph_bytes_unstaged": unstaged,
           "ratio_iteration_unstaged_vs_staged": unstaged[-1] / staged[-1]}
    print(f"1x1x{args.size}² image ({image / 2**20:.1f} MiB), bytes of each graph (iteration 0 = the start):")
    print(f"  inputs staged in the store: {staged}")
    print(f"  inputs in the graphs:       {unstaged}  ({res['ratio_iteration_unstaged_vs_staged']:.0f}x per iteration)")
    write("graph_bytes", res)


if __name__ == "__main__":
    main()
