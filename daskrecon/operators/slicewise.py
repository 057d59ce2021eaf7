"""Axis-separable operators: a 2-D deepinv operator on every slice of a volume, streamed slab by slab.

Parallel-beam CT acts on each axial slice of a volume independently, multi-slice MRI on each
slice, a 2-D blur on each plane of a stack. Along that axis (the depth ``D`` of a
``(B, C, D, H, W)`` volume) such an operator has a chunk-wise form with no halo at all: a
task takes a slab of ``d`` whole slices and returns the ``d`` slices of the measurement
(sinograms, k-space), so a volume larger than any worker's memory streams through Zarr
slab by slab, measurements chunked along the same axis.

:func:`slicewise` declares it: ``dr.slicewise(Tomography(angles=…, img_width=n))`` is a deepinv
``LinearPhysics`` on volumes (``A(x)[:, :, k] = op.A(x[:, :, k])`` for every slice ``k``, its
adjoint likewise) that plain deepinv runs whole and daskrecon streams. deepinv operators
known to act on each batch element alone (``Tomography``, 2-D ``MRI``, 2-D blurs,
``Downsampling``, ``Inpainting`` with a 2-D mask, ``Denoising``) are accepted as they are;
any other 2-D ``LinearPhysics`` with ``separable=True`` (the caller's word that it treats
batch elements independently). Its chunk-wise form, :class:`SlicewiseOperator`, is what
:func:`daskrecon.operators.chunkwise.local_form` returns for it.

The operator reaches the tasks as a small payload (:func:`slice_recipe`): a deepinv
``Tomography`` rebuilds its sampling grids from its arguments on each worker (once per
process) instead of carrying them (135 MB pickled at 256² × 64 angles; 1.5 GB at 512² × 180).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import dask
import dask.array as da
import numpy as np
import torch
from deepinv.physics import MRI, Blur, BlurFFT, Denoising, Downsampling, Inpainting, LinearPhysics, Tomography

from daskrecon.errors import ShapeError
from daskrecon.operators.chunkwise import local_form
from daskrecon.tasks import slicewise as slab_tasks

__all__ = ["AXES", "Slicewise", "SlicewiseOperator", "slice_recipe", "slicewise"]

#: Axes an operator can be declared separable along (the depth of a ``(B, C, D, H, W)`` volume).
AXES = ("depth",)
#: Slices handed to the 2-D operator at once (its batch axis), by default.
SLICE_BATCH = 8


# ---------------------------------------------------------------------- recipes (small payloads)
@functools.singledispatch
def slice_recipe(op: Any) -> tuple[Any, dict | None]:
    """How a 2-D operator travels to the workers: ``(builder, state)``.

    ``state=None``: ``builder`` is the operator itself (pickled whole). Otherwise ``builder()``
    builds it and ``state`` (its persistent buffers, as numpy) is loaded into the result.
    Register a recipe for an operator whose pickle is large but whose construction is cheap.
    """
    return op, None


@slice_recipe.register
def _(op: Tomography) -> tuple[Any, dict | None]:
    radon = op.radon
    kwargs = dict(angles=op.angles.detach().cpu().clone(), img_width=int(op.img_width), circle=bool(radon.circle),
                  parallel_computation=bool(radon.parallel_computation),
                  adjoint_via_backprop=bool(op.adjoint_via_backprop),
                  fbp_interpolate_boundary=bool(op.fbp_interpolate_boundary), normalize=bool(op.normalize),
                  fan_beam=bool(op.fan_beam), dtype=op.dtype)
    if op.fan_beam:
        kwargs["fan_parameters"] = dict(radon.fan_parameters)
    state = {k: v.detach().cpu().numpy().copy() for k, v in op.state_dict().items()}
    return functools.partial(_build_tomography, **kwargs), state


def _build_tomography(**kwargs: Any) -> Tomography:
    return Tomography(**kwargs)


# ---------------------------------------------------------------------- separability (which ops qualify)
def _separable_reason(op: Any) -> str | None:
    """Why ``op`` is not known to act on each batch element alone, or ``None`` when it is."""
    if isinstance(op, Tomography):
        return None
    if isinstance(op, MRI):
        if getattr(op, "three_d", False):
            return "a 3-D MRI (three_d=True) transforms along the depth too"
        mask = getattr(op, "mask", None)
        if isinstance(mask, torch.Tensor) and mask.dim() >= 4 and mask.shape[0] > 1:
            return f"its mask has a batch of {mask.shape[0]} (one mask for every slice is needed)"
        return None
    if isinstance(op, (Blur, BlurFFT)):
        f = getattr(op, "filter", None)
        if isinstance(f, torch.Tensor) and (f.dim() != 4 or f.shape[0] > 1):
            return f"its filter of shape {tuple(f.shape)} is not one 2-D kernel for every slice"
        return None
    if isinstance(op, Downsampling):
        f = getattr(op, "filter", None)
        if isinstance(f, torch.Tensor) and (f.dim() != 4 or f.shape[0] > 1):
            return f"its filter of shape {tuple(f.shape)} is not one 2-D kernel for every slice"
        return None
    if isinstance(op, Inpainting):
        m = getattr(op, "mask", None)
        if isinstance(m, torch.Tensor) and m.dim() >= 4 and m.shape[0] > 1:
            return f"its mask of shape {tuple(m.shape)} has a batch of {m.shape[0]}"
        return None
    if isinstance(op, Denoising):
        return None
    return f"daskrecon does not know that {type(op).__name__} treats batch elements independently"


# ---------------------------------------------------------------------- the deepinv physics
class Slicewise(LinearPhysics):
    """A 2-D linear operator applied to every depth slice of ``(B, C, D, H, W)`` volumes.

    ``A(x)[:, :, k] = op.A(x[:, :, k])`` and ``A_adjoint(y)[:, :, k] = op.A_adjoint(y[:, :, k])``:
    a deepinv ``LinearPhysics`` (stack it, give it to deepinv's solvers, distribute it). Build it
    with :func:`slicewise`.

    Parameters
    ----------
    op : deepinv.physics.LinearPhysics
        The 2-D operator, on ``(B, C, H, W)`` images.
    axis : {"depth"}
    batch : int
        Slices given to ``op`` at once (its batch axis), when ``B == 1``.
    """

    def __init__(self, op: LinearPhysics, axis: str = "depth", batch: int = SLICE_BATCH, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.op = op
        self.axis = axis
        self.batch = int(batch)
        self._payload: bytes | None = None

    def A(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return slab_tasks.apply_slices(self.op, _volume(x, "A"), "A", self.batch)

    def A_adjoint(self, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return slab_tasks.apply_slices(self.op, _volume(y, "A_adjoint"), "A_adjoint", self.batch)

    @property
    def payload(self) -> bytes:
        """The 2-D operator as the tasks receive it (:func:`slice_recipe`, pickled)."""
        if self._payload is None:
            self._payload = cloudpickle.dumps(slice_recipe(self.op))
            slab_tasks.remember(self._payload, self.op)  # the driver's probes use this one, not a rebuilt copy
        return self._payload

    def __reduce__(self) -> tuple:
        # The small payload, not the operator's buffers (a Tomography's grids), wherever it travels.
        return (_rebuild, (self.payload, self.axis, self.batch))

    def __repr__(self) -> str:
        return f"Slicewise({type(self.op).__name__}, axis={self.axis!r})"


def _rebuild(payload: bytes, axis: str, batch: int) -> Slicewise:
    out = Slicewise(slab_tasks.build_operator(payload), axis=axis, batch=batch)
    out._payload = payload
    return out


def _volume(t: Any, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 5:
        shape = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
        raise ShapeError(f"slicewise {what}: takes (B, C, D, H, W) volumes, got {shape}")
    return t


def slicewise(op: LinearPhysics, axis: str = "depth", *, separable: bool | None = None,
              batch: int = SLICE_BATCH) -> Slicewise:
    """Declare a 2-D operator as acting on every slice of a volume, so that it streams slab by slab.

    Parameters
    ----------
    op : deepinv.physics.LinearPhysics
        A 2-D operator on ``(B, C, H, W)`` images: ``Tomography`` (parallel or fan beam per
        slice), 2-D ``MRI``, a ``Blur``/``BlurFFT``/``Downsampling`` with one 2-D kernel,
        ``Inpainting`` with one mask, ``Denoising`` — or any other with ``separable=True``.
    axis : {"depth"}
        The axis the volume is cut along: ``"depth"``, ``D`` of ``(B, C, D, H, W)``.
    separable : bool, optional
        ``True``: the caller asserts that ``op`` treats batch elements independently (needed for
        operators daskrecon does not know). ``False`` refuses.
    batch : int
        Slices given to ``op`` at once, as its batch (memory per task grows with it: a
        ``Tomography`` holds ``angles × H × W`` floats per slice while it projects).

    Returns
    -------
    Slicewise
        A deepinv ``LinearPhysics`` on volumes; ``dr.distribute([...], ctx)`` of a list of them (e.g.
        one per subset of angles) runs chunk by chunk along the depth.

    Raises
    ------
    ValueError
        An unknown ``axis``, a ``batch`` below 1, or an operator not known to be separable.
    TypeError
        ``op`` is not a linear deepinv physics.

    Examples
    --------
    >>> import torch, deepinv as dinv, daskrecon as dr
    >>> ct = dr.slicewise(dinv.physics.Tomography(angles=30, img_width=32, normalize=True))
    >>> ct.A(torch.rand(1, 1, 4, 32, 32)).shape   # 4 sinograms of 46 detectors × 30 angles
    torch.Size([1, 1, 4, 46, 30])
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES} (the depth of a (B, C, D, H, W) volume), got {axis!r}")
    if not isinstance(op, LinearPhysics):
        raise TypeError(f"slicewise takes a deepinv LinearPhysics (it needs A_adjoint), got {type(op).__name__}")
    if isinstance(op, Slicewise):
        raise TypeError("this operator is already slicewise")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    why = _separable_reason(op)
    if separable is False or (why is not None and not separable):
        raise ValueError(f"{type(op).__name__} is not known to act on each slice alone: {why or 'separable=False'}. "
                         "Pass separable=True if it treats batch elements independently")
    return Slicewise(op, axis=axis, batch=batch)


# ---------------------------------------------------------------------- the chunk-wise form
@dataclass(frozen=True, eq=False)
class SlicewiseOperator:
    """The chunk-wise form of a :class:`Slicewise` operator: slabs of whole slices, no halo.

    The graph builders use it as they use a :class:`~daskrecon.operators.chunkwise.LocalOperator`:
    :meth:`apply`, :meth:`adjoint`, the shape and chunk maps, :meth:`norm_bound`; the iterate's
    planner keeps :attr:`whole_axes` in one chunk.
    """

    payload: bytes
    batch: int = SLICE_BATCH
    name: str = "slicewise"
    stager: Any = field(default=None, repr=False)
    #: Not a local operator: no factor, mask or filter (the planners' and solvers' checks read them).
    factor: int = 1
    mask: Any = None
    mask_bound: float | None = None
    filter: Any = None
    padding: str = "none"

    @property
    def whole_axes(self) -> tuple[int, ...]:
        """Axes of a ``(B, C, D, H, W)`` volume every chunk holds whole (a slice's ``H`` and ``W``)."""
        return (3, 4)

    @property
    def invariant_axes(self) -> tuple[int, ...]:
        """Axes along which the operator is the same at every index: the depth (one 2-D operator on every
        slice), so ``A1`` and ``Aᵀ1`` are one slice repeated (the EM algorithms keep that slice only)."""
        return (2,)

    def _op(self) -> Any:
        return slab_tasks.build_operator(self.payload)

    @functools.cached_property
    def _payload_key(self) -> Any:
        return dask.delayed(self.payload, pure=True, name=f"slicewise-op-{dask.base.tokenize(self.payload)}")

    # ------------------------------------------------------------------ geometry (driver, one slice)
    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``A(x)`` for an ``x`` of ``shape`` (one slice projected on the driver, cached)."""
        _check_volume(shape, self.name)
        b, c, d, h, w = shape
        c2, h2, w2 = _slice_out(self.payload, (c, h, w), "A")
        return (b, c2, d, h2, w2)

    def input_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``x`` for a ``y = A(x)`` of ``shape``."""
        _check_volume(shape, self.name)
        b, c, d, h, w = shape
        c2, h2, w2 = _slice_out(self.payload, (c, h, w), "A_adjoint")
        return (b, c2, d, h2, w2)

    def output_chunks(self, chunks: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        shape = tuple(sum(c) for c in chunks)
        out = self.output_shape(shape)
        return ((out[0],), (out[1],), tuple(chunks[2]), (out[3],), (out[4],))

    def min_chunk(self, n_chunks: int) -> int:
        return 1

    def fit_chunks(self, chunks: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        return ((sum(chunks[0]),), (sum(chunks[1]),), tuple(chunks[2]), (sum(chunks[3]),), (sum(chunks[4]),))

    def mask_array(self, dtype: Any, ndim: int = 5) -> None:
        return None

    def norm_bound(self, shape: tuple[int, ...] | None = None) -> float:
        """``‖A‖²``: the 2-D operator's squared norm on one slice (power method on the driver), with 2 % margin.

        Slices are independent, so the volume's operator has the norm of one slice's.
        """
        if shape is None:
            raise ValueError(f"{self.name}: the norm of a slicewise operator needs the volume's shape")
        _check_volume(shape, self.name)
        return 1.02 * _slice_sqnorm(self.payload, tuple(shape[1:2]) + tuple(shape[3:]))

    # ------------------------------------------------------------------ graphs
    def apply(self, x: da.Array) -> da.Array:
        """``A(x)``, lazily, slab by slab."""
        x = _as_volume(x, self.name)
        x = x.rechunk(self.fit_chunks(x.chunks))
        out = self.output_chunks(x.chunks)
        return da.map_blocks(slab_tasks.slab_block, x, self._payload_key, "A", self.batch, chunks=out,
                             dtype=x.dtype, meta=np.empty((0,) * 5, x.dtype),
                             name=f"slicewise-A-{dask.base.tokenize(x.name, self.payload, self.batch)}")

    def adjoint(self, y: da.Array, x_chunks: tuple[tuple[int, ...], ...] | None = None) -> da.Array:
        """``Aᵀ(y)``, lazily, slab by slab (chunked along the depth like ``x_chunks`` when given)."""
        y = _as_volume(y, self.name)
        depth = tuple(x_chunks[2]) if x_chunks is not None else y.chunks[2]
        y = y.rechunk(((y.shape[0],), (y.shape[1],), depth, (y.shape[3],), (y.shape[4],)))
        xs = self.input_shape(y.shape)
        out = ((xs[0],), (xs[1],), depth, (xs[3],), (xs[4],))
        return da.map_blocks(slab_tasks.slab_block, y, self._payload_key, "A_adjoint", self.batch, chunks=out,
                             dtype=y.dtype, meta=np.empty((0,) * 5, y.dtype),
                             name=f"slicewise-AT-{dask.base.tokenize(y.name, self.payload, self.batch, depth)}")


def _check_volume(shape: tuple[int, ...], name: str) -> None:
    if len(shape) != 5:
        raise ShapeError(f"{name}: a slicewise operator takes (B, C, D, H, W) volumes, got shape {tuple(shape)}")


def _as_volume(a: Any, name: str) -> da.Array:
    if not isinstance(a, da.Array):
        raise TypeError(f"{name}: chunk-wise operators take dask arrays, got {type(a).__name__}")
    _check_volume(a.shape, name)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name}: chunk-wise operators take real floating-point arrays, got {a.dtype}")
    return a


@functools.lru_cache(maxsize=64)
def _slice_out(payload: bytes, chw: tuple[int, int, int], method: str) -> tuple[int, int, int]:
    out = slab_tasks.apply_slices(slab_tasks.build_operator(payload), torch.zeros((1, chw[0], 1, *chw[1:])),
                                  method, 1)
    return tuple(int(n) for n in (out.shape[1], out.shape[3], out.shape[4]))


@functools.lru_cache(maxsize=64)
def _slice_sqnorm(payload: bytes, chw: tuple[int, int, int], iterations: int = 100, tol: float = 1e-5) -> float:
    op = slab_tasks.build_operator(payload)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, *chw), generator=g)
    x /= x.norm()
    value = 0.0
    with torch.no_grad():
        for _ in range(iterations):
            z = op.A_adjoint(op.A(x))
            new = float((x * z).sum())
            x = z / z.norm()
            if abs(new - value) <= tol * abs(new):
                value = new
                break
            value = new
    return value


@local_form.register
def _(op: Slicewise) -> SlicewiseOperator:
    return SlicewiseOperator(payload=op.payload, batch=op.batch, name=f"slicewise {type(op.op).__name__}")
