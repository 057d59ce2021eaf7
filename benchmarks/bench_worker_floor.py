"""What an idle worker's memory is made of, and what releasing the GPU libraries' pages saves.

Every daskrecon worker imports torch, torchvision (through deepinv), deepinv and daskrecon before
its first task; on a memory-limited worker that resident floor is what the work has to fit on top of.
This benchmark measures, each in a fresh interpreter:

* the resident size after each import step (``import torch``, ``+ torchvision``, ``+ deepinv``,
  ``+ daskrecon``), split into file-backed pages (shared libraries) and anonymous memory, with the
  ten largest mappings — the CUDA build of torch maps cuBLAS, nvJitLink, NVRTC and Triton on a CPU
  machine too;
* the same after :func:`daskrecon.runtime.memory_trim.release_library_pages`;

and then, on a real ``DistributedContext`` (one worker process, two threads), the idle worker's RSS
and the tiled bundled DnCNN on 1×3×512² (patch 128, overlap 16; median of ``--repeats`` calls after
a warm-up) with ``daskrecon.context.release-gpu-libraries`` on and off, in alternating order, ``--rounds``
contexts each — the release must cost no speed.

    python benchmarks/bench_worker_floor.py [--repeats 7] [--rounds 3]

Writes benchmarks/results/worker_floor.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, write

_STEPS = {"torch": "import torch", "torchvision": "import torch, torchvision", "deepinv": "import deepinv",
          "daskrecon": "import daskrecon"}

_MEMORY_TRIM = str(Path(__file__).parents[1] / "daskrecon" / "runtime" / "memory_trim.py")

_PROBE = r"""
import json, re, sys
exec(sys.argv[1])
def resident():
    sizes, kinds, path = {}, {"file": 0, "anonymous": 0}, None
    for line in open("/proc/self/smaps"):
        f = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+$", f[0]):
            path = f[5] if len(f) > 5 else "[anonymous]"
        elif f[0] == "Rss:":
            kb = int(f[1])
            kinds["file" if path.startswith("/") else "anonymous"] += kb
            name = path.rsplit("/", 1)[-1] if path.startswith("/") else "[anonymous]"
            sizes[name] = sizes.get(name, 0) + kb
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:10]
    return {"rss_mib": round(sum(kinds.values()) / 1024, 1), **{k + "_mib": round(v / 1024, 1) for k, v in kinds.items()},
            "largest_mib": {k: round(v / 1024, 1) for k, v in top}}
out = {"imported": resident()}
import importlib.util  # the module alone: importing daskrecon's package would add its imports
spec = importlib.util.spec_from_file_location("memory_trim", sys.argv[2])
memory_trim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_trim)
out["released_mib"] = round(memory_trim.release_library_pages() / 2**20, 1)
out["after_release"] = resident()
print(json.dumps(out))
"""


def _imports() -> dict:
    res = {}
    for name, code in _STEPS.items():
        res[name] = json.loads(subprocess.run([sys.executable, "-c", _PROBE, code, _MEMORY_TRIM], check=True,
                                              capture_output=True, text=True).stdout.splitlines()[-1])
        r = res[name]
        print(f"{code:28s} {r['imported']['rss_mib']:7.1f} MiB resident ({r['imported']['file_mib']:.0f} file, "
              f"{r['imported']['anonymous_mib']:.0f} anonymous); released {r['released_mib']:.0f} MiB -> "
              f"{r['after_release']['rss_mib']:.1f} MiB", flush=True)
    return res


def _rss(dask_worker=None) -> float:
    return dask_worker.monitor.get_process_memory() / 2**20


def _cluster(release: bool, repeats: int) -> dict:
    import dask
    import torch

    import daskrecon as dr
    from daskrecon.models import bundled_denoiser

    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with dask.config.set({"daskrecon.context.release-gpu-libraries": release}), dr.DistributedContext(
            n_workers=1, threads_per_worker=2, processes=True, device_mode="cpu",
            dashboard_address="127.0.0.1:0") as ctx:
        # the worker imports deepinv with the release's plugin; without it, at its first task
        ctx.client.run(lambda: __import__("deepinv") and None)
        idle = next(iter(ctx.client.run(_rss).values()))
        den = dr.distribute(bundled_denoiser(), ctx, patch_size=128, overlap=16)
        den(x, sigma=0.05)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            den(x, sigma=0.05)
            times.append(time.perf_counter() - t0)
        after = next(iter(ctx.client.run(_rss).values()))
    return {"idle_worker_rss_mib": round(idle, 1), "worker_rss_after_calls_mib": round(after, 1),
            "median_s": statistics.median(times), "times_s": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    res: dict = {"machine": machine(), "imports": _imports(), "cluster": {"release": [], "keep": []}}
    for i in range(args.rounds):
        for release in ((True, False) if i % 2 == 0 else (False, True)):  # neither always goes first
            r = _cluster(release, args.repeats)
            res["cluster"]["release" if release else "keep"].append(r)
            print(f"release={release!s:5s} idle worker {r['idle_worker_rss_mib']:.0f} MiB, after the calls "
                  f"{r['worker_rss_after_calls_mib']:.0f} MiB; tiled DnCNN 1x3x512² {r['median_s']:.3f} s", flush=True)
    for key in ("idle_worker_rss_mib", "worker_rss_after_calls_mib", "median_s"):
        on = statistics.median(r[key] for r in res["cluster"]["release"])
        off = statistics.median(r[key] for r in res["cluster"]["keep"])
        res[f"{key}_release_vs_keep"] = {"release": on, "keep": off, "ratio": on / off}
        print(f"{key}: release {on:.3f}, keep {off:.3f}, ratio {on / off:.3f}")
    print("wrote", write("worker_floor", res))


if __name__ == "__main__":
    main()
