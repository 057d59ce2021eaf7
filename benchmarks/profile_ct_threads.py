"""Where a slab-by-slab SIRT iteration spends its time: task-stream compute time by task kind, one worker of two
threads against two workers of one (512 slices of 128², 16 angles). python benchmarks/profile_ct_threads.py"""
import warnings; warnings.filterwarnings("ignore")
import time, torch, numpy as np, deepinv as dinv, daskrecon as dr
from collections import defaultdict
from distributed import get_task_stream
op = dr.slicewise(dinv.physics.Tomography(angles=16, img_width=128, circle=False, normalize=True))
x = torch.rand(1, 1, 512, 128, 128)
y = [op.A(x)]
if __name__ == "__main__":
    for nw, th in ((1, 2), (2, 1)):
        with dr.DistributedContext(n_workers=nw, threads_per_worker=th, dashboard_address=":0") as ctx:
            d = dr.distribute([op], ctx)
            st = []
            with get_task_stream(ctx.client) as ts:
                dr.reconstruct(d, y, None, algorithm="sirt", n_iter=3, progress=False, chunks=(64, 128, 128), callback=lambda k, x: st.append(time.perf_counter()))
            off = time.time() - time.perf_counter()
            w0, w1 = st[0] + off, st[-1] + off
            tot = defaultdict(float)
            for t in ts.data:
                for ss in t["startstops"]:
                    if ss["action"] == "compute" and w0 <= ss["start"] <= w1:
                        tot[t["key"][0].split("-")[0] if isinstance(t["key"], tuple) else str(t["key"]).split("-")[0]] += ss["stop"] - ss["start"]
            print(nw, th, "s/it", [round(b - a, 2) for a, b in zip(st[:-1], st[1:])], "busy", round(sum(tot.values()), 2), sorted(((k, round(v, 2)) for k, v in tot.items()), key=lambda kv: -kv[1])[:6])
