"""The data term of a problem, planned: how each operator runs and where its measurement lives.

An operator with a chunk-wise form (:mod:`daskrecon.operators.chunkwise`) and a pixel-wise fidelity runs
chunk by chunk, its measurement chunked like its output; any other runs whole on the worker
that holds it, its measurement placed there. The plan goes into a
:class:`~daskrecon.engine.problem.Problem`, which carries it (and, for a reconstruction, the
denoiser and the iterate's chunks) to the graph builders (:mod:`daskrecon.engine.iteration`).

That decision is made once, here: each operator becomes a term — :class:`ChunkwiseTerm` or
:class:`WholeTerm` — whose ``gradient``, ``values`` and ``adjoint`` build its part of a graph; the
builders sum what the terms give along the fixed-index tree and never ask which kind a term is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import torch
from dask.delayed import Delayed, delayed
from deepinv.optim import distance as _distance
from deepinv.optim.data_fidelity import DataFidelity
from distributed import Future

from daskrecon.errors import DaskreconError
from daskrecon.operators.chunkwise import LocalOperator, unaligned_size
from daskrecon.runtime.arrays import as_numpy, persist_fresh, place
from daskrecon.runtime.graphs import placed, whole
from daskrecon.runtime.memory import MemoryLimitError, check_fits
from daskrecon.tasks import fidelity as fidelity_tasks
from daskrecon.tasks import iteration as iteration_tasks
from daskrecon.tasks import operators as operator_tasks
from daskrecon.tasks.substitutes import FFTConvolution, specialize

if TYPE_CHECKING:  # annotations only: the front is a layer above
    from daskrecon.engine.problem import Problem
    from daskrecon.frontend.context import DistributedContext
    from daskrecon.frontend.physics import DistributedPhysics

__all__ = ["GLOBAL_FORM_MAX_BYTES", "ChunkwiseTerm", "GraphInputs", "WholeTerm", "check_whole_fits", "choose_forms",
           "chunkwise_values", "output_chunks", "place_mask", "place_measurement", "terms_of", "whole_adjoint"]

#: A circular blur is evaluated whole, by FFT, on its worker (faster than its chunk-wise
#: spatial form) when the image is at most this large; above, it streams chunk by chunk.
GLOBAL_FORM_MAX_BYTES = 1 * 2**30

# Distances that act pixel by pixel: d(u, y) = Σ_pixels φ(u_p, y_p), so chunk-wise values add up.
SEPARABLE_DISTANCES = tuple(
    getattr(_distance, n)
    for n in ("L2Distance", "L1Distance", "PoissonLikelihoodDistance", "LogPoissonLikelihoodDistance")
    if hasattr(_distance, n)
)


def choose_forms(physics: DistributedPhysics, local: list, fids: list, nbytes: int,
                 prefer_fft: bool = True) -> tuple[list, list]:
    """How each operator runs: chunk by chunk (its form) or whole on its worker (``None``).

    Chunk by chunk when it has a chunk-wise form and a pixel-wise chain-rule fidelity, except
    circular blurs on images up to :data:`GLOBAL_FORM_MAX_BYTES` with ``fast_operators``: their
    FFT evaluation on one worker beats the spatial convolution. Depends on the problem only.
    """
    forms, distances = [], []
    for i, (form, fid) in enumerate(zip(local, fids)):
        chunkwise = (form is not None and isinstance(fid, DataFidelity) and fidelity_tasks.uses_chain_rule(fid)
                     and isinstance(fid.d, SEPARABLE_DISTANCES))
        if (chunkwise and prefer_fft and physics.fast_operators and nbytes <= GLOBAL_FORM_MAX_BYTES
                and _has_fft_form(physics, i)):
            chunkwise = False
        forms.append(form if chunkwise else None)
        distances.append(fid.d if chunkwise else None)
    return forms, distances


def _has_fft_form(physics: DistributedPhysics, i: int) -> bool:
    src = physics.sources[i]
    return isinstance(src, torch.nn.Module) and isinstance(specialize(src), FFTConvolution)


def check_whole_fits(ctx: DistributedContext, physics: DistributedPhysics, forms: list, shape: tuple,
                      nbytes: int) -> None:
    names = [i for i, f in enumerate(forms) if f is None]
    try:
        # the image, its measurement and the operator's workspace (a few image-sized buffers)
        check_fits(ctx.client, 6 * nbytes, f"operators {names} (no chunk-wise form) run on the whole image {shape}",
                   "give them a chunk-wise form (daskrecon.operators.chunkwise.local_form.register), or give the workers more "
                   "memory")
    except MemoryLimitError as exc:
        raise MemoryLimitError(f"{exc}. These operators have no chunk-wise form, so each runs on the assembled "
                               f"image on one worker{_why_whole(physics, names)}") from None


def _why_whole(physics: DistributedPhysics, indices: list[int]) -> str:
    """A hint for operators that would be chunk-wise at another image size."""
    sources = physics.sources if isinstance(physics.sources, (list, tuple)) else []
    hints = []
    for i in indices:
        why = unaligned_size(sources[i]) if i < len(sources) else None
        if why:
            hints.append(f"operator {i} is {why}")
    return "; " + "; ".join(hints) if hints else ""


def output_chunks(form: LocalOperator, chunks: tuple) -> tuple:
    return form.output_chunks(chunks)


def place_mask(ctx: DistributedContext, form: LocalOperator, shape: tuple, chunks: tuple, dtype: np.dtype,
                persist: bool) -> LocalOperator:
    m = form.mask_array(dtype, len(shape))
    if m is None or all(n == 1 for n in m.shape[2:]):
        return form
    arr = da.from_array(m, chunks=(-1, -1, *output_chunks(form, chunks)[2:]) if form.factor == 1 else -1)
    return form.with_placed_mask(persist_fresh(ctx.client, arr, "mask") if persist else arr)


def place_measurement(ctx: DistributedContext, physics: DistributedPhysics, i: int, v: Any, form: LocalOperator | None,
             shape: tuple, chunks: tuple, dtype: np.dtype, persist: bool) -> Any:
    if form is None:  # whole, on the worker holding operator i
        owner = physics.owners[i]
        if isinstance(v, Future):
            return v
        if isinstance(v, torch.Tensor):
            return place(ctx.client, as_numpy(v, f"y[{i}]"), owner)
        with dask.annotate(workers=[owner], allow_other_workers=True):
            whole = v.rechunk(v.shape)
        return ctx.client.persist(whole).to_delayed(optimize_graph=False).ravel()[0]
    if isinstance(v, Future):
        raise DaskreconError(f"y[{i}] lives whole on a worker (DistributedMeasurements) but operator {i} streams "
                             "chunk by chunk; pass y as a dask array or a tensor")
    arr = da.from_array(as_numpy(v, f"y[{i}]"), chunks=output_chunks(form, chunks)) if isinstance(v, torch.Tensor) \
        else v.astype(dtype).rechunk(output_chunks(form, chunks))
    return persist_fresh(ctx.client, arr, f"y-{i}") if persist else arr


# ---------------------------------------------------------------- one operator's term, as graph pieces
def whole_adjoint(physics: DistributedPhysics, i: int, y: Any, tag: str) -> Any:
    """``A_iᵀ y_i`` of a whole-image operator, one task on the worker holding it (its fast substitute).

    The one way the engine applies a whole operator's adjoint: the default start ``Aᵀy / N``
    (planned eagerly when no operator tells ``x``'s shape, lazily otherwise) and
    :func:`daskrecon.engine.iteration.adjoint_sum` both build it here.
    """
    owner = physics.owners[i]
    return placed(operator_tasks.adjoint_op, owner, [physics.objects.ref(i, owner)], y, {}, True,
                  name=f"operator-adjoint-{i}-{tag}")


def chunkwise_values(u: da.Array, y: da.Array, distance: Any, name: str) -> da.Array:
    """``d(u, y)`` of a chunk-wise operator, one float64 per (batch element, chunk): ``(B, 1, …, 1)`` blocks."""
    return da.map_blocks(fidelity_tasks.pointwise_value_block, u, y, distance=distance, dtype=np.float64,
                         meta=np.empty((0,) * u.ndim, np.float64),
                         chunks=(u.chunks[0], *((1,) * len(c) for c in u.chunks[1:])), name=name)


# ---------------------------------------------------------------- the terms
class GraphInputs:
    """What the terms of one graph share: ``x``, the graph's tag and — made once, only when a whole
    term asks — ``x`` assembled (``assemble-<tag>``) and the fidelities' worker-side references."""

    def __init__(self, problem: Problem, x: da.Array, tag: str) -> None:
        self.problem, self.x, self.tag = problem, x, tag

    @functools.cached_property
    def assembled(self) -> Delayed:
        return whole(self.x, f"assemble-{self.tag}")

    @functools.cached_property
    def fidelities(self) -> Any:
        return self.problem.fidelity.objects_for(self.problem.physics)

    @functools.cached_property
    def owners(self) -> list[str]:
        """The operators' workers, read once for the whole graph."""
        return self.problem.physics.placement.owners


@dataclass(frozen=True)
class ChunkwiseTerm:
    """Operator ``i`` chunk by chunk: ``A_i``/``A_iᵀ`` by ``map_overlap``, its pixel-wise distance per chunk."""

    index: int
    form: LocalOperator
    distance: Any
    y: da.Array

    def gradient(self, inputs: GraphInputs, *, measured: bool = True, eps: float | None = None,
                 row_sums: da.Array | None = None) -> tuple[da.Array, Delayed]:
        """``(A_iᵀ ∇d(A_i x, y_i), d(A_i x, y_i))``: a dask array chunked like ``x``, the value's task.

        ``measured=False`` takes ``y_i = 0`` (made in the tasks). ``eps`` divides the pixel-wise
        term by ``max(A_i 1, eps)`` (SIRT's row sums: ``row_sums`` when given, else made from ones).
        """
        i, tag, x = self.index, inputs.tag, inputs.x
        u = self.form.apply(x)
        # no-op for a planned problem (its chunks suit every operator)
        y = self.y.rechunk(u.chunks) if measured else None
        w = None if eps is None else (row_sums if row_sums is not None else
                                      self.form.apply(da.ones(x.shape, chunks=x.chunks, dtype=x.dtype)))
        r = da.map_blocks(fidelity_tasks.pointwise_grad_block, u, y, w, distance=self.distance,
                          eps=0.0 if eps is None else eps, dtype=u.dtype,
                          meta=np.empty((0,) * u.ndim, u.dtype), name=f"residual-{i}-{tag}")
        v = chunkwise_values(u, y, self.distance, f"value-{i}-{tag}")
        grad = self.form.adjoint(r, x.chunks).rechunk(x.chunks)  # no-op when x's chunks suit the operator
        parts = v.to_delayed(optimize_graph=False).ravel().tolist()
        return grad, delayed(iteration_tasks.sum_values, pure=True)(*parts, dask_key_name=f"value-sum-{i}-{tag}")

    def values(self, inputs: GraphInputs) -> da.Array:
        """``d(A_i x, y_i)`` per batch element, shape ``(B,)``, float64."""
        u = self.form.apply(inputs.x)
        v = chunkwise_values(u, self.y.rechunk(u.chunks), self.distance, f"value-{self.index}-{inputs.tag}")
        return v.sum(axis=tuple(range(1, v.ndim))).rechunk(inputs.problem.shape[0])

    def adjoint(self, inputs: GraphInputs) -> da.Array:
        """``A_iᵀ y_i``, chunked like the iterate."""
        return self.form.adjoint(self.y, inputs.problem.chunks)


@dataclass(frozen=True)
class WholeTerm:
    """Operator ``i`` whole, on the worker that holds it: one task per use, ``x`` assembled once per graph."""

    index: int
    y: Any  # the future (or delayed) of the whole y_i on the operator's worker

    def _refs(self, inputs: GraphInputs) -> tuple[str, list]:
        owner = inputs.owners[self.index]
        return owner, [inputs.problem.physics.objects.ref(self.index, owner), inputs.fidelities.ref(self.index, owner)]

    def gradient(self, inputs: GraphInputs, *, measured: bool = True, eps: float | None = None,
                 row_sums: Any = None) -> tuple[Delayed, Delayed]:
        """``(task of (gradient, value), the value's task)`` on the operator's worker; its fidelity carries
        any row weights (:class:`daskrecon.tasks.poisson.SIRTFidelity`)."""
        i, tag = self.index, inputs.tag
        owner, refs = self._refs(inputs)
        gv = placed(fidelity_tasks.fidelity_grad_value_op, owner, refs, inputs.assembled, self.y if measured else None,
                    i, {}, name=f"operator-gradient-{i}-{tag}")
        return gv, delayed(iteration_tasks.value_of, pure=True)(gv, dask_key_name=f"value-of-{i}-{tag}")

    def values(self, inputs: GraphInputs) -> da.Array:
        owner, refs = self._refs(inputs)
        v = placed(fidelity_tasks.fidelity_fn_op, owner, refs, inputs.assembled, self.y, self.index, {},
                   name=f"operator-value-{self.index}-{inputs.tag}")
        return da.from_delayed(v, (inputs.problem.shape[0],), dtype=np.float32).astype(np.float64)

    def adjoint(self, inputs: GraphInputs) -> da.Array:
        problem = inputs.problem
        a = whole_adjoint(problem.physics, self.index, self.y, inputs.tag)
        return da.from_delayed(a, problem.shape, dtype=problem.dtype).rechunk(problem.chunks)


Term = ChunkwiseTerm | WholeTerm


def terms_of(forms: list, distances: list, ys: list) -> list[Term]:
    """Each operator's term: chunk-wise where it has a (planned) form, whole otherwise."""
    return [ChunkwiseTerm(i, f, d, y) if f is not None else WholeTerm(i, y)
            for i, (f, d, y) in enumerate(zip(forms, distances, ys))]
