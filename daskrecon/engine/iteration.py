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
from daskrecon.engine.terms import GraphInputs
from daskrecon.planning.sharding import balance_loads
from daskrecon.runtime.graphs import as_array, token, tree_sum, tree_sum_values
from daskrecon.tasks import arrays as array_tasks
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
    fan_in = problem.ctx.fan_in
    indices = list(range(problem.num_operators)) if indices is None else list(indices)
    if not indices:
        raise ValueError("gradient over an empty set of operators")
    tag = token(kind)
    inputs, terms = GraphInputs(problem, x, tag), problem.terms
    grads: list[Any] = []
    values: list[Delayed] = []
    for i in indices:
        g, v = terms[i].gradient(inputs, measured=measured, eps=row_weights,
                                 row_sums=row_sums.get(i) if row_weights is not None and row_sums else None)
        grads.append(g)
        values.append(v)
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
    inputs = GraphInputs(problem, x, token("fidelity-value"))
    leaves = [term.values(inputs) for term in problem.terms]
    return tree_sum(leaves, problem.ctx.fan_in, f"tree-sum-{inputs.tag}")


def adjoint_sum(problem: Problem, *, scale: float = 1.0) -> da.Array:
    """``scale · Σ_i A_iᵀ y_i``, chunked like the iterate (the default start ``Aᵀy / N``)."""
    ctx, tag = problem.ctx, token("adjoint")
    inputs = GraphInputs(problem, None, tag)  # the adjoint's input is y: x is neither read nor assembled
    leaves = [term.adjoint(inputs) for term in problem.terms]
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
    """``[‖new_b − old_b‖² for each batch element b, ‖new_b‖² for each b, Σ(clip(new) − truth)², pixels]`` in
    float64, one partial per chunk (:func:`daskrecon.tasks.iteration.metric_partial`), summed in chunk order."""
    if problem.stager is not None:  # out of core: not held from the step to the metrics
        old = problem.stager.fresh(old, after=new)
    blocks_new, blocks_old = new.to_delayed(optimize_graph=False).ravel(), old.to_delayed(optimize_graph=False).ravel()
    truth = (problem.truth.to_delayed(optimize_graph=False).ravel() if problem.truth is not None
             else [None] * len(blocks_new))
    starts = np.cumsum((0,) + new.chunks[0])  # the first batch element of each block along axis 0
    firsts = [int(starts[np.unravel_index(k, new.numblocks)[0]]) for k in range(len(blocks_new))]
    parts = [delayed(iteration_tasks.metric_partial, pure=True)(a, b, t, batch=new.shape[0], first=f,
                                                               dask_key_name=f"{name}-{k}")
             for k, (a, b, t, f) in enumerate(zip(blocks_new, blocks_old, truth, firsts))]
    if len(parts) == 1:
        return parts[0]
    return delayed(iteration_tasks.sum_metrics, pure=True)(*parts, dask_key_name=f"{name}-sum")
