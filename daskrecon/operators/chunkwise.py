"""Chunk-wise local operators: deepinv operators applied to chunked Dask arrays.

An operator is *local* when an output pixel depends on a bounded neighbourhood of the
input: blurs (``Blur`` with circular, reflect, replicate, zero or ``"valid"`` padding, ``BlurFFT``),
``Downsampling``, ``Inpainting``, ``Denoising``. On a Dask array such an operator runs
chunk by chunk with :func:`dask.array.map_overlap`: the halo is the kernel's half-size,
the image border gets the operator's own padding (periodic halos for circular padding;
torch's reflect/replicate/zero padding applied inside the border chunks), so the result
equals the whole-image operator while each task holds one chunk. ``Aᵀ`` is the
vector-Jacobian product of the same chunk function, hence the exact adjoint.

:func:`local_form` is a registry: ``local_form.register(MyPhysics)`` with a function that
returns a :class:`LocalOperator` (or ``None`` for "not local") makes a user's operator
stream through Zarr too. Global operators (tomography, MRI, any other ``Physics``) return
``None`` and keep the per-operator task path on the assembled image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import torch
from deepinv.physics import Blur, BlurFFT, Denoising, Downsampling, Inpainting

from daskrecon.errors import ShapeError
from daskrecon.runtime import halos as staging
from daskrecon.tasks import local_kernels
from daskrecon.tasks.substitutes import FFTConvolution

__all__ = ["LocalOperator", "local_form", "local_form_of"]

PADDINGS = ("circular", "reflect", "replicate", "zeros", "constant", "valid")


@dataclass(frozen=True, eq=False)
class LocalOperator:
    """A linear operator that acts on a bounded neighbourhood of each pixel.

    ``A(x) = (k ⋆ pad(x))[::factor, ::factor] · mask`` on ``(B, C, H, W)`` images — or
    ``(k ⋆ pad(x))[::f, ::f, ::f] · mask`` on ``(B, C, D, H, W)`` volumes —, with deepinv's
    conventions: ``filter`` is a deepinv filter ``(b, c, h, w)`` or ``(b, c, d, h, w)``
    (convolution, not correlation, centre ``h // 2`` for odd sizes), ``padding`` one of
    deepinv's modes. ``filter=None`` means no convolution; ``mask=None`` no mask.
    ``padding="valid"`` keeps only the positions where the kernel fits inside the image:
    the zero-padded result cropped by ``(k - 1) // 2`` pixels at the start of each axis and
    ``k // 2`` at its end, so ``A`` maps ``n`` pixels to ``n - k + 1`` (deepinv's ``"valid"``),
    then subsampled from its first pixel (``ceil((n - k + 1) / f)``, deepinv's ``Downsampling``);
    its adjoint embeds ``y`` in zeros and applies the zero-padded adjoint. Chunk by chunk that
    is the zero-padded operator subsampled with a phase (:attr:`phase`) and cropped by
    :meth:`crop_for` pixels of ``y``.

    Parameters
    ----------
    filter : numpy.ndarray, optional
    padding : {"circular", "reflect", "replicate", "zeros", "constant"}
    factor : int
        Subsampling factor along every spatial axis (``Downsampling``; for volumes, a
        chunk-wise 3-D down-sampling that deepinv has no class for).
    mask : numpy.ndarray, optional
        Broadcastable to the image, ``(1 | B, 1 | C, *spatial)`` (``Inpainting``); boolean
        (kept as it is) or numeric (cast to the image's dtype).
    name : str
        For messages.
    stager : daskrecon.runtime.halos.Stager, optional
        Set by the planner when the image streams through Zarr: the halos of :meth:`A` and
        :meth:`A_adjoint` on dask arrays are then read from scratch Zarr arrays (bitwise the same).
    """

    filter: np.ndarray | None = None
    padding: str = "circular"
    factor: int = 1
    mask: np.ndarray | None = None
    name: str = "operator"
    #: ``max |mask|``, kept when the mask is placed on the cluster (read without fetching it).
    mask_bound: float | None = None
    stager: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"factor must be a positive int, got {self.factor!r}")
        if self.filter is not None and self.filter.ndim not in (4, 5):
            raise ValueError(f"filter must be (b, c, h, w) or (b, c, d, h, w), got shape {self.filter.shape}")
        if self.padding == "valid" and self.filter is None:
            raise ValueError("padding='valid' needs a filter (without one the padding plays no part: use 'zeros')")
        # dask names tasks by a hash of their arguments that ignores memory order: a kernel and
        # its transpose given as a view (same bytes, same shape) would share task keys, and one
        # operator's results would stand for the other's. C order makes the bytes tell them apart.
        for name in ("filter", "mask"):
            a = getattr(self, name)
            if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
                object.__setattr__(self, name, np.ascontiguousarray(a))

    # ------------------------------------------------------------------ geometry (pure)
    @property
    def spatial_dims(self) -> int | None:
        """2 or 3 for an operator with a filter; ``None`` (any) for a mask or a subsampling alone."""
        return None if self.filter is None else self.filter.ndim - 2

    @property
    def depth(self) -> tuple[int, ...]:
        """Halo of a chunk of ``x`` in pixels, per spatial axis (of the filter; ``(0, 0)`` without one)."""
        if self.filter is None:
            return (0, 0)
        return tuple(k // 2 for k in self.filter.shape[2:])

    def depth_for(self, ndim: int) -> tuple[int, ...]:
        """:attr:`depth` for an array of ``ndim`` axes (``ndim - 2`` spatial)."""
        return self.depth if self.filter is not None else (0,) * (ndim - 2)

    @property
    def phase(self) -> tuple[int, ...] | None:
        """``padding="valid"``: per spatial axis, the first pixel the subsampling keeps in each chunk
        (chunks start at multiples of the factor); else ``None`` (pixel 0)."""
        if self.padding != "valid":
            return None
        return tuple(((k - 1) // 2) % self.factor for k in self.filter.shape[2:])

    def crop_for(self, spatial: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
        """``padding="valid"``: pixels of ``y`` cut from the start and the end of each spatial axis
        of the phase-subsampled zero-padded result, for an image of ``spatial`` sizes; else ``None``."""
        if self.padding != "valid":
            return None
        f = self.factor
        # Kept pixels c, c + f, … of the zero-padded result (c = (k - 1) // 2): in the
        # phase-subsampled one (pixel i is i·f + c % f) they start at c // f and number
        # ceil((n - k + 1) / f); the n / f - c // f - that many after them are cut.
        return tuple(((k - 1) // 2 // f, n // f - (k - 1) // 2 // f - _ceil_div(n - k + 1, f))
                     for n, k in zip(spatial, self.filter.shape[2:]))

    @property
    def _pad_mode(self) -> str:
        # "valid" is the zero-padded operator, cropped: the chunk kernels pad with zeros.
        return "zeros" if self.padding == "valid" else self.padding

    @property
    def _conv(self) -> bool:
        return self.filter is not None or self.factor > 1

    def _kernel(self, dtype: np.dtype, ndim: int = 4) -> np.ndarray:
        # A pure subsampling is a 1×1 (×1) identity kernel: one code path for both.
        k = self.filter if self.filter is not None else np.ones((1,) * ndim)
        return np.asarray(k, dtype=dtype)

    def norm_bound(self, shape: tuple[int, ...] | None = None) -> float:
        """An upper bound of ``‖A‖²``: ``‖k‖₁² · max|m|²`` (Young's inequality; exact for a
        non-negative blur kernel that sums to 1 under circular padding), whatever the image's ``shape``."""
        bound = 1.0
        if self.filter is not None:
            k = np.abs(np.asarray(self.filter, dtype=np.float64))
            bound *= float(k.sum(axis=tuple(range(2, k.ndim))).max()) ** 2
        if self.mask_bound is not None:
            bound *= self.mask_bound ** 2
        elif self.mask is not None:
            bound *= float(np.abs(np.asarray(self.mask, dtype=np.float64)).max()) ** 2
        return bound

    def with_placed_mask(self, mask: da.Array) -> LocalOperator:
        """This operator with its mask given as a dask array already in cluster memory.

        A numpy mask is embedded in every graph that uses it; an image-sized one
        (``Inpainting``) would travel with every iteration.
        """
        bound = self.mask_bound
        if bound is None and self.mask is not None and not isinstance(self.mask, da.Array):
            bound = float(np.abs(np.asarray(self.mask, dtype=np.float64)).max())
        return dataclasses.replace(self, mask=mask, mask_bound=bound)

    def mask_array(self, dtype: Any, ndim: int = 4) -> np.ndarray | None:
        """The mask as an array broadcastable to ``ndim``-axis images (bool kept, numbers cast to ``dtype``)."""
        if self.mask is None or isinstance(self.mask, da.Array):
            return None
        m = np.asarray(self.mask)
        if m.dtype != bool:
            m = m.astype(dtype, copy=False)
        return m.reshape((1,) * (ndim - m.ndim) + m.shape)

    def input_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``x`` for a ``y = A(x)`` of ``shape`` (the one whose sides are multiples of the factor)."""
        f = self.factor
        if self.padding != "valid":
            return (*shape[:2], *(m * f for m in shape[2:]))
        # ceil((n - k + 1) / f) = m has exactly one solution n that is a multiple of f.
        return (*shape[:2], *(f * (m + (k - 1) // f) for m, k in zip(shape[2:], self.filter.shape[2:])))

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``A(x)`` for an ``x`` of ``shape``."""
        f = self.factor
        if self.padding != "valid":
            return (*shape[:2], *(_ceil_div(n, f) for n in shape[2:]))
        return (*shape[:2], *(_ceil_div(n - k + 1, f) for n, k in zip(shape[2:], self.filter.shape[2:])))

    def output_chunks(self, chunks: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        """Chunks of ``A(x)`` for an ``x`` chunked ``chunks`` (valid for this operator)."""
        f = self.factor
        out = [tuple(_ceil_div(c, f) for c in chunks[a]) for a in range(2, len(chunks))]
        crop = self.crop_for(tuple(sum(c) for c in chunks[2:]))
        for a, (lo, hi) in enumerate(crop or ()):
            out[a] = _crop_sizes(out[a], lo, hi)
        return (chunks[0], chunks[1], *out)

    def min_chunk(self, n_chunks: int) -> int:
        """Smallest chunk (in pixels of ``x``) the operator can run on exactly."""
        d = max(self.depth)
        if not d:
            return 1
        # A halo reads d pixels of a neighbour; reflect padding reads d + 1 inside a border chunk
        # ("valid" crops up to d from a border chunk, which must keep a pixel).
        return 2 * d + 1 if n_chunks > 1 else d + 1

    def fit_chunks(self, chunks: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        """``chunks`` with the spatial ones made valid: multiples of the factor, none too small."""
        return (chunks[0], chunks[1], *(fit_axis(chunks[a], self.min_chunk(len(chunks[a])), self.factor)
                                        for a in range(2, len(chunks))))

    # ------------------------------------------------------------------ graphs
    def apply(self, x: da.Array) -> da.Array:
        """``A(x)``, lazily, chunk by chunk."""
        x = self._check_images(x)
        if self._conv:
            f = self.factor
            if any(n % f for n in x.shape[2:]):
                raise ShapeError(f"{self.name}: image of {'×'.join(map(str, x.shape[2:]))} pixels is not a multiple "
                                 f"of the downsampling factor {f}")
            x = x.rechunk(self.fit_chunks(x.chunks))
            out_chunks = (x.chunks[0], x.chunks[1], *(tuple(math.ceil(c / f) for c in x.chunks[a])
                                                      for a in range(2, x.ndim)))
            crop = self.crop_for(x.shape[2:])
            x = self._overlap(local_kernels.local_forward_block, x, self.depth_for(x.ndim), out_chunks,
                              x.numblocks[2:])
            if crop is not None:
                x = x[(slice(None), slice(None), *(slice(lo, n - hi) for n, (lo, hi) in zip(x.shape[2:], crop)))]
        if self.mask is not None:
            x = x * _mask_like(self.mask, x, self.name)
        return x

    def adjoint(self, y: da.Array, x_chunks: tuple[tuple[int, ...], ...] | None = None) -> da.Array:
        """``Aᵀ(y)``, lazily, chunk by chunk (the exact adjoint of :meth:`apply`)."""
        y = self._check_images(y)
        if self.mask is not None:
            y = y * _mask_like(self.mask, y, self.name)
        if not self._conv:
            return y
        f = self.factor
        axes = range(2, y.ndim)
        crop = self.crop_for(self.input_shape(y.shape)[2:])
        if crop is not None:  # the crop's adjoint: y embedded in zeros
            padded = (y.chunks[0], y.chunks[1], *(_widen(y.chunks[a], lo, hi) for a, (lo, hi) in zip(axes, crop)))
            y = da.map_blocks(local_kernels.embed_block, y, pad=crop, nblocks=y.numblocks[2:], chunks=padded,
                              dtype=y.dtype, meta=np.empty((0,) * y.ndim, y.dtype))
        xc = x_chunks or (y.chunks[0], y.chunks[1], *(tuple(f * c for c in y.chunks[a]) for a in axes))
        xc = self.fit_chunks(xc)
        y = y.rechunk((y.chunks[0], y.chunks[1], *(tuple(c // f for c in xc[a]) for a in axes)))
        out_chunks = (y.chunks[0], y.chunks[1], *xc[2:])
        halo = tuple(-(-d // f) for d in self.depth_for(y.ndim))
        return self._overlap(local_kernels.local_adjoint_block, y, halo, out_chunks, y.numblocks[2:])

    def _check_images(self, a: Any) -> da.Array:
        a = _as_images(a, self.name)
        nd = self.spatial_dims
        if nd is not None and a.ndim != nd + 2:
            kind = "(B, C, H, W) images" if nd == 2 else "(B, C, D, H, W) volumes"
            raise ShapeError(f"{self.name}: its {nd}-D filter takes {kind}, got shape {a.shape}")
        return a

    def _overlap(self, fn: Any, a: da.Array, halo: tuple[int, ...], out_chunks: tuple, nblocks: tuple) -> da.Array:
        a = a.rechunk({0: -1, 1: -1})
        return staging.map_overlap(
            fn, a, stager=self.stager,
            depth={0: 0, 1: 0, **{2 + k: h for k, h in enumerate(halo)}},
            boundary="periodic" if self.padding == "circular" else "none",
            trim=False, chunks=(a.chunks[0], a.chunks[1], *out_chunks[2:]), dtype=a.dtype,
            meta=np.empty((0,) * a.ndim, a.dtype),
            filt=self._kernel(a.dtype, a.ndim), padding=self._pad_mode, radius=self.depth_for(a.ndim),
            factor=self.factor, nblocks=tuple(nblocks), phase=self.phase,
        )


def _mask_like(mask: Any, a: da.Array, name: str) -> da.Array | np.ndarray:
    """``mask`` shaped to multiply the images ``a`` chunk by chunk (a per-channel weight broadcasts as it is)."""
    if isinstance(mask, da.Array):  # placed on the cluster once (see with_placed_mask)
        m = mask
        if m.ndim != a.ndim or m.shape[2:] != a.shape[2:]:
            raise ShapeError(f"{name}: mask of shape {m.shape} does not fit an image of shape {a.shape}")
        return m.rechunk((-1, -1, *a.chunks[2:]))
    m = np.asarray(mask)
    if m.dtype != bool:
        m = m.astype(a.dtype, copy=False)
    if m.ndim > a.ndim:
        raise ShapeError(f"{name}: mask of shape {m.shape} does not fit an image of shape {a.shape}")
    m = m.reshape((1,) * (a.ndim - m.ndim) + m.shape)
    if all(n == 1 for n in m.shape[2:]):
        return m  # a per-channel (or scalar) weight broadcasts as it is
    if m.shape[2:] != a.shape[2:]:
        raise ShapeError(f"{name}: mask of shape {m.shape} does not fit an image of shape {a.shape}")
    return da.from_array(m, chunks=(-1, -1, *a.chunks[2:]))


def fit_axis(sizes: tuple[int, ...], minimum: int, factor: int = 1) -> tuple[int, ...]:
    """Chunk sizes along one axis, as close to ``sizes`` as possible, such that every chunk is
    a multiple of ``factor`` and at least ``minimum`` (or the whole axis if it is shorter).

    Boundaries are moved down to a multiple of ``factor``; a chunk left too small is merged
    into its left neighbour (or, for the first, the right one).
    """
    total = sum(sizes)
    if total <= max(minimum, factor) or total % factor:
        return (total,)
    edges, pos = [], 0
    for s in sizes[:-1]:
        pos += s
        edges.append(pos - pos % factor)
    out, prev = [], 0
    for e in [*edges, total]:
        if e - prev >= minimum and total - e >= (minimum if e < total else 0):
            out.append(e - prev)
            prev = e
    if prev < total:
        if out:
            out[-1] += total - prev
        else:
            out.append(total - prev)
    return tuple(out)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _crop_sizes(sizes: tuple[int, ...], lo: int, hi: int) -> tuple[int, ...]:
    """Chunk sizes along an axis after slicing ``lo`` pixels off its start and ``hi`` off its end,
    chunks left empty dropped (as dask's slicing does)."""
    edges = np.concatenate([[0], np.cumsum(sizes)])
    end = int(edges[-1]) - hi
    out = tuple(int(min(b, end) - max(a, lo)) for a, b in zip(edges[:-1], edges[1:]))
    return tuple(c for c in out if c > 0)


def _widen(sizes: tuple[int, ...], lo: int, hi: int) -> tuple[int, ...]:
    """Chunk sizes along an axis with ``lo`` pixels added to the first chunk and ``hi`` to the last."""
    out = list(sizes)
    out[0] += lo
    out[-1] += hi
    return tuple(out)


def _as_images(a: Any, name: str) -> da.Array:
    if not isinstance(a, da.Array):
        raise TypeError(f"{name}: chunk-wise operators take dask arrays, got {type(a).__name__}")
    if a.ndim not in (4, 5):
        raise ShapeError(f"{name}: chunk-wise operators take (B, C, H, W) images or (B, C, D, H, W) volumes, "
                         f"got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name}: chunk-wise operators take real floating-point arrays, got {a.dtype}")
    return a


# ---------------------------------------------------------------------- registry
@functools.singledispatch
def local_form(op: Any) -> LocalOperator | None:
    """The chunk-wise form of a deepinv operator, or ``None`` if it is not local.

    Register your own: ``@local_form.register`` on a function of your class that returns
    a :class:`LocalOperator`.
    """
    return None


def local_form_of(op: Any) -> LocalOperator | None:
    """:func:`local_form` of an operator built on a worker (run there, by the physics' ``map_operators``)."""
    return local_form(op)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()  # made C-ordered by LocalOperator


@local_form.register
def _(op: FFTConvolution) -> LocalOperator | None:
    return local_form(op.op)


@local_form.register
def _(op: Blur) -> LocalOperator | None:
    f = op.filter
    if f is None or f.dim() not in (4, 5) or f.is_complex() or op.padding not in PADDINGS:
        return None
    return LocalOperator(filter=_np(f), padding=op.padding, name=type(op).__name__)


@local_form.register
def _(op: BlurFFT) -> LocalOperator | None:
    f = op.filter
    if f is None or f.dim() != 4 or f.is_complex():
        return None
    # BlurFFT centres a filter of even size at h // 2, conv2d at h // 2 - 1: one zero row
    # (column) at the end makes the size odd and the two centres agree.
    f = _np(f)
    h, w = f.shape[-2:]
    f = np.pad(f, ((0, 0), (0, 0), (0, 1 - h % 2), (0, 1 - w % 2)))
    return LocalOperator(filter=f, padding="circular", name="BlurFFT")


def unaligned_size(op: Any) -> str | None:
    """Why a ``Downsampling`` cannot run chunk by chunk at its ``img_size``, or ``None``.

    Chunk by chunk the image's sides are multiples of the factor; for another size deepinv's
    adjoint returns its own ``img_size``, which the chunk-wise form could not give back.
    """
    size, factor = getattr(op, "imsize", None), getattr(op, "factor", None)
    if not isinstance(op, Downsampling) or size is None or not isinstance(factor, int):
        return None
    sides = tuple(int(n) for n in tuple(size)[-2:])
    if not any(n % factor for n in sides):
        return None
    return (f"a Downsampling by {factor} of a {'×'.join(map(str, sides))} image: chunk by chunk the sides must be "
            f"multiples of {factor} (crop or pad the image)")


@local_form.register
def _(op: Downsampling) -> LocalOperator | None:
    if op.padding not in PADDINGS or not isinstance(op.factor, int):
        return None
    f = op.filter
    if f is not None and (f.dim() != 4 or f.is_complex()):
        return None
    if unaligned_size(op) is not None:
        return None
    padding = "zeros" if f is None and op.padding == "valid" else op.padding  # no filter: no padding
    return LocalOperator(filter=None if f is None else _np(f), padding=padding, factor=int(op.factor),
                         name="Downsampling")


@local_form.register
def _(op: Inpainting) -> LocalOperator | None:
    m = op.mask
    if not isinstance(m, torch.Tensor) or m.is_complex():
        return None
    m = _np(m)
    if np.isin(m, (0, 1)).all():
        m = m.astype(bool)  # exact (x·True = x, x·False = 0·x) and 4× fewer bytes in every graph
    return LocalOperator(mask=m, name="Inpainting")


@local_form.register
def _(op: Denoising) -> LocalOperator | None:
    return LocalOperator(name="Denoising")
