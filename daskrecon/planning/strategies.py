"""How a signal is cut into patches and put back together.

The interface is deepinv.distributed's ``DistributedSignalStrategy``: a strategy lists
its patches (:meth:`~DistributedSignalStrategy.get_num_patches`), extracts some of them
(:meth:`~DistributedSignalStrategy.get_local_patches`, run on a worker), batches them,
and writes processed patches into the output
(:meth:`~DistributedSignalStrategy.reduce_patches`, run on the driver).
daskrecon adds one optional hook, :meth:`~DistributedSignalStrategy.trim_patch`, run on
the worker, so that only what the reduction needs travels back.
"""

from __future__ import annotations

import itertools
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from daskrecon.planning.tiling import Tile, batch_tiles, blend_weights_1d, plan_tiles, round_up

__all__ = [
    "BasicStrategy",
    "DistributedSignalStrategy",
    "OverlapTilingStrategy",
    "SmartTilingStrategy",
    "TilingStrategy",
    "create_strategy",
]


class DistributedSignalStrategy(ABC):
    """Base class of tiling strategies (deepinv.distributed's interface).

    Parameters
    ----------
    img_size : sequence of int
        Full shape of the signal, e.g. ``(B, C, H, W)``.

    Notes
    -----
    A subclass implements :meth:`get_num_patches`, :meth:`get_local_patches` and
    :meth:`reduce_patches`; :meth:`apply_batching`, :meth:`unpack_batched_results` and
    :meth:`trim_patch` have defaults. Instances are pickled to the workers, so keep them
    small (geometry, not data).
    """

    def __init__(self, img_size: Sequence[int], **kwargs) -> None:
        self.img_size = torch.Size(img_size)

    @abstractmethod
    def get_num_patches(self) -> int:
        """Total number of patches."""

    @abstractmethod
    def get_local_patches(self, x: torch.Tensor, local_indices: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
        """``(index, patch)`` pairs for the given patch indices (runs on a worker)."""

    @abstractmethod
    def reduce_patches(self, out_tensor: torch.Tensor, local_pairs: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Write processed patches into ``out_tensor`` (zeros, full size) in place (runs on the driver)."""

    def apply_batching(self, patches: Sequence[torch.Tensor], max_batch_size: int | None = None) -> list[torch.Tensor]:
        """Concatenate patches along dim 0 into batches of at most ``max_batch_size`` patches."""
        if not patches:
            return []
        self._batching_metadata = {"num_patches": len(patches), "original_batch_size": patches[0].shape[0]}
        step = len(patches) if not max_batch_size or max_batch_size <= 0 else max_batch_size
        return [torch.cat(list(patches[i:i + step]), dim=0) for i in range(0, len(patches), step)]

    def unpack_batched_results(self, processed_batches: Sequence[torch.Tensor], num_patches: int) -> list[torch.Tensor]:
        """Split processed batches back into one tensor per patch."""
        if not processed_batches:
            return []
        b = self._batching_metadata["original_batch_size"]
        out = list(torch.cat(list(processed_batches), dim=0).split(b, dim=0))
        if len(out) != num_patches:
            raise RuntimeError(f"processing returned {len(out)} patches, expected {num_patches}")
        return out

    def trim_patch(self, index: int, processed: torch.Tensor) -> torch.Tensor:
        """Keep only what :meth:`reduce_patches` reads (runs on the worker). Default: all."""
        return processed


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_sizes(value: Any, name: str, minimum: int) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints, each at least ``minimum``) as a tuple; a clear error otherwise.

    A float (``patch_size=16.0``) or a bool is refused rather than truncated or iterated.
    """
    vals = (value,) if not isinstance(value, (list, tuple)) else tuple(value)
    if not vals or not all(_is_int(v) and v >= minimum for v in vals):
        what = "positive" if minimum >= 1 else "non-negative"
        raise ValueError(f"{name} must be a {what} int or a sequence of {what} ints (one per tiled dimension), "
                         f"got {value!r}")
    return tuple(int(v) for v in vals)


def _per_dim(value: int | Sequence[int], n: int, name: str, minimum: int = 1) -> tuple[int, ...]:
    vals = check_sizes(value, name, minimum)
    if not isinstance(value, (list, tuple)):
        return vals * n
    if len(vals) != n:
        raise ValueError(f"{name} has {len(vals)} entries for {n} tiled dimensions")
    return vals


def _tiling_dims(img_size: torch.Size, tiling_dims: int | Sequence[int] | None) -> tuple[int, ...]:
    """The tiled dimensions, each in ``[-ndim, ndim)`` as indexing allows, made non-negative; never wrapped."""
    nd = len(img_size)
    if tiling_dims is None:
        dims = tuple(range(2, nd))  # every spatial dim: (B, C, *spatial)
    elif _is_int(tiling_dims):
        dims = (tiling_dims,)
    elif isinstance(tiling_dims, (list, tuple)) and all(_is_int(d) for d in tiling_dims):
        dims = tuple(tiling_dims)
    else:
        raise ValueError(f"tiling_dims must be an int or a sequence of ints, got {tiling_dims!r}")
    outside = [d for d in dims if not -nd <= d < nd]
    if outside:
        raise ValueError(f"tiling_dims {tiling_dims!r} names dimension(s) {outside} that a {nd}-D signal of shape "
                         f"{tuple(img_size)} does not have (valid: {-nd}..{nd - 1})")
    dims = tuple(sorted(d % nd for d in dims))
    if not dims or len(set(dims)) != len(dims):
        raise ValueError(f"tiling_dims {tiling_dims!r} must name distinct dimensions of a {nd}-D signal")
    return dims


def _place(img_size: torch.Size, tiling_dims: Sequence[int], slices: Sequence[slice]) -> tuple[slice, ...]:
    """A full index into a signal of ``img_size`` with ``slices`` on the tiled dimensions."""
    full = [slice(None)] * len(img_size)
    for d, s in zip(tiling_dims, slices):
        full[d] = s
    return tuple(full)


class OverlapTilingStrategy(DistributedSignalStrategy):
    """Exact overlap tiling (``"overlap_tiling"``, alias ``"smart_tiling"``).

    Disjoint cores of ``patch_size``, each processed in a window with ``overlap`` pixels
    of real context on every side that is not the image border; windows never leave
    the image (see :mod:`daskrecon.planning.tiling`). No padding is added: at the border the
    network pads as it does on the whole image, so with ``overlap`` at least its
    receptive radius the result equals the untiled network's output, borders included.

    Parameters
    ----------
    img_size : sequence of int
    tiling_dims : int or sequence of int, optional
        Dimensions to tile; default: all but the first two (batch, channels).
    patch_size : int or sequence of int
        Core size per tiled dimension (rounded up to a multiple of ``align``).
    overlap : int or sequence of int
        Context per side (rounded up to a multiple of ``align``).
    align : int
        Window origins multiple of this (8 for DRUNet-like networks that down-sample 3×).
    blend : {None, "cosine"}
        ``"cosine"``: neighbouring tiles are cross-faded over ``overlap`` pixels around
        each seam (raised-cosine weights summing to one) instead of cut at the seam; for
        networks whose receptive field is larger than any affordable overlap.
    uniform_windows : bool
        Every window ``patch + 2 * overlap`` (deepinv's geometry) instead of minimal
        windows that carry no context beyond the image border.
    """

    name = "overlap_tiling"

    def __init__(
        self,
        img_size: Sequence[int],
        tiling_dims: int | Sequence[int] | None = None,
        patch_size: int | Sequence[int] = 256,
        overlap: int | Sequence[int] = 32,
        align: int = 1,
        blend: str | None = None,
        uniform_windows: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(img_size)
        if kwargs:
            raise TypeError(f"unexpected options {sorted(kwargs)} for {type(self).__name__}")
        if blend not in (None, "cosine"):
            raise ValueError(f"blend must be None or 'cosine', got {blend!r}")
        self.tiling_dims = _tiling_dims(self.img_size, tiling_dims)
        n = len(self.tiling_dims)
        self.align = int(align)
        self.patch_size = tuple(round_up(p, self.align) for p in _per_dim(patch_size, n, "patch_size"))
        self.overlap = tuple(round_up(o, self.align) for o in _per_dim(overlap, n, "overlap", minimum=0))
        self.blend = blend
        self.uniform_windows = uniform_windows
        spatial = tuple(self.img_size[d] for d in self.tiling_dims)
        self.tiles: list[Tile] = plan_tiles(spatial, self.patch_size, self.overlap, self.align, uniform_windows)

    def get_num_patches(self) -> int:
        return len(self.tiles)

    def _index(self, slices: Sequence[slice]) -> tuple[slice, ...]:
        return _place(self.img_size, self.tiling_dims, slices)

    def window_shape(self) -> tuple[int, ...]:
        """The largest window, per tiled dimension."""
        return tuple(max(t.axes[k].win_stop - t.axes[k].win_start for t in self.tiles) for k in range(len(self.tiling_dims)))

    def batches(self, per_batch: int) -> list[list[int]]:
        """Tile indices grouped by window shape, at most ``per_batch`` per group."""
        return batch_tiles(self.tiles, per_batch)

    def processed_pixels(self) -> int:
        """Spatial pixels the network processes (windows, halos included), per sample."""
        return sum(math.prod(a.win_stop - a.win_start for a in t.axes) for t in self.tiles)

    def get_local_patches(self, x: torch.Tensor, local_indices: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
        return [(i, x[self._index(self.tiles[i].window())]) for i in local_indices]

    def _kept(self, tile: Tile) -> tuple[slice, ...]:
        """Part of the window the reduction reads: the core, widened by half the overlap when blending."""
        if self.blend is None:
            return tile.core_in_window()
        out = []
        for a, o, p, size in zip(tile.axes, self.overlap, self.patch_size, self._spatial()):
            half = min(o, p) // 2 + 1
            lo = max(a.core_start - half, a.win_start) - a.win_start
            hi = min(a.core_stop + half, a.win_stop) - a.win_start
            out.append(slice(lo, hi))
        return tuple(out)

    def _spatial(self) -> tuple[int, ...]:
        return tuple(self.img_size[d] for d in self.tiling_dims)

    def trim_patch(self, index: int, processed: torch.Tensor) -> torch.Tensor:
        return processed[self._index(self._kept(self.tiles[index]))]

    def _weights(self, tile: Tile, kept: tuple[slice, ...], like: torch.Tensor) -> torch.Tensor:
        w = None
        for k, (a, o, p, size, sl) in enumerate(zip(tile.axes, self.overlap, self.patch_size, self._spatial(), kept)):
            v = torch.tensor(blend_weights_1d(a, size, min(o, p)), dtype=like.dtype, device=like.device)[sl]
            shape = [1] * like.dim()
            shape[self.tiling_dims[k]] = v.numel()
            v = v.reshape(shape)
            w = v if w is None else w * v
        return w

    def window_index(self, index: int) -> tuple[slice, ...]:
        """Where tile ``index``'s window (the network's input) lies in the image."""
        return self._index(self.tiles[index].window())

    def patch_cotangents(self, grad_out: torch.Tensor, indices: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
        """``(index, ∂<grad_out, out>/∂trimmed patch)``: the backward of :meth:`reduce_patches` (runs on a worker).

        Cut at the seams, a tile's core receives the output gradient there; blended, the
        gradient times the tile's weight over the sum of all tiles' weights.
        """
        if self.blend is None:
            return [(i, grad_out[self._index(self.tiles[i].core())]) for i in indices]
        weight = torch.zeros_like(grad_out)
        for tile in self.tiles:
            kept = self._kept(tile)
            region = self._index(tuple(slice(a.win_start + s.start, a.win_start + s.stop) for a, s in zip(tile.axes, kept)))
            weight[region] += self._weights(tile, kept, grad_out).expand_as(weight[region])
        out = []
        for i in indices:
            tile = self.tiles[i]
            kept = self._kept(tile)
            region = self._index(tuple(slice(a.win_start + s.start, a.win_start + s.stop) for a, s in zip(tile.axes, kept)))
            out.append((i, self._weights(tile, kept, grad_out) * grad_out[region] / weight[region].clamp_min(1e-12)))
        return out

    def reduce_patches(self, out_tensor: torch.Tensor, local_pairs: Sequence[tuple[int, torch.Tensor]]) -> None:
        if self.blend is None:
            for i, patch in local_pairs:
                out_tensor[self._index(self.tiles[i].core())] = patch.to(out_tensor)
            return
        total = torch.zeros_like(out_tensor)
        weight = torch.zeros_like(out_tensor)
        for i, patch in local_pairs:
            tile = self.tiles[i]
            kept = self._kept(tile)
            region = self._index(tuple(slice(a.win_start + s.start, a.win_start + s.stop) for a, s in zip(tile.axes, kept)))
            w = self._weights(tile, kept, out_tensor)
            total[region] += w * patch.to(out_tensor)
            weight[region] += w.expand_as(patch)
        out_tensor.copy_(total / weight.clamp_min(1e-12))


SmartTilingStrategy = OverlapTilingStrategy


class BasicStrategy(DistributedSignalStrategy):
    """deepinv's ``"basic"`` strategy: contiguous blocks, no halo (seams show).

    ``num_splits`` per tiled dim defaults to ``size // max(64, int(prod(sizes) ** (1/n) / 2))``.
    ``patch_size`` and ``overlap`` are not used.
    """

    name = "basic"

    def __init__(self, img_size: Sequence[int], tiling_dims: int | Sequence[int] | None = None,
                 num_splits: int | Sequence[int] | None = None, **kwargs) -> None:
        super().__init__(img_size)
        self.tiling_dims = _tiling_dims(self.img_size, tiling_dims)
        sizes = [self.img_size[d] for d in self.tiling_dims]
        if num_splits is None:
            target = max(64, int(math.prod(sizes) ** (1 / len(sizes)) / 2))
            num_splits = [max(1, s // target) for s in sizes]
        splits = _per_dim(num_splits, len(sizes), "num_splits")
        bounds = []
        for s, k in zip(sizes, splits):
            base, extra = divmod(s, k)
            edges = [0]
            for j in range(k):
                edges.append(edges[-1] + base + (1 if j < extra else 0))
            bounds.append([slice(a, b) for a, b in zip(edges[:-1], edges[1:])])
        self.blocks = list(itertools.product(*bounds))

    def get_num_patches(self) -> int:
        return len(self.blocks)

    def _index(self, slices: Sequence[slice]) -> tuple[slice, ...]:
        return _place(self.img_size, self.tiling_dims, slices)

    def get_local_patches(self, x: torch.Tensor, local_indices: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
        return [(i, x[self._index(self.blocks[i])].clone()) for i in local_indices]

    def apply_batching(self, patches, max_batch_size=None):
        # Blocks may differ in shape: one patch per batch unless they all agree.
        if len({tuple(p.shape) for p in patches}) > 1:
            self._batching_metadata = {"num_patches": len(patches), "original_batch_size": patches[0].shape[0]}
            return list(patches)
        return super().apply_batching(patches, max_batch_size)

    def unpack_batched_results(self, processed_batches, num_patches):
        if len(processed_batches) == num_patches:
            return list(processed_batches)
        return super().unpack_batched_results(processed_batches, num_patches)

    def reduce_patches(self, out_tensor, local_pairs) -> None:
        for i, patch in local_pairs:
            out_tensor[self._index(self.blocks[i])] = patch.to(out_tensor)

    def window_index(self, index: int) -> tuple[slice, ...]:
        return self._index(self.blocks[index])

    def patch_cotangents(self, grad_out: torch.Tensor, indices: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
        return [(i, grad_out[self._index(self.blocks[i])]) for i in indices]


_BY_NAME = {"overlap_tiling": OverlapTilingStrategy, "smart_tiling": OverlapTilingStrategy, "basic": BasicStrategy}


def create_strategy(*args: Any, **kwargs: Any) -> DistributedSignalStrategy:
    """Build a tiling strategy, in either API's form.

    ``create_strategy(name, img_size, tiling_dims=None, **options)`` (deepinv's earlier API):
    ``name`` is ``"overlap_tiling"`` (alias ``"smart_tiling"``) or ``"basic"``.
    ``create_strategy(img_size, tiling_dims=None, **options)`` (deepinv 0.5): the overlap
    tiling strategy (0.5's ``TilingStrategy``). Options are those of
    :class:`OverlapTilingStrategy` (``patch_size``, ``overlap``, ...) or :class:`BasicStrategy`;
    0.5's ``stride`` (at most ``patch_size``: the tiled result does not depend on it here) and
    ``pad_mode`` (nothing is padded here: windows stay inside the image) are accepted.
    """
    if args and isinstance(args[0], str):
        name, rest = args[0], list(args[1:])
    else:
        name, rest = "overlap_tiling", list(args)
    names = ("img_size", "tiling_dims")
    for key, value in zip(names, rest):
        if key in kwargs:
            raise TypeError(f"create_strategy() got multiple values for {key!r}")
        kwargs[key] = value
    if len(rest) > len(names) or "img_size" not in kwargs:
        raise TypeError("create_strategy(img_size, tiling_dims=None, **options) or "
                        "create_strategy(name, img_size, tiling_dims=None, **options)")
    img_size, tiling_dims = kwargs.pop("img_size"), kwargs.pop("tiling_dims", None)
    try:
        cls = _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown tiling strategy {name!r}; choose one of {sorted(_BY_NAME)} "
                         "or pass a DistributedSignalStrategy instance") from None
    stride = kwargs.pop("stride", None)
    kwargs.pop("pad_mode", None)
    if stride is not None and cls is OverlapTilingStrategy:
        patch = kwargs.get("patch_size", 256)
        pairs = zip(stride if isinstance(stride, (list, tuple)) else [stride] * 8,
                    patch if isinstance(patch, (list, tuple)) else [patch] * 8)
        if any(s > p for s, p in pairs):
            raise ValueError(f"stride {stride} larger than patch_size {patch} would leave pixels unprocessed")
    if cls is BasicStrategy:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("patch_size", "overlap", "align", "blend", "uniform_windows")}
    return cls(img_size, tiling_dims=tiling_dims, **kwargs)


#: deepinv 0.5's name of the overlap tiling strategy.
TilingStrategy = OverlapTilingStrategy
