"""A reconstruction problem, planned once: shapes, chunks, how each operator runs, where data lives.

:func:`plan` turns what :func:`daskrecon.reconstruct` receives (distributed physics,
measurements as tensors, dask arrays or futures on the workers, a distributed denoiser, a data
fidelity; validated as objects by :func:`daskrecon.frontend.reconstruct.plan_problem`) into a
:class:`Problem`: the iterate's shape, dtype and chunks
(:mod:`daskrecon.planning.chunking`, from the problem alone), for each operator whether it runs
chunk by chunk (its chunk-wise form, :mod:`daskrecon.operators.chunkwise`) or whole on the worker that
holds it, the measurements placed accordingly, and where the iterate lives: persisted in
cluster memory when the problem fits the cluster, double-buffered in Zarr when it does not.
Everything image-sized stays on the cluster; the driver keeps shapes and scalars.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import torch
from dask.base import tokenize
from distributed import Future

from daskrecon.engine.terms import (
    Term,
    check_whole_fits,
    choose_forms,
    output_chunks,
    place_mask,
    place_measurement,
    terms_of,
    whole_adjoint,
)
from daskrecon.errors import ShapeError
from daskrecon.planning.chunking import plan_chunks, whole_axes, working_chunks, zarr_aligned
from daskrecon.planning.fingerprint import fingerprint
from daskrecon.planning.schedules import Schedule, describe, value_at
from daskrecon.runtime import graphs
from daskrecon.runtime.arrays import as_numpy, convert_hint, persist_fresh
from daskrecon.runtime.cluster import scheduler_workers
from daskrecon.runtime.halos import Stager, read_array
from daskrecon.runtime.storage import seen_inputs
from daskrecon.runtime.waiting import compute, gather
from daskrecon.tasks import arrays as array_tasks

if TYPE_CHECKING:  # annotations only: the front is a layer above
    from daskrecon.frontend.context import DistributedContext
    from daskrecon.frontend.physics import DistributedPhysics

__all__ = ["STORAGES", "Denoising", "Problem", "iterate_chunks", "plan", "plan_terms", "remove_stored_inputs",
           "store_inputs", "with_precision", "with_stager"]

STORAGES = ("auto", "memory", "zarr")
#: The iterate stays in cluster memory when this many copies of it, plus the measurements,
#: fit in this fraction of the workers' total memory limit.
_WORKING_COPIES, _MEMORY_FRACTION = 6, 0.5


@dataclass
class Problem:
    """What one iteration's graph needs, planned once per reconstruction (see the module docstring).

    Attributes
    ----------
    shape, dtype, chunks
        Of the iterate ``x``.
    forms : list
        Per operator: its chunk-wise :class:`~daskrecon.operators.chunkwise.LocalOperator` (masks placed on
        the cluster), or ``None`` when it runs whole on its worker.
    distances : list
        Per chunk-wise operator, the pixel-wise distance of its fidelity.
    y : list
        Per operator: a dask array chunked like ``A_i x`` (chunk-wise operators) or the future
        of the whole ``y_i`` on the operator's worker.
    storage : {"memory", "zarr"}
        Where the iterate lives.
    denoise_precision : {"fp32", "bf16", "fp16"}
        What the denoiser's tiles run in (:func:`with_precision`); ``precision_row`` the
        probe's columns for the history.
    stager : Stager, optional
        Out of core, the scratch arrays its stencils exchange halos through
        (:func:`with_stager`): held by the chunk-wise forms and handed to the denoiser.
    """

    ctx: DistributedContext
    physics: DistributedPhysics
    fidelity: Any  # a DistributedDataFidelity
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[tuple[int, ...], ...]
    forms: list
    distances: list
    y: list
    scale: float
    storage: str = "memory"
    denoiser: Any = None  # a DistributedProcessing
    denoise_method: str = "__call__"
    denoise_args: tuple = ()
    denoise_kwargs: dict = field(default_factory=dict)
    denoise_precision: str = "fp32"
    precision_row: dict = field(default_factory=dict)
    truth: da.Array | None = None
    record: dict = field(default_factory=dict)
    stager: Stager | None = None
    sigma_schedule: Schedule = ()
    sigma_keyword: str | None = None

    @property
    def num_operators(self) -> int:
        return self.physics.num_operators

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def global_ops(self) -> list[int]:
        return [i for i, f in enumerate(self.forms) if f is None]

    @property
    def terms(self) -> list[Term]:
        """Each operator's term (:mod:`daskrecon.engine.terms`), from the forms, distances and measurements."""
        return terms_of(self.forms, self.distances, self.y)

    def invariant_axes(self, indices: Sequence[int] | None = None) -> tuple[int, ...]:
        """Axes of ``x`` along which every operator in ``indices`` (all for ``None``) is the same.

        Along such an axis ``A_i 1`` and ``A_iᵀ1`` do not vary: a
        :class:`~daskrecon.operators.slicewise.SlicewiseOperator` applies one 2-D operator to every
        slice of the depth. Only chunk-wise forms declare them (``invariant_axes``); an operator
        that runs whole declares none.
        """
        indices = range(self.num_operators) if indices is None else indices
        axes: set[int] | None = None
        for i in indices:
            form = self.forms[i]
            here = set(getattr(form, "invariant_axes", ())) if form is not None else set()
            axes = here if axes is None else axes & here
        return tuple(sorted(axes or ()))

    def at(self, k: int) -> Problem:
        """The problem as iteration ``k`` (from 0) sees it: the denoiser's σ of a schedule's ``k``-th
        value (:mod:`daskrecon.planning.schedules`); ``self`` when σ is the same at every iteration."""
        if len(self.sigma_schedule) <= 1 or self.denoiser is None:
            return self
        sigma = value_at(self.sigma_schedule, k)
        if self.sigma_keyword is not None:
            return dataclasses.replace(self, denoise_kwargs={**self.denoise_kwargs, self.sigma_keyword: sigma})
        return dataclasses.replace(self, denoise_args=(sigma, *self.denoise_args[1:]))

    def reduced(self, axes: Sequence[int]) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """``(shape, chunks)`` of an array like ``x`` but of length 1 along ``axes`` (broadcast along them)."""
        shape = tuple(1 if a in axes else n for a, n in enumerate(self.shape))
        chunks = tuple((1,) if a in axes else c for a, c in enumerate(self.chunks))
        return shape, chunks


@dataclass(frozen=True)
class Denoising:
    """The denoiser as the engine calls it: ``processing.run(x, method, args, kwargs)``, tile by tile.

    Built by :func:`daskrecon.frontend.reconstruct.plan_problem` from a distributed denoiser
    (its own method, ``sigma`` as its argument) or a distributed prior (``prox`` with
    ``sigma_denoiser=sigma``). ``sigma`` is a schedule (:mod:`daskrecon.planning.schedules`):
    ``args``/``kwargs`` hold its first value, as the first argument or as ``keyword``.
    """

    processing: Any
    method: str
    args: tuple
    kwargs: dict
    sigma: Schedule
    keyword: str | None = None


def plan(physics: Any, ys: list, denoising: Denoising, fidelity: Any, *, x0: Any, x_true: Any,
         storage: str = "auto", chunks: Any = None) -> tuple[Problem, da.Array | None]:
    """Plan a reconstruction: validate → shapes → forms → chunks → storage → place.

    Returns the problem and ``x0`` as a chunked dask array (``None``: the engine starts from
    ``Aᵀy / N``). ``ys``: one measurement per operator (tensors, dask arrays, or futures of
    arrays on the operators' workers). Every input is checked before anything is written:
    lengths, shapes, dtypes, and one pass for NaN/Inf over the measurements and ``x0`` (on
    the workers for dask arrays).
    """
    ctx, n = physics.ctx, physics.num_operators
    named = _validate(denoising.processing, ys, x0, storage)
    # before any pass: a Zarr input the workers cannot open would be read as zeros (a worker that joins later: at its
    # first read)
    seen = seen_inputs(ctx, {**dict(named), **({"x_true": x_true} if x_true is not None else {})})
    named = [(name, seen[name]) for name, _ in named]
    ys = [seen.get(f"y[{i}]", v) for i, v in enumerate(ys)]
    x0, x_true = seen.get("x0", x0), seen.get("x_true", x_true)
    local = physics.chunkwise_forms()
    y_shapes = [_shape_of(ctx, v) for v in ys]
    if x0 is None and all(f is None for f in local):
        # No operator says what shape x has: Aᵀy / N, on the workers, tells.
        _check_finite(ctx, named)
        named = []
        x0 = _whole_start(ctx, physics, [place_measurement(ctx, physics, i, v, None, (), (), np.dtype("f4"), True)
                                         for i, v in enumerate(ys)])
    shape, dtype = _shape_and_dtype(x0, local, y_shapes, ys)
    if x_true is not None:  # before any pass over the data
        if not isinstance(x_true, (torch.Tensor, da.Array)):
            raise TypeError(f"x_true must be a torch.Tensor or a dask array, got "
                            f"{type(x_true).__name__}{convert_hint(x_true)}")
        if tuple(x_true.shape) != shape:
            raise ShapeError(f"x_true has shape {tuple(x_true.shape)}, and the signal {shape}")
    if denoising.processing is not None:
        denoising.processing.check_layout(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    forms, distances = _forms(physics, local, fidelity, shape, y_shapes, nbytes)
    chunks = _chunks(denoising.processing, shape, dtype, forms, chunks, x0)
    storage = _storage(ctx, storage, nbytes, sum(math.prod(s) * dtype.itemsize for s in y_shapes))
    if forms.count(None):  # some operators run whole: the image must fit one worker
        check_whole_fits(ctx, physics, forms, shape, nbytes)
    _check_finite(ctx, named)  # one pass over the inputs, once every cheap check has passed

    persist = storage == "memory"
    placed_forms = [place_mask(ctx, f, shape, chunks, dtype, persist) if f is not None else None for f in forms]
    placed_y = [place_measurement(ctx, physics, i, v, f, shape, chunks, dtype, persist) for i, (v, f) in
                enumerate(zip(ys, placed_forms))]
    truth = None
    if x_true is not None:
        truth = _as_chunked(x_true, chunks, dtype, "x_true")
        if persist:
            truth = persist_fresh(ctx.client, truth, "x_true")
    proc = denoising.processing
    problem = Problem(
        ctx=ctx, physics=physics, fidelity=fidelity, shape=shape, dtype=dtype, chunks=chunks,
        forms=placed_forms, distances=distances, y=placed_y, scale=1.0 / n if fidelity.reduction == "mean" else 1.0,
        storage=storage, denoiser=proc, denoise_method=denoising.method, denoise_args=denoising.args,
        denoise_kwargs=denoising.kwargs, truth=truth, sigma_schedule=denoising.sigma, sigma_keyword=denoising.keyword,
    )
    problem.record = {
        "operators": physics.fingerprint(),
        "measurements": _digest(ys),
        "x0": _digest([x0]) if x0 is not None else "A^T y / N",
        "shape": list(shape),
        "chunks": [list(c) for c in chunks[2:]],
        "forms": ["chunk-wise" if f is not None else "whole" for f in forms],
        "denoiser": proc.fingerprint() if proc is not None else "none",
        "tiling": repr((proc.patch_size, proc.overlap, proc.max_batch_size, proc.blend)) if proc is not None else "none",
        "sigma_denoiser": describe(denoising.sigma),
    }
    return problem, (_as_chunked(x0, chunks, dtype, "x0") if x0 is not None else None)


def _validate(proc: Any, ys: list, x0: Any, storage: str) -> list[tuple[str, Any]]:
    """The cheap checks, before any pass over the data; the inputs to check for NaN/Inf, by name."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    named = [(f"y[{i}]", v) for i, v in enumerate(ys) if not isinstance(v, Future)]
    if x0 is not None:
        if not isinstance(x0, (torch.Tensor, da.Array)):
            raise TypeError(f"x0 must be a torch.Tensor or a dask array, got {type(x0).__name__}{convert_hint(x0)}")
        named.append(("x0", x0))
    for name, v in named:
        if proc is not None:
            proc.check_dtype(v.dtype, name)  # before any pass over the data
        if isinstance(v, torch.Tensor) and v.is_complex():
            raise TypeError(f"{name} is complex: the denoiser takes real images")
    return named


def _shape_and_dtype(x0: Any, local: list, y_shapes: list, ys: list) -> tuple[tuple[int, ...], np.dtype]:
    shape = tuple(x0.shape) if x0 is not None else _x_shape(local, y_shapes)
    dtype = np.dtype(torch.empty((), dtype=x0.dtype).numpy().dtype if isinstance(x0, torch.Tensor) else
                     (x0.dtype if x0 is not None else _y_dtype(ys)))
    if len(shape) not in (4, 5):
        raise ShapeError(f"the signal must be an image (B, C, H, W) or a volume (B, C, D, H, W), got shape {shape}")
    return shape, dtype


def _forms(physics: Any, local: list, fidelity: Any, shape: tuple, y_shapes: list, nbytes: int) -> tuple[list, list]:
    """Each operator's form (chunk-wise, or whole on its worker), checked against its measurement's shape."""
    forms, distances = choose_forms(physics, local, [fidelity.source(i) for i in range(physics.num_operators)],
                                    nbytes)
    for i, form in enumerate(forms):
        if form is not None and form.output_shape(shape) != tuple(y_shapes[i]):
            raise ShapeError(f"y[{i}] has shape {tuple(y_shapes[i])} but operator {i} maps x {shape} to "
                             f"{form.output_shape(shape)}")
    return forms, distances


def _chunks(proc: Any, shape: tuple, dtype: np.dtype, forms: list, chunks: Any, x0: Any) -> tuple:
    """The iterate's chunks: the caller's, a dask ``x0``'s, else planned from the problem (never from the cluster)."""
    chunkwise_forms = [f for f in forms if f is not None]
    if chunks is not None:
        if not (isinstance(chunks, (tuple, list)) and len(chunks) == len(shape) - 2
                and all(isinstance(c, int) and c > 0 for c in chunks)):
            what = "(height, width)" if len(shape) == 4 else "(depth, height, width)"
            raise ValueError(f"chunks must be {what} of the iterate's chunks, got {chunks!r}")
        out = working_chunks(shape, ((shape[0],), (shape[1],), *((c,) for c in chunks)), chunkwise_forms)
        if proc is not None:
            _check_tiles_fit(proc, shape, out, chunks)
        return out
    if isinstance(x0, da.Array):
        return working_chunks(shape, x0.chunks, chunkwise_forms)
    return iterate_chunks(proc, shape, dtype, chunkwise_forms)


def _check_tiles_fit(proc: Any, shape: tuple, chunks: tuple, asked: Any) -> None:
    """The denoiser's halo and alignment against the chunks the caller asked for, named in its terms.

    (Otherwise the tiled pass refuses them later, in words for a dask array: "rechunk".)
    """
    dims, _, overlap = proc.geometry(shape)
    for d, o in zip(dims, overlap):
        c = chunks[d]
        if len(c) > 1 and c[-1] < o <= min(c[:-1]):
            c = (*c[:-2], c[-2] + c[-1])  # the tiled pass folds a short remainder into its neighbour
        if len(c) > 1 and (min(c) < o or any(n % proc.align for n in c[:-1])):
            step = proc.align
            least = -(-o // step) * step
            raise ShapeError(f"chunks={tuple(asked)} makes chunks of {min(c)}-{max(c)} px along axis {d} (at least what "
                             f"the operators' halos need), and the denoiser's tiles need at least its overlap, {o} px"
                             + (f", in multiples of {step} (its down-sampling)" if step > 1 else "")
                             + f": pass chunks of at least {least} px" + (f", multiples of {step}" if step > 1 else ""))


def _storage(ctx: Any, storage: str, nbytes: int, y_bytes: int) -> str:
    """Cluster memory when the working set fits comfortably, else Zarr slots (``"auto"``)."""
    if storage != "auto":
        return storage
    total = sum(w.get("memory_limit") or 0 for w in scheduler_workers(ctx.client, ctx.stall_timeout).values())
    return "memory" if not total or _WORKING_COPIES * nbytes + y_bytes <= _MEMORY_FRACTION * total else "zarr"


def plan_terms(physics: Any, fidelity: Any, ys: list, x: da.Array) -> Problem:
    """The data term alone on a dask array ``x`` (for :meth:`DistributedDataFidelity.grad` / ``fn``):
    chunk-wise where possible (in ``x``'s chunks), whole on the operators' workers otherwise. Lazy."""
    ctx, n = physics.ctx, physics.num_operators
    dtype = np.dtype(x.dtype)
    shape = tuple(x.shape)
    forms, distances = choose_forms(physics, physics.chunkwise_forms(), [fidelity.source(i) for i in range(n)],
                                    x.nbytes, prefer_fft=False)
    if forms.count(None):
        check_whole_fits(ctx, physics, forms, shape, x.nbytes)
    for i, form in enumerate(forms):
        if form is not None and form.output_shape(shape) != tuple(ys[i].shape):
            raise ShapeError(f"y[{i}] has shape {tuple(ys[i].shape)} but operator {i} maps x to shape "
                             f"{form.output_shape(shape)}; check the image shape and that y is in operator order")
    chunks = x.chunks
    placed_y = [place_measurement(ctx, physics, i, v, f, shape, chunks, dtype, False)
                for i, (v, f) in enumerate(zip(ys, forms))]
    return Problem(ctx=ctx, physics=physics, fidelity=fidelity, shape=shape, dtype=dtype, chunks=chunks, forms=forms,
                   distances=distances, y=placed_y, scale=1.0 / n if fidelity.reduction == "mean" else 1.0)


#: Without a denoiser (EM algorithms without a prior), the chunk planner's unit along each axis.
NO_DENOISER_PATCH = 256


def iterate_chunks(denoiser: Any, shape: tuple[int, ...], dtype: np.dtype,
                   forms: list) -> tuple[tuple[int, ...], ...]:
    """The iterate's chunks for a problem of ``shape``, planned from the problem alone.

    Multiples of the denoiser's tile (:func:`daskrecon.planning.chunking.plan_chunks`), aligned to the
    chunk-wise operators' ``forms`` (their down-sampling factors, their smallest exact chunk).
    """
    spatial = range(2, len(shape))
    if denoiser is None:  # no tiles to align to
        return plan_chunks(shape, np.dtype(dtype).itemsize, [min(shape[a], NO_DENOISER_PATCH) for a in spatial],
                           overlap=[0] * len(spatial), factor=math.lcm(*(f.factor for f in forms)) if forms else 1,
                           min_size=max((f.min_chunk(2) for f in forms), default=1), whole=whole_axes(forms))
    dims, patch, overlap = denoiser.geometry(shape)
    patch_nd = [patch[dims.index(a)] if a in dims else shape[a] for a in spatial]
    over_nd = [overlap[dims.index(a)] if a in dims else 0 for a in spatial]
    return plan_chunks(shape, np.dtype(dtype).itemsize, patch_nd, overlap=over_nd, align=denoiser.align,
                       factor=math.lcm(*(f.factor for f in forms)) if forms else 1,
                       min_size=max((f.min_chunk(2) for f in forms), default=1), whole=whole_axes(forms))


def store_inputs(problem: Problem, store: Any) -> Problem:
    """The problem with its in-graph inputs written once to ``store`` and read from there.

    Out of core nothing is persisted: an input that the driver holds (a measurement given as a
    tensor or a numpy-backed dask array, an ``Inpainting`` mask, ``x_true``) would be cut into
    chunks that travel inside every iteration's graph — image-sized data through the scheduler
    at each iteration (13.6 MB of graph per iteration for a 1024² image with a mask, two tensor
    measurements and x_true; 20 kB once staged: ``benchmarks/bench_graph_bytes.py``). Each such array is written, with the chunks its
    consumers use, to an uncompressed array ``input_<what>`` of the checkpoint ``store`` (from the
    driver, once per run), and the graphs read its chunks from there. Arrays already read from
    storage (no data in their graph) are kept as they are. The values are the same bits.

    Parameters
    ----------
    problem : Problem
        A problem whose iterate streams through Zarr (``storage="zarr"``).
    store : Checkpoint
        The run's checkpoint; the input arrays live next to its state (see
        :func:`remove_stored_inputs`).

    Returns
    -------
    Problem
    """
    def staged(a: da.Array | None, what: str, chunks: tuple | None = None) -> da.Array | None:
        if not isinstance(a, da.Array) or not _holds_data(a):
            return a
        chunks = a.chunks if chunks is None else chunks
        a = a.rechunk(chunks)
        a, zchunks = zarr_aligned(a)
        z = store.scratch(f"input_{what}", a.shape, a.dtype, zchunks)
        dask.compute(da.store(a, z, lock=False, compute=False), scheduler="sync")  # the driver holds it already
        # strict (a lost chunk raises); a source of the store, so stencils read its halos in place
        return read_array(z, (), chunks, name=f"input-{what}-{uuid.uuid4().hex}", sources=store.sources)

    forms = []
    for i, form in enumerate(problem.forms):
        if form is not None and isinstance(form.mask, da.Array):
            m = form.mask
            out = output_chunks(form, problem.chunks)
            form = dataclasses.replace(form, mask=staged(m, f"mask_{i}", (m.shape[0], m.shape[1], *out[2:])))
        forms.append(form)
    ys = [staged(y, f"y_{i}") if form is not None else y for i, (y, form) in enumerate(zip(problem.y, forms))]
    return dataclasses.replace(problem, forms=forms, y=ys, truth=staged(problem.truth, "truth"))


def remove_stored_inputs(problem: Problem, store: Any) -> None:
    """Delete the arrays :func:`store_inputs` wrote to ``store`` (only arrays daskrecon made are ever deleted)."""
    for i in range(problem.num_operators):
        store.remove_array(f"input_mask_{i}")
        store.remove_array(f"input_y_{i}")
    store.remove_array("input_truth")


# ---------------------------------------------------------------------- helpers
def _holds_data(a: da.Array) -> bool:
    """Whether ``a``'s graph carries array data itself (chunks of an in-memory array)."""
    return any(isinstance(v, np.ndarray) and v.ndim > 0 for v in dict(a.__dask_graph__()).values())


def _check_finite(ctx: Any, named: list) -> None:
    """One pass over the inputs before anything is written: no NaN/Inf may enter a run."""
    lazy = [(name, v) for name, v in named if isinstance(v, da.Array)]
    counts = {name: int((~torch.isfinite(v)).sum()) for name, v in named if isinstance(v, torch.Tensor)}
    if lazy:
        values = compute([(~da.isfinite(v)).sum() for _, v in lazy], client=ctx.client, what="input check",
                         stall_timeout=ctx.stall_timeout)
        counts.update({name: int(c) for (name, _), c in zip(lazy, values)})
    for name, _ in named:
        if counts.get(name):
            raise ValueError(f"{name} has {counts[name]} non-finite values (NaN or Inf); clean or mask them before "
                             "reconstructing")


def _shape_of(ctx: Any, v: Any) -> tuple[int, ...]:
    if isinstance(v, Future):
        return tuple(gather(ctx.client, [ctx.client.submit(np.shape, v, pure=False)], what="measurement shape",
                            stall_timeout=ctx.stall_timeout)[0])
    return tuple(v.shape)


def _y_dtype(ys: list) -> np.dtype:
    for v in ys:
        if isinstance(v, torch.Tensor):
            return torch.empty((), dtype=v.dtype).numpy().dtype
        if isinstance(v, da.Array):
            return np.dtype(v.dtype)
    return np.dtype(np.float32)


def _x_shape(local: list, y_shapes: list) -> tuple[int, ...]:
    for form, s in zip(local, y_shapes):
        if form is not None:
            return form.input_shape(tuple(s))
    raise AssertionError("no chunk-wise form: the shape comes from _whole_start")


def _whole_start(ctx: Any, physics: Any, ys: list) -> da.Array:
    """``Aᵀy / N`` computed whole on the workers (it stays there), as a one-chunk dask array."""
    tag = graphs.token("start")
    leaves = [whole_adjoint(physics, i, y, tag) for i, y in enumerate(ys)]
    total = graphs.tree_sum(leaves, ctx.fan_in, f"tree-sum-{tag}")
    with dask.config.set({"optimization.fuse.active": False}):
        fut = ctx.client.compute(total, optimize_graph=False)
    shape, dtype = gather(ctx.client, [ctx.client.submit(array_tasks.shape_dtype, fut, pure=False)], what="the start Aᵀy/N",
                          labels=physics.placement.labels(leaves), stall_timeout=ctx.stall_timeout)[0]
    start = dask.delayed(array_tasks.scale_array, pure=True)(fut, 1.0 / physics.num_operators)
    return da.from_delayed(start, shape, dtype=dtype)



def _as_chunked(v: Any, chunks: tuple, dtype: np.dtype, name: str) -> da.Array:
    if not isinstance(v, (torch.Tensor, da.Array)):
        raise TypeError(f"{name} must be a torch.Tensor or a dask array, got {type(v).__name__}{convert_hint(v)}")
    shape = tuple(sum(c) for c in chunks)
    if tuple(v.shape) != shape:
        raise ShapeError(f"{name} has shape {tuple(v.shape)}, and the signal {shape}")
    if isinstance(v, torch.Tensor):
        v = da.from_array(as_numpy(v, name), chunks=chunks)
    return v.astype(dtype).rechunk(chunks)



def _digest(values: list) -> str:
    """A fingerprint of inputs: tensors by content, dask arrays by their graph's name."""
    return fingerprint([v.name if isinstance(v, da.Array) else (v.key if isinstance(v, Future) else v)
                        for v in values]) if values else tokenize()


def with_stager(problem: Problem, stager: Stager | None) -> Problem:
    """``problem`` whose graphs exchange their stencils' halos through ``stager``'s Zarr arrays.

    The chunk-wise forms hold it (their ``A``/``Aᵀ`` on dask arrays), the denoiser call and the
    loops that rebuild their graph every pass (:mod:`daskrecon.engine.linsolve`) read it from
    the problem. ``None``: halos by dask's ``map_overlap``, as planned.
    """
    forms = [dataclasses.replace(f, stager=stager) if f is not None else None for f in problem.forms]
    return dataclasses.replace(problem, forms=forms, stager=stager)


def with_precision(problem: Problem, report: dict) -> Problem:
    """``problem`` whose denoiser tiles run in ``report["precision"]`` (a probe's report,
    :meth:`~daskrecon.frontend.processing.DistributedProcessing.resolve_precision`).

    A reduced precision is part of the record (a checkpoint made in one precision resumes only
    in it) and its measured error goes into every history row; fp32 changes nothing.
    """
    precision = report["precision"]
    if precision == "fp32":
        return dataclasses.replace(problem, denoise_precision="fp32", precision_row={})
    r = report["probe"][precision]
    row = {"precision": precision, "precision_max_error": r["max_error"], "precision_rel_error": r["rel_error"]}
    return dataclasses.replace(problem, denoise_precision=precision, precision_row=row,
                               record={**problem.record, "precision": precision})
