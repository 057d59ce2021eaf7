"""The three ways a distributed denoiser runs: a tensor forward, a tensor backward, a dask array.

Each takes the :class:`~daskrecon.frontend.processing.DistributedProcessing` it runs for (its
context, its :class:`~daskrecon.frontend.tile_plan.TilePlan`, its shipped model) and submits
tasks of :mod:`daskrecon.tasks.denoising`:

- :func:`forward_tensor`: the image placed once, one task per tile batch on the worker the plan
  gives it, only the tiles' cores come back to be assembled;
- :func:`backward_tensor`: each tile batch backpropagated on its worker from its cores'
  cotangent; window gradients come back, parameter gradients are summed along the fixed tree;
- :func:`map_dask`: the tiled network over a dask array's chunks (``map_overlap``, or halos
  through Zarr out of core), lazily.
"""

from __future__ import annotations

import math
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from distributed import Future

from daskrecon.errors import ShapeError
from daskrecon.planning.strategies import DistributedSignalStrategy
from daskrecon.runtime import halos
from daskrecon.runtime.arrays import as_numpy, gather_arrays, place
from daskrecon.runtime.graphs import tree_reduce
from daskrecon.tasks import denoising as denoising_tasks

__all__ = ["backward_tensor", "forward_tensor", "map_dask"]


def forward_tensor(proc: Any, x: torch.Tensor, method: str, args: tuple, kwargs: dict, *,
                   placed: Future | None = None, labels: dict | None = None, keep: dict | None = None,
                   precision: str = "fp32") -> torch.Tensor:
    """``proc.processor.<method>(x, *args, **kwargs)`` tile by tile on the workers; a tensor on ``ctx.device``.

    ``placed``: ``x`` already on the cluster; ``labels`` name tasks ``x`` depends on (for
    messages about stuck work); ``keep``: the workers keep each batch's activations for a
    backward (see :class:`~daskrecon.frontend.tile_plan.ActivationBudget`).
    """
    if x.dim() < 3:
        raise ShapeError(f"x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    ctx, plan = proc.ctx, proc.plan
    strategy = plan.strategy_for(x.shape)
    batches = plan.batches(strategy)
    plan.check_tensor_call(x, strategy, batches, method, args, kwargs)
    client = ctx.client
    x_fut = placed if placed is not None else place(client, as_numpy(x))
    state = proc.shipment.state()
    futs = [
        client.submit(denoising_tasks.process_patches, proc.key, ctx.device_mode, method, strategy, x_fut,
                      idx, plan.max_batch_size, args, kwargs, state, keep, precision, pure=False, workers=[w],
                      allow_other_workers=True)
        for idx, w in zip(batches, plan.placement(strategy, batches))
    ]
    out = torch.zeros(x.shape, dtype=x.dtype, device="cpu")
    names = dict(labels or {})
    names.update({f.key: f"tile batch {k} (tiles {b[0]}..{b[-1]})" for k, (f, b) in enumerate(zip(futs, batches))})
    results = gather_arrays(client, futs, "tile batch", labels=names, stall_timeout=ctx.stall_timeout)
    pairs = [(i, torch.from_numpy(a)) for group in results for i, a in group]
    strategy.reduce_patches(out, pairs)
    return out.to(ctx.device)


def backward_tensor(proc: Any, x: torch.Tensor, g: torch.Tensor, method: str, args: tuple, kwargs: dict,
                    params: list[str], paths: list, need_x: bool, kept: str | None = None,
                    x_placed: Future | None = None, precision: str = "fp32") -> tuple[torch.Tensor | None, list]:
    """Gradients of ``<g, denoise(x)>``: w.r.t. ``x``, the parameters named ``params`` and the arguments at ``paths``.

    Each tile batch is backpropagated from the cotangent of its tiles' cores, from the
    activations its forward kept on the worker (``kept``, the forward's call id) or, where
    they are not there (``checkpoint_batches``, a worker lost since), recomputed with grad
    enabled one network call at a time — the same gradients either way. Window gradients
    come back and are added in tile order; parameter and argument gradients (one flat vector
    per batch) are summed on the workers along the fixed tree. Batches follow the tile
    geometry only: bitwise the same on any number of workers.
    """
    ctx, plan = proc.ctx, proc.plan
    strategy = plan.strategy_for(x.shape)
    if not hasattr(strategy, "patch_cotangents"):
        raise NotImplementedError(f"backward through the {type(strategy).__name__} strategy is not supported: "
                                  "it needs patch_cotangents(grad_out, indices); use overlap tiling")
    client = ctx.client
    batches = plan.batches(strategy)
    x_fut = x_placed if x_placed is not None else place(client, as_numpy(x))
    g_fut = place(client, as_numpy(g, "grad"))
    state = proc.shipment.state()
    futs = [
        client.submit(denoising_tasks.backward_patches, proc.key, ctx.device_mode, method, strategy, x_fut,
                      g_fut, idx, plan.max_batch_size, args, kwargs, state, params, paths, need_x, kept, precision,
                      pure=False, workers=[w], allow_other_workers=True)
        for idx, w in zip(batches, plan.placement(strategy, batches))
    ]
    labels = {f.key: f"backward of tile batch {k} (tiles {b[0]}..{b[-1]})"
              for k, (f, b) in enumerate(zip(futs, batches))}
    leaves = [client.submit(denoising_tasks.leaf_gradients, f, pure=False) for f in futs]
    total = tree_reduce(client, leaves, ctx.fan_in)
    windows = [client.submit(denoising_tasks.window_gradients, f, pure=False) for f in futs]
    results = gather_arrays(client, windows + [total], "tile batch backward", labels=labels,
                            stall_timeout=ctx.stall_timeout)
    flat = torch.from_numpy(results[-1])
    gx = None
    if need_x:
        gx = torch.zeros(x.shape, dtype=x.dtype)
        pairs = sorted((i, a) for group in results[:-1] for i, a in group)
        for i, a in pairs:
            gx[strategy.window_index(i)] += torch.from_numpy(a)
        gx = gx.to(ctx.device)
    module = proc.shipment.module
    shapes = [p.shape for n, p in module.named_parameters() if n in params] if params else []
    shapes += [_arg_at(args, kwargs, path).shape for path in paths]
    used = flat[len(flat) - len(shapes):] if shapes else flat[:0]
    out, start = [], 0
    for shape, u in zip(shapes, used):
        size = math.prod(shape)
        out.append(flat[start:start + size].reshape(shape).to(ctx.device) if u > 0 else None)
        start += size
    return gx, out


def map_dask(proc: Any, x: da.Array, method: str, args: tuple, kwargs: dict, *, name: str | None = None,
             workers: Any = None, portable: bool = False, stager: Any = None, precision: str = "fp32") -> da.Array:
    """``map_overlap`` of the tiled network over ``x``'s chunks, lazily.

    ``workers``, a function of a chunk's block index, places each chunk's task (loosely);
    ``name`` names the tasks on the dashboard. ``portable`` puts the pickled model in the
    graph (arrays handed to users); the engine's graphs run where the plugin is. ``stager``
    (a :class:`~daskrecon.runtime.halos.Stager`, out of core) reads the halos from Zarr;
    ``precision`` is the tiles' (:mod:`daskrecon.tasks.precision`).
    """
    plan = proc.plan
    if isinstance(plan.strategy, DistributedSignalStrategy) or plan.strategy == "basic":
        raise TypeError("dask arrays are processed with overlap tiling inside each chunk; "
                        "custom and 'basic' strategies apply to torch tensors")
    if x.ndim < 3:
        raise ShapeError(f"x must be (B, C, *spatial), got shape {x.shape}")
    if x.numblocks[1] != 1:
        x = x.rechunk({1: -1})  # the network needs every channel of a pixel
    tiling_dims, patch, overlap = plan.geometry(x.shape)
    depth = {d: 0 for d in range(x.ndim)}
    for d, o in zip(tiling_dims, overlap):
        depth[d] = o
        chunks = x.chunks[d]
        if len(chunks) > 1 and chunks[-1] < o <= min(chunks[:-1]):
            # a short remainder chunk: fold it into its neighbour rather than fail
            chunks = chunks[:-2] + (chunks[-2] + chunks[-1],)
            x = x.rechunk({d: chunks})
        if len(chunks) > 1 and min(chunks) < o:
            raise ShapeError(f"chunks along axis {d} ({min(chunks)} px) are smaller than overlap={o}: "
                             f"rechunk to at least {o} (ideally >= 2048) along that axis")
        if len(chunks) > 1 and any(c % plan.align for c in chunks[:-1]):
            raise ShapeError(f"chunks along axis {d} must be multiples of align={plan.align} "
                             f"for this network, got {chunks[:3]}...; rechunk to multiples of {plan.align}")
    for d in range(x.ndim):
        if d not in tiling_dims and d > 1 and x.numblocks[d] > 1:
            x = x.rechunk({d: -1})
    tiling = dict(tiling_dims=tiling_dims, patch_size=patch, overlap=overlap, align=plan.align, blend=plan.blend)
    plan.check_chunk(x, depth, tiling_dims, patch, overlap, method, args, kwargs)
    meta = np.empty((0,) * x.ndim, dtype=x.dtype)
    extra = {"name": name} if name else {}
    if precision != "fp32":  # fp32 graphs keep their keys (and their results) as before
        extra["precision"] = precision
    if portable:
        extra["payload"] = proc.shipment.payload
    state = proc.shipment.state()
    if state is not None:
        extra["state"] = state
    where = {"workers": workers, "allow_other_workers": True} if workers else {}
    common = dict(dtype=x.dtype, meta=meta, model_key=proc.key, device_mode=proc.ctx.device_mode, method=method,
                  tiling=tiling, max_batch_size=plan.max_batch_size, args=args, kwargs=kwargs, **extra)
    if all(x.numblocks[d] == 1 for d in tiling_dims):  # one chunk: no halo to exchange
        with dask.annotate(**where):
            return x.map_blocks(denoising_tasks.process_block, **common)
    return halos.map_overlap(denoising_tasks.process_block, x, depth=depth, boundary="none", annotations=where,
                             stager=stager, **common)


def _arg_at(args: tuple, kwargs: dict, path: tuple) -> Any:
    return args[path[1]] if path[0] == "arg" else kwargs[path[1]]
