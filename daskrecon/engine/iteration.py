"""The pieces of one iteration's Dask graph: gradients of the data term, the fixed-index tree, the denoiser.

Everything here builds lazy Dask collections on the driver; nothing computes. An iteration
is then one submission (:mod:`daskrecon.engine.loop`). Task names say what the tasks are:
``operator-gradient`` (an operator's gradient on its worker, whole image), ``residual`` /
``value`` (chunk-wise), ``tree-sum``, ``assemble``, ``step``, ``denoise``, ``metrics``.

Per-operator terms are summed along :func:`daskrecon.planning.reduction.reduction_plan`, a tree fixed
by operator index. The sum is element-wise, so the tree over whole images and the same
tree chunk by chunk add the same numbers in the same order: results are bitwise the same
on any number of workers, in memory or streamed through Zarr.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
from dask.delayed import Delayed, delayed

from daskrecon.engine.problem import Problem
from daskrecon.engine.terms import chunkwise_values, whole_adjoint
from daskrecon.planning.sharding import balance_loads
from daskrecon.runtime.graphs import as_array, placed, token, tree_sum, tree_sum_values, whole
from daskrecon.tasks import arrays as array_tasks
from daskrecon.tasks import fidelity as fidelity_tasks
from daskrecon.tasks import iteration as iteration_tasks

__all__ = ["adjoint_sum", "batch_values", "denoise", "gradient", "metrics"]

def gradient(problem: Problem, x: da.Array, indices: Sequence[int] | None = None, *,
             measured: bool = True, kind: str = "gradient",
             row_weights: float | None = None, row_sums: dict[int, da.Array] | None = None) -> tuple[da.Array, Delayed]:
    """``(∇f(x), f(x))`` of ``f = Σ_i d_i(A_i x, y_i)`` (times ``problem.scale``), lazily.

    Chunk-wise operators: ``A_i`` and ``A_iᵀ`` by ``map_overlap``, the residual and the
    value chunk by chunk. Whole-image operators: ``x`` assembled once, then one task per
    operator on the worker holding it. The terms meet in one fixed-index tree.

    ``indices`` restricts the sum to those operators (a subset, in the given order: the
    tree is fixed by the position in it). ``measured=False`` takes every ``y_i = 0``: for
    an L2 fidelity the result is then the normal operator ``Σ_i A_iᵀA_i x / σ²``
    (:mod:`daskrecon.engine.linsolve`).

    ``row_weights=ε`` divides each chunk-wise operator's pixel-wise term by ``max(A_i 1, ε)``
    (its row sums, SIRT's ``W``; made chunk by chunk from ones, or taken from ``row_sums[i]`` when
    given — the same values computed once); whole-image operators take theirs from their fidelity
    (:class:`daskrecon.tasks.poisson.SIRTFidelity`).
    """
    ctx, physics = problem.ctx, problem.physics
    fan_in = ctx.fan_in
    indices = list(range(problem.num_operators)) if indices is None else list(indices)
    if not indices:
        raise ValueError("gradient over an empty set of operators")
    tag = token(kind)
    whole_ops = [i for i in indices if problem.forms[i] is None]
    owners = physics.placement.owners if whole_ops else None
    xw = whole(x, f"assemble-{tag}") if whole_ops else None
    fids = problem.fidelity.objects_for(physics) if whole_ops else None
    grads: list[Any] = []
    values: list[Delayed] = []
    for i in indices:
        form, y = problem.forms[i], problem.y[i]
        if form is not None:
            u = form.apply(x)
            # no-op for a planned problem (its chunks suit every operator); unmeasured, y = 0 is made in the tasks
            y = y.rechunk(u.chunks) if measured else None
            w = None if row_weights is None else (row_sums[i] if row_sums and i in row_sums else
                                                  form.apply(da.ones(x.shape, chunks=x.chunks, dtype=x.dtype)))
            r = da.map_blocks(fidelity_tasks.pointwise_grad_block, u, y, w, distance=problem.distances[i],
                              eps=0.0 if row_weights is None else row_weights, dtype=u.dtype,
                              meta=np.empty((0,) * u.ndim, u.dtype), name=f"residual-{i}-{tag}")
            v = chunkwise_values(u, y, problem.distances[i], f"value-{i}-{tag}")
            grads.append(form.adjoint(r, x.chunks).rechunk(x.chunks))  # no-op when x's chunks suit the operator
            parts = v.to_delayed(optimize_graph=False).ravel().tolist()
            values.append(delayed(iteration_tasks.sum_values, pure=True)(*parts, dask_key_name=f"value-sum-{i}-{tag}"))
        else:
            owner = owners[i]
            refs = [physics.objects.ref(i, owner), fids.ref(i, owner)]
            gv = placed(fidelity_tasks.fidelity_grad_value_op, owner, refs, xw, y if measured else None, i, {},
                        name=f"operator-gradient-{i}-{tag}")
            grads.append(gv)
            values.append(delayed(iteration_tasks.value_of, pure=True)(gv, dask_key_name=f"value-of-{i}-{tag}"))
    if all(isinstance(g, Delayed) for g in grads):  # all whole: one tree over whole images, then split
        total = tree_sum(grads, fan_in, f"tree-sum-{tag}")
        grad = as_array(total, iteration_tasks.gradient_of, (problem.shape,), problem.shape, problem.dtype, x.chunks,
                        f"gradient-{tag}")
    else:
        leaves = [as_array(g, iteration_tasks.gradient_of, (problem.shape,), problem.shape, problem.dtype, x.chunks,
                           f"gradient-{i}-{tag}") if isinstance(g, Delayed) else g for i, g in zip(indices, grads)]
        grad = tree_sum([leaf.astype(problem.dtype) for leaf in leaves], fan_in, f"tree-sum-{tag}")
    return grad, tree_sum_values(values, fan_in, f"value-tree-{tag}")


def batch_values(problem: Problem, x: da.Array) -> da.Array:
    """``Σ_i d_i(A_i x, y_i)`` per batch element, shape ``(B,)`` (float64), lazily, along the same tree."""
    physics, tag = problem.physics, token("fidelity-value")
    owners = physics.placement.owners if problem.global_ops else None
    xw = whole(x, f"assemble-{tag}") if problem.global_ops else None
    fids = problem.fidelity.objects_for(physics) if problem.global_ops else None
    b = problem.shape[0]
    leaves = []
    for i in range(problem.num_operators):
        form, y = problem.forms[i], problem.y[i]
        if form is not None:
            u = form.apply(x)
            y = y.rechunk(u.chunks)
            v = chunkwise_values(u, y, problem.distances[i], f"value-{i}-{tag}")
            leaves.append(v.sum(axis=tuple(range(1, v.ndim))).rechunk(b))
        else:
            owner = owners[i]
            refs = [physics.objects.ref(i, owner), fids.ref(i, owner)]
            v = placed(fidelity_tasks.fidelity_fn_op, owner, refs, xw, y, i, {}, name=f"operator-value-{i}-{tag}")
            leaves.append(da.from_delayed(v, (b,), dtype=np.float32).astype(np.float64))
    return tree_sum(leaves, problem.ctx.fan_in, f"tree-sum-{tag}")


def adjoint_sum(problem: Problem, *, scale: float = 1.0) -> da.Array:
    """``scale · Σ_i A_iᵀ y_i``, chunked like the iterate (the default start ``Aᵀy / N``)."""
    ctx, physics = problem.ctx, problem.physics
    tag = token("adjoint")
    leaves: list[Any] = []
    for i in range(problem.num_operators):
        form, y = problem.forms[i], problem.y[i]
        if form is not None:
            leaves.append(form.adjoint(y, problem.chunks))
        else:
            a = whole_adjoint(physics, i, y, tag)
            leaves.append(da.from_delayed(a, problem.shape, dtype=problem.dtype).rechunk(problem.chunks))
    total = tree_sum([leaf.astype(problem.dtype) for leaf in leaves], ctx.fan_in, f"tree-sum-{tag}")
    return da.map_blocks(array_tasks.scale_array, total, scale, dtype=problem.dtype, name=f"scale-{tag}")


def denoise(problem: Problem, z: da.Array, name: str) -> da.Array:
    """The tiled denoiser over ``z``'s chunks (``map_overlap``), chunk tasks spread over the workers.

    Left to itself the scheduler runs every chunk next to its input, which one worker may
    hold whole (the split of a whole-image gradient); a loose placement by chunk size
    (:func:`daskrecon.planning.sharding.balance_loads`) spreads them. It never changes a value.
    """
    if problem.denoiser is None:
        raise ValueError("this algorithm needs a denoiser (or a prior): pass one to reconstruct()")
    proc = problem.denoiser
    threads = problem.ctx.worker_threads()
    workers = list(threads)
    sizes = [math.prod(s) for s in itertools.product(*z.chunks[2:])]
    where = balance_loads(sizes, list(threads.values()))
    grid = z.numblocks[2:]

    def place_chunk(key: Any) -> list[str] | None:
        if not isinstance(key, tuple) or len(key) < 3:
            return None
        idx = key[-len(grid):]
        flat = int(np.ravel_multi_index(idx, grid)) if all(isinstance(i, int) for i in idx) and all(
            0 <= i < g for i, g in zip(idx, grid)) else None
        return None if flat is None else [workers[where[flat]]]

    out = proc.run_dask(z, problem.denoise_method, problem.denoise_args, problem.denoise_kwargs, name=name,
                         workers=place_chunk, stager=problem.stager, precision=problem.denoise_precision)
    return out if out.chunks == z.chunks else out.rechunk(z.chunks)


def metrics(problem: Problem, new: da.Array, old: da.Array, name: str) -> Delayed:
    """``[‖new − old‖², ‖old‖², Σ(clip(new) − truth)², pixels]`` in float64, one partial per chunk."""
    if problem.stager is not None:  # out of core: not held from the step to the metrics
        old = problem.stager.fresh(old, after=new)
    blocks_new, blocks_old = new.to_delayed(optimize_graph=False).ravel(), old.to_delayed(optimize_graph=False).ravel()
    truth = (problem.truth.to_delayed(optimize_graph=False).ravel() if problem.truth is not None
             else [None] * len(blocks_new))
    parts = [delayed(iteration_tasks.metric_partial, pure=True)(a, b, t, dask_key_name=f"{name}-{k}")
             for k, (a, b, t) in enumerate(zip(blocks_new, blocks_old, truth))]
    if len(parts) == 1:
        return parts[0]
    return delayed(iteration_tasks.sum_metrics, pure=True)(*parts, dask_key_name=f"{name}-sum")
