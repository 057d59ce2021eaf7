"""Draw one PnP iteration's Dask graph for the docs: docs/_static/iteration-graph.png.

    python scripts/iteration_graph.py        # needs graphviz (the `dot` program and the python package)

3 circular blurs (evaluated whole by FFT on their workers) and a tiled DnCNN on a 1x3x64x64
image cut into 2x2 chunks: the graph ``reconstruct`` submits once per iteration.
"""

import os

import dask
import torch
from deepinv.models import DnCNN
from deepinv.physics import Blur
from deepinv.physics.functional.blur import gaussian_blur

import daskrecon as dr
from daskrecon.engine.algorithms import PnP
from daskrecon.frontend.reconstruct import plan_problem

OUT = os.path.join(os.path.dirname(__file__), "..", "docs", "_static", "iteration-graph")

if __name__ == "__main__":
    torch.manual_seed(0)
    ops = [Blur(filter=gaussian_blur(sigma=(s, s)), padding="circular") for s in (1.0, 1.5, 2.0)]
    x = torch.rand(1, 3, 64, 64)
    y = [op.A(x) for op in ops]
    with dr.DistributedContext(n_workers=2, dashboard_address="127.0.0.1:0") as ctx:
        problem, x0 = plan_problem(dr.distribute(ops, ctx), y, dr.distribute(DnCNN(3, 3, depth=3, nf=8, pretrained=None),
                                                                           ctx, patch_size=32, overlap=4),
                                   data_fidelity=None, x0=x, x_true=None, sigma_denoiser=0.05, chunks=(32, 32))
        new, value, metrics = PnP(0.3).step(problem, {"x": x0.persist()})
        dask.visualize(new["x"], value, metrics, filename=OUT + ".png", optimize_graph=False, rankdir="LR",
                       collapse_outputs=True)
    print("wrote", OUT + ".png")
