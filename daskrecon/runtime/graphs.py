"""Building blocks of task graphs: task names, tasks placed on an operator's worker, the fixed-index trees.

Every tree here sums along :func:`daskrecon.planning.reduction.reduction_plan`, fixed by
operator index, never by which task finished first: results are bitwise the same on any
number of workers. :func:`tree_reduce` sums futures (eager calls), :func:`tree_sum` dask
arrays or delayed arrays, :func:`tree_sum_values` scalars in float64 (lazy graphs).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed, delayed
from dask.highlevelgraph import HighLevelGraph
from distributed import Client, Future

from daskrecon.planning.reduction import reduction_plan
from daskrecon.runtime.scheduler_plugin import PLACED
from daskrecon.tasks import arrays as array_tasks
from daskrecon.tasks import iteration as iteration_tasks
from daskrecon.tasks import registry

__all__ = ["as_array", "placed", "token", "tree_reduce", "tree_sum", "tree_sum_values", "whole"]

_counter = itertools.count()


def token(kind: str) -> str:
    """A unique task-name prefix: ``kind`` for the dashboard, a counter so keys never collide."""
    return f"{kind}-{next(_counter):06d}"


def whole(x: da.Array, name: str) -> Delayed:
    """``x`` as one array, in one task (``assemble``); placed by the scheduler next to most of its chunks.

    A one-chunk ``x`` is its chunk: no task.
    """
    blocks = x.to_delayed(optimize_graph=False)
    if blocks.size == 1:
        return blocks.ravel()[0]
    return delayed(iteration_tasks.assemble_blocks, pure=True)(blocks.tolist(), dask_key_name=name)


def as_array(d: Delayed, fn: Any, args: tuple, shape: tuple[int, ...], dtype: Any, chunks: tuple, name: str) -> da.Array:
    """``fn(d, *args)`` as a dask array of ``chunks``: one task per chunk, cutting its block from ``d``."""
    starts = [np.cumsum((0,) + c[:-1]) for c in chunks]
    layer = {}
    for idx in itertools.product(*(range(len(c)) for c in chunks)):
        region = tuple(slice(int(starts[a][i]), int(starts[a][i]) + chunks[a][i]) for a, i in enumerate(idx))
        layer[(name, *idx)] = (iteration_tasks.block_of, d.key, fn, args, region)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[d])
    return da.Array(graph, name, chunks, dtype=dtype, meta=np.empty((0,) * len(shape), dtype))


def placed(fn: Any, owner: str, refs: list, *args: Any, name: str) -> Delayed:
    """``fn(*objects, *args)`` on ``owner`` only, the objects from its registry (:mod:`daskrecon.runtime.placement`)."""
    with dask.annotate(workers=[owner], allow_other_workers=False, daskrecon=PLACED):
        return delayed(registry.on_objects, pure=True)(fn, owner, refs, *args, dask_key_name=name)


def tree_sum(leaves: Sequence[Any], fan_in: int, name: str) -> Any:
    """Leaves (dask arrays of equal chunks, or Delayed arrays) summed along :func:`reduction_plan`."""
    level = list(leaves)
    for depth, groups in enumerate(reduction_plan(len(level), fan_in)):
        nxt = []
        for j, group in enumerate(groups):
            if len(group) == 1:
                nxt.append(level[group[0]])
                continue
            parts = [level[k] for k in group]
            key = f"{name}-{depth}-{j}"
            if isinstance(parts[0], da.Array):
                nxt.append(da.map_blocks(array_tasks.sum_arrays, *parts, dtype=parts[0].dtype,
                                         meta=np.empty((0,) * parts[0].ndim, parts[0].dtype), name=key))
            else:
                nxt.append(delayed(array_tasks.sum_arrays, pure=True)(*parts, dask_key_name=key))
        level = nxt
    return level[0]


def tree_sum_values(values: Sequence[Delayed], fan_in: int, name: str) -> Delayed:
    """Scalars summed in float64 along :func:`reduction_plan` (the same tree as the gradients)."""
    level = list(values)
    for depth, groups in enumerate(reduction_plan(len(level), fan_in)):
        level = [level[g[0]] if len(g) == 1 else
                 delayed(iteration_tasks.sum_values, pure=True)(*[level[k] for k in g],
                                                                dask_key_name=f"{name}-{depth}-{j}")
                 for j, g in enumerate(groups)]
    return level[0]


def tree_reduce(
    client: Client,
    leaves: Sequence[Future],
    fan_in: int = 4,
    *,
    add=None,
) -> Future:
    """Sum futures on the workers along :func:`reduction_plan`.

    Each partial sum runs where the scheduler finds most of its inputs; the order of
    the additions inside a group is fixed by index.

    Parameters
    ----------
    client : distributed.Client
    leaves : sequence of Future
        Futures of equally shaped numpy arrays, in operator order.
    fan_in : int
        Largest number of inputs per sum task.
    add : callable, optional
        Task function summing its positional arguments in order; defaults to
        :func:`daskrecon.tasks.arrays.sum_arrays`.

    Returns
    -------
    Future
        The total.
    """
    add = add or array_tasks.sum_arrays
    level = list(leaves)
    for groups in reduction_plan(len(level), fan_in):
        level = [
            client.submit(add, *[level[j] for j in group], pure=False) if len(group) > 1 else level[group[0]]
            for group in groups
        ]
    return level[0]
