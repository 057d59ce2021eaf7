"""Bar chart of the benchmark ratios for the docs: docs/_static/benchmarks.png.

    python benchmarks/plot.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    g = json.loads((RESULTS / "gradient.json").read_text())
    t = json.loads((RESULTS / "tiling.json").read_text())
    p = json.loads((RESULTS / "pnp.json").read_text())
    tr = json.loads((RESULTS / "training.json").read_text())
    labels = ["L2 gradient\n16 blurs, 1024²", "DRUNet\n512²", "DnCNN\n1024²", "PnP 5 iterations\n3 blurs + DnCNN, 512²",
              "training step\nunrolled PGD, 256²"]
    rows = [g, t["drunet"], t["dncnn"], p, tr]
    keys = [("deepinv_distributed_1proc", "deepinv.distributed (1 proc)"),
            ("deepinv_distributed_torchrun2", "deepinv.distributed (torchrun ×2)"),
            ("daskrecon", "daskrecon (2 workers)")]
    fig, ax = plt.subplots(figsize=(10.5, 3.6))
    width = 0.27
    for j, (k, name) in enumerate(keys):
        ax.bar([i + (j - 1) * width for i in range(len(rows))], [r[k]["median_s"] for r in rows], width, label=name)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("seconds (median)")
    ax.legend(fontsize=8)
    ax.set_title("Same workload, same 2-core machine")
    fig.tight_layout()
    out = Path(__file__).parents[1] / "docs" / "_static" / "benchmarks.png"
    fig.savefig(out, dpi=100)
    print("wrote", out)
