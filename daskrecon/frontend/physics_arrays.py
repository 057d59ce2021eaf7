"""A distributed physics on dask arrays, lazily: chunk by chunk where an operator has a chunk-wise form.

Operators with a chunk-wise form (:mod:`daskrecon.operators.chunkwise`) run through
``map_overlap`` on the array's chunks; the others get the array assembled once and run whole
on the worker that holds them (never through the driver), their output shapes asked once of
the workers. Per-operator results meet in the fixed-index tree (``reduce_op``).
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da

from daskrecon.errors import MeasurementError
from daskrecon.planning.reduction import REDUCTIONS
from daskrecon.runtime import graphs
from daskrecon.runtime.arrays import as_dask
from daskrecon.runtime.memory import check_fits
from daskrecon.runtime.storage import seen_inputs
from daskrecon.runtime.waiting import compute
from daskrecon.tasks import arrays as array_tasks
from daskrecon.tasks import operators as operator_tasks

__all__ = ["apply_lazily"]


def apply_lazily(physics: Any, method: str, arg: Any, reduce_op: str | None) -> Any:
    """``A`` / ``A_adjoint`` / ``A_adjoint_A`` of ``physics`` on dask arrays, lazily (see the module).

    ``arg``: ``x`` (a dask array), or for ``A_adjoint`` one measurement per operator;
    ``reduce_op``: ``None`` (per-operator arrays), ``"sum"`` or ``"mean"`` (along the fixed tree).
    """
    if reduce_op not in (None, *REDUCTIONS):
        raise ValueError(f"reduce_op must be None, 'sum' or 'mean', got {reduce_op!r}")
    n = physics.num_operators
    if method == "A_adjoint" and len(arg) != n:
        raise MeasurementError(f"y has {len(arg)} entries but the physics has {n} operators")
    forms = physics.chunkwise_forms()
    # a Zarr input the workers cannot open would be read as zeros: checked now, and by a worker that joins later
    if method == "A_adjoint":
        ins = list(seen_inputs(physics.ctx, {f"y[{i}]": as_dask(v, f"y[{i}]") for i, v in enumerate(arg)}).values())
    else:
        ins = [seen_inputs(physics.ctx, {"x": arg})["x"]] * n
    whole_ops = [i for i, f in enumerate(forms) if f is None]
    if whole_ops:
        largest = max(ins[i].nbytes for i in whole_ops)
        check_fits(physics.ctx.client, 6 * largest, f"operators {whole_ops} (no chunk-wise form) on a whole "
                   f"array of {largest / 2**20:.1f} MiB", "give them a chunk-wise form "
                   "(daskrecon.operators.chunkwise.local_form.register), or give the workers more memory")
    tag = graphs.token(method.lower().replace("_", "-"))
    fn = {"A": operator_tasks.forward_op, "A_adjoint": operator_tasks.adjoint_op,
          "A_adjoint_A": operator_tasks.adjoint_A_op}[method]
    extra = {"A": ({}, None, False), "A_adjoint": ({},), "A_adjoint_A": ({},)}[method]
    owners = physics.owners if whole_ops else None
    placed, out = [], []
    for i, (form, v) in enumerate(zip(forms, ins)):
        if form is not None:
            out.append(form.apply(v) if method == "A" else
                       form.adjoint(v) if method == "A_adjoint" else form.adjoint(form.apply(v), v.chunks))
            continue
        d = graphs.placed(fn, owners[i], [physics.objects.ref(i, owners[i])], graphs.whole(v, f"assemble-{i}-{tag}"),
                         *extra, name=f"operator-{tag}-{i}")
        placed.append((i, d))
        out.append(None)
    if placed:  # shapes of whole-image results: asked once of the workers
        metas = compute([dask.delayed(array_tasks.shape_dtype, pure=True)(d) for _, d in placed], client=physics.ctx.client,
                        what=f"{method} of a dask array", stall_timeout=physics.ctx.stall_timeout,
                        optimize_graph=False)
        for (i, d), (shape, dtype) in zip(placed, metas):
            out[i] = da.from_delayed(d, shape, dtype=dtype)
    if reduce_op is None:
        return out
    ref = next((o for o in out if o.numblocks != (1,) * o.ndim), out[0])
    total = graphs.tree_sum([o.rechunk(ref.chunks) for o in out], physics.ctx.fan_in, f"tree-sum-{tag}")
    return total / n if reduce_op == "mean" else total

