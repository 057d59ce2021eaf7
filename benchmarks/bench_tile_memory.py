"""Peak memory of one forward pass of the bundled 3-D DnCNN on a tile, per tile depth, each in a fresh process.

The out-of-core CT benchmark (``bench_ct_ooc.py --denoiser 3d``) tiles the volume by slabs; this
measures what one tile's activations add to a process's peak resident memory (Linux ``VmHWM``
against the resident size before the call), for tiles of ``--depths`` slices plus a halo of 4 on
each side, ``--width`` + 8 pixels across. Writes benchmarks/results/tile_memory.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

_CHILD = """
import torch
from daskrecon.models import bundled_denoiser_3d
torch.set_num_threads(1)
model = bundled_denoiser_3d().eval()
x = torch.rand(1, 1, {d}, {w}, {w})
def mib(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
before = mib('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')
with torch.no_grad():
    model(x)
print(before, mib('VmHWM:'))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[64, 32])
    p.add_argument("--width", type=int, default=128)
    args = p.parse_args()
    from _common import machine, write

    rows = []
    for depth in args.depths:
        d, w = depth + 8, args.width + 8
        out = subprocess.run([sys.executable, "-c", _CHILD.format(d=d, w=w)], capture_output=True, text=True,
                             check=True).stdout.split()
        before, peak = float(out[0]), float(out[1])
        rows.append({"tile": [d, w, w], "rss_before_mib": before, "peak_mib": peak, "added_mib": peak - before})
        print(f"tile {d} x {w}^2: +{peak - before:.0f} MiB over {before:.0f} MiB")
    print("wrote", write("tile_memory", {"model": "bundled 3-D DnCNN", "rows": rows, "machine": machine()}))


if __name__ == "__main__":
    main()
