"""The data term of a problem, planned: how each operator runs and where its measurement lives.

An operator with a chunk-wise form (:mod:`daskrecon.operators.chunkwise`) and a pixel-wise fidelity runs
chunk by chunk, its measurement chunked like its output; any other runs whole on the worker
that holds it, its measurement placed there. The plan goes into a
:class:`~daskrecon.engine.problem.Problem`, which carries it (and, for a reconstruction, the
denoiser and the iterate's chunks) to the graph builders (:mod:`daskrecon.engine.iteration`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import torch
from deepinv.optim import distance as _distance
from deepinv.optim.data_fidelity import DataFidelity
from distributed import Future

from daskrecon.errors import DaskreconError
from daskrecon.operators.chunkwise import LocalOperator, unaligned_size
from daskrecon.runtime.arrays import as_numpy, persist_fresh, place
from daskrecon.runtime.graphs import placed
from daskrecon.runtime.memory import MemoryLimitError, check_fits
from daskrecon.tasks import fidelity as fidelity_tasks
from daskrecon.tasks import operators as operator_tasks
from daskrecon.tasks.substitutes import FFTConvolution, specialize

if TYPE_CHECKING:  # annotations only: the front is a layer above
    from daskrecon.frontend.context import DistributedContext
    from daskrecon.frontend.physics import DistributedPhysics

__all__ = ["GLOBAL_FORM_MAX_BYTES", "check_whole_fits", "choose_forms", "chunkwise_values", "output_chunks",
           "place_mask", "place_measurement", "whole_adjoint"]

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
