"""``daskrecon reconstruct --check``: one operator task and one tile timed (or, for inputs too large to
read whole, one out-of-core iteration on a crop of whole chunks), and the run projected from them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import torch

from daskrecon.batch.build import build_operator
from daskrecon.config import keywords, options_from, read_key
from daskrecon.engine.problem import iterate_chunks
from daskrecon.operators.chunkwise import local_form
from daskrecon.runtime.arrays import as_numpy
from daskrecon.runtime.waiting import bounded

__all__ = ["CHECK_MAX_BYTES", "CheckReport", "check_streamed", "check_whole", "crop_shape", "eager"]


#: ``--check`` reads Zarr inputs whole up to this size; with a larger one it times the configured
#: iteration out of core on a crop of the signal instead (:func:`check_streamed`).
CHECK_MAX_BYTES = 2 * 2**30


@dataclass
class CheckReport:
    """What ``--check`` measured: per operator task and tile (inputs read whole), or per iteration on
    a crop (``crop``: its shape; inputs too large to read whole), and the projected run."""

    seconds_per_operator_task: float | None
    seconds_per_tile: float | None
    projected_seconds: float
    worker_rss_mib: list[float]
    seconds_per_iteration: float | None = None
    crop: tuple[int, ...] | None = None


def eager(v: Any) -> torch.Tensor:
    """A small lazy input read whole (``--check`` times the whole-signal gradient on it)."""
    if isinstance(v, torch.Tensor):
        return v
    return torch.from_numpy(np.asarray(v.compute(scheduler="threads")))


def crop_shape(shape: tuple[int, ...], chunk: tuple[int, ...], n_workers: int) -> tuple[int, ...]:
    """The spatial crop ``--check`` times an iteration on: whole chunks of the run's plan (``chunk``
    per spatial axis), one per axis, then more along the axis with the fewest until every worker
    has two (or the crop is the whole signal)."""
    spatial = shape[2:]
    count = [1] * len(spatial)

    def side(a: int) -> int:
        return min(spatial[a], count[a] * chunk[a])

    while math.prod(-(-side(a) // chunk[a]) for a in range(len(spatial))) < 2 * n_workers:
        growable = [a for a in range(len(spatial)) if side(a) < spatial[a]]
        if not growable:
            break
        count[min(growable, key=lambda a: (count[a], -a))] += 1
    return tuple(side(a) for a in range(len(spatial)))


def check_streamed(ctx: Any, cfg: dict, ys: list, x_true: Any, dden: Any, echo: Any) -> CheckReport:
    """``--check`` on inputs too large to read whole: two iterations of the configured algorithm, out of
    core (``storage="zarr"``, as the run streams), on a crop of the signal; the second is timed and
    scaled by the number of pixels. The inputs are sliced lazily (only the crop is read) and the
    operators are built for the crop (a mask file cropped)."""
    import daskrecon as dr

    base = cfg["_base"]
    specs = cfg["operators"]
    shape = tuple((x_true if x_true is not None else ys[0]).shape)
    factors = [read_key(s, "factor", f"operators[{i}]", int, 2) if s["type"] == "downsampling" else 1
               for i, s in enumerate(specs)]
    # The run's own chunks (they depend on the operators' forms, not on the size of their masks).
    probe_shape = (*shape[:2], *(min(n, 4 * math.lcm(*factors)) for n in shape[2:]))
    probe = [build_operator(s, i, probe_shape, base, tuple(slice(0, n) for n in probe_shape[2:]))
             for i, s in enumerate(specs)]
    forms = [f for f in map(local_form, probe) if f is not None]
    chunks = iterate_chunks(dden, shape, np.dtype(np.float32), forms)
    chunk = tuple(c[0] for c in chunks[2:])
    crop = crop_shape(shape, chunk, ctx.num_workers)
    region = tuple(slice(0, c) for c in crop)
    ops = [build_operator(s, i, (*shape[:2], *crop), base, region) for i, s in enumerate(specs)]
    y_crop = [_lazy(y)[(slice(None), slice(None), *(slice(0, c // f) for c in crop))] for y, f in zip(ys, factors)]
    truth = _lazy(x_true)[(slice(None), slice(None), *region)] if x_true is not None else None
    stamps: list[float] = []
    scratch = options_from(cfg).scratch
    # A new folder under the run's scratch location (a path or a URL), checked to be shared like the run's;
    # removed after.
    from daskrecon.engine.checkpoint import Checkpoint

    store = Checkpoint.temporary(ctx, scratch, prefix="daskrecon-check-",
                                 why="--check runs two out-of-core iterations there")
    try:
        crop_run = options_from(cfg).replace(n_iter=2, storage="zarr", chunks=chunk, checkpoint=store.url,
                                             resume=False, checkpoint_every=1, progress=False)
        dr.reconstruct(dr.distribute(ops, ctx), y_crop, dden, x_true=truth,
                       callback=lambda k, x: stamps.append(time.perf_counter()), **keywords(crop_run))
    finally:
        store.remove()
    per_it_crop = stamps[1] - stamps[0]  # the second iteration: the first includes the start
    per_it = per_it_crop * math.prod(shape[2:]) / math.prod(crop)
    iterations = options_from(cfg).n_iter
    client = ctx.client
    rss = sorted(v / 2**20 for v in bounded(client, client._run, _worker_rss, what="reading the workers' memory",
                                            timeout=ctx.stall_timeout).values())
    report = CheckReport(None, None, per_it * iterations, rss, seconds_per_iteration=per_it, crop=crop)
    echo(f"inputs too large to read whole (> {CHECK_MAX_BYTES / 2**30:.0f} GiB): one out-of-core iteration on a "
         f"{'×'.join(map(str, crop))} crop of {'×'.join(map(str, shape[2:]))}: {per_it_crop:.3f} s; "
         f"worker RSS {', '.join(f'{r:.0f}' for r in rss)} MiB")
    echo(f"projected: {per_it:.2f} s per iteration, {report.projected_seconds:.0f} s for {iterations} iterations "
         "(the crop's throughput per pixel, which holds while every worker has tiles to run)")
    return report


def _lazy(v: Any) -> da.Array:
    return v if isinstance(v, da.Array) else da.from_array(as_numpy(v))


def check_whole(ctx: Any, dphys: Any, dden: Any, y: Any, shape: tuple, iterations: int, echo: Any) -> CheckReport:
    """One operator task and one tile, timed on the cluster, and the projected total."""
    from deepinv.optim import L2

    import daskrecon as dr

    x = torch.zeros(shape)
    f = dr.distribute(L2(), ctx)
    f.grad(x, y, dphys)  # places y, builds operators
    t0 = time.perf_counter()
    f.grad(x, y, dphys)
    t_grad = time.perf_counter() - t0
    t_tile, n_tiles = 0.0, 0
    if dden is not None:  # EM and SIRT without a prior have no tiles
        strategy = dden.strategy_for(shape)
        one = strategy.tiles[0].window() if hasattr(strategy, "tiles") else None
        tile = x[(slice(None), slice(None), *one)] if one else x
        dden(tile.contiguous())
        t0 = time.perf_counter()
        dden(tile.contiguous())
        t_tile = time.perf_counter() - t0
        n_tiles = strategy.get_num_patches()
    client = ctx.client
    rss = sorted(v / 2**20 for v in bounded(client, client._run, _worker_rss, what="reading the workers' memory",
                                            timeout=ctx.stall_timeout).values())
    per_it = t_grad + t_tile * n_tiles / max(1, ctx.num_workers)
    report = CheckReport(t_grad / dphys.num_operators * ctx.num_workers, t_tile, per_it * iterations, rss)
    echo(f"one gradient ({dphys.num_operators} operator tasks): {t_grad:.3f} s; one tile: {t_tile:.3f} s "
         f"({n_tiles} tiles); worker RSS {', '.join(f'{r:.0f}' for r in rss)} MiB")
    echo(f"projected: {per_it:.2f} s per iteration, {report.projected_seconds:.0f} s for {iterations} iterations")
    return report


def _worker_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss
