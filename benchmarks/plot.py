"""Charts of the benchmark results for the docs: docs/_static/benchmarks.png (time against the
baselines) and docs/_static/ooc_volume.png (3-D out of core against in memory).

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

    v = json.loads((RESULTS / "ooc_volume.json").read_text())
    runs = [("in_memory", "in memory"), ("out_of_core", "out of core")]
    names = [f"{label}\n{v[k]['image'].split(' ')[0].split('x')[2]}³\n"
             f"{v[k]['times_total_worker_memory_limit']:.2f}× the limit" for k, label in runs]
    limit_mib = int(v["memory_limit_per_worker"].rstrip("GiB")) * 1024
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    a1.bar(names, [v[k]["mvox_per_second_first_iteration"] for k, _ in runs], color=["C0", "C1"])
    a1.set_ylabel("Mvox/s (first iteration)")
    a1.set_title(f"throughput: out of core / in memory = {v['ratio_out_of_core_vs_in_memory_throughput']:.2f}")
    a2.bar(names, [max(v[k]["worker_peak_rss_mib"]) for k, _ in runs], color=["C0", "C1"])
    a2.axhline(limit_mib, color="k", ls="--", lw=1, label=f"worker memory limit ({v['memory_limit_per_worker']})")
    a2.set_ylabel("worker peak RSS (MiB)")
    a2.set_title("peak worker memory")
    a2.legend(fontsize=8, loc="lower right")
    fig.suptitle("3-D PnP (7³ blur + 3-D DnCNN), one worker, 2 threads", fontsize=10)
    fig.tight_layout()
    out = Path(__file__).parents[1] / "docs" / "_static" / "ooc_volume.png"
    fig.savefig(out, dpi=100)
    print("wrote", out)
