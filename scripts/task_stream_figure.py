"""The task stream of three PnP iterations, for the docs: docs/_static/task-stream.png.

    python scripts/task_stream_figure.py

What the dashboard's task stream shows during a run, drawn from ``distributed.get_task_stream``:
3 circular blurs + DnCNN on 1x3x512x512, 2 workers; one lane per worker, one colour per kind of
task, a line where each iteration ends.
"""

import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from distributed import get_task_stream  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from _pnp_problem import problem  # noqa: E402

import daskrecon as dr  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "docs", "_static", "task-stream.png")
KINDS = {"operator-gradient": "tab:red", "tree-sum": "tab:orange", "gradient": "tab:olive", "step": "tab:green",
         "denoise": "tab:blue", "metrics": "tab:purple", "assemble": "tab:brown"}


def kind(key) -> str:
    name = str(key[0] if isinstance(key, tuple) else key)
    return next((k for k in KINDS if name.startswith(k)), "other")


if __name__ == "__main__":
    ops, y, model, x_true = problem(512)
    with dr.DistributedContext(n_workers=2, dashboard_address="127.0.0.1:0") as ctx:
        dphys, dden = dr.distribute(ops, ctx), dr.distribute(model, ctx, patch_size=256, overlap=20)
        run = lambda cb=None: dr.reconstruct(dphys, y, dden, n_iter=3, step_size=0.3,  # noqa: E731
                                             x0=torch.zeros_like(x_true), progress=False, callback=cb)
        run()  # warm: the model and the operators are on their workers
        ends = []
        with get_task_stream(ctx.client) as ts:
            t0 = time.time()
            run(lambda k, x: ends.append(time.time() - t0))
    workers = sorted({t["worker"] for t in ts.data})
    fig, ax = plt.subplots(figsize=(11, 2.8))
    for t in ts.data:
        for ss in t["startstops"]:
            # tasks finished before t0 belong to the warm-up run; they still sit in the log
            if ss["action"] != "compute" or ss["start"] < t0:
                continue
            lane = workers.index(t["worker"])
            c = KINDS.get(kind(t["key"]), "lightgray")
            ax.broken_barh([(ss["start"] - t0, ss["stop"] - ss["start"])], (lane - 0.4, 0.8), color=c)
    for e in ends:
        ax.axvline(e, color="black", lw=0.8, ls="--")
    ax.set_yticks(range(len(workers)), [f"worker {i}" for i in range(len(workers))])
    ax.set_xlabel("seconds (dashed: an iteration ends)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KINDS.values()]
    ax.legend(handles, list(KINDS), ncol=len(KINDS), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.25))
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print("wrote", OUT)
