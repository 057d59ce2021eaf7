"""How a denoiser's input is tiled, batched and spread over the workers, and whether that fits them.

:class:`TilePlan` turns the tiling options into a strategy per input shape (built once), tile
batches fixed by the tile geometry alone (so results are bitwise the same on any number of
workers), a worker for each batch (balanced by the windows' pixels), the tiled dimensions of
a dask array's chunks, and the memory a network call or a chunk task needs — refused before
anything runs when no worker can hold it. :class:`ActivationBudget` decides, per forward with
gradients, whether the workers keep its activations for the backward or recompute them there
(deepinv 0.5's ``checkpoint_batches``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import torch

from daskrecon.errors import ShapeError
from daskrecon.planning.sharding import balance_loads
from daskrecon.planning.strategies import DistributedSignalStrategy, OverlapTilingStrategy, create_strategy
from daskrecon.planning.tiling import default_batch
from daskrecon.runtime.cluster import scheduler_workers
from daskrecon.runtime.memory import activation_channels, check_fits
from daskrecon.runtime.placement import release_everywhere
from daskrecon.tasks import denoising as denoising_tasks

__all__ = ["CHECKPOINT_MODES", "ActivationBudget", "TilePlan"]

CHECKPOINT_MODES = ("auto", "always", "never")


class TilePlan:
    """Tiles, batches, their workers and their memory, for one distributed denoiser (see the module).

    Takes the tiling options of :class:`~daskrecon.frontend.processing.DistributedProcessing`
    (already checked) and the network (``processor``, for the activation probe).
    """

    def __init__(self, ctx: Any, processor: Any, *, strategy: Any, strategy_kwargs: dict, patch_size: Any,
                 overlap: Any, tiling_dims: Any, max_batch_size: int | None, align: int, blend: str | None,
                 param_dtype: torch.dtype | None) -> None:
        self.ctx, self.processor = ctx, processor
        self.strategy, self.strategy_kwargs = strategy, strategy_kwargs
        self.patch_size, self.overlap, self.tiling_dims = patch_size, overlap, tiling_dims
        self.max_batch_size, self.align, self.blend = max_batch_size, align, blend
        self.param_dtype = param_dtype
        self._strategies: dict[tuple, DistributedSignalStrategy] = {}
        self._activations: dict[tuple, float | None] = {}
        self._checked: set[tuple] = set()
        self._limits: tuple[int | None, list[int]] | None = None

    # ------------------------------------------------------------------ geometry
    def strategy_for(self, shape: Sequence[int]) -> DistributedSignalStrategy:
        """The strategy for an input of ``shape`` (built once per shape)."""
        shape = tuple(shape)
        if isinstance(self.strategy, DistributedSignalStrategy):
            if tuple(self.strategy.img_size) != shape:
                raise ShapeError(f"the custom strategy was built for img_size {tuple(self.strategy.img_size)} "
                                 f"but x has shape {shape}; build one per input shape")
            return self.strategy
        if shape not in self._strategies:
            opts = dict(patch_size=self.patch_size, overlap=self.overlap, align=self.align, blend=self.blend)
            self._strategies[shape] = create_strategy(self.strategy, shape, self.tiling_dims,
                                                      **{**opts, **self.strategy_kwargs})
        return self._strategies[shape]

    def geometry(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Tiled dimensions, tile cores and overlaps for an input of ``shape`` (after alignment)."""
        probe = OverlapTilingStrategy(tuple(shape), self.tiling_dims, self.patch_size, self.overlap, self.align,
                                      self.blend)
        return probe.tiling_dims, tuple(probe.patch_size), tuple(probe.overlap)

    def batches(self, strategy: DistributedSignalStrategy) -> list[list[int]]:
        """Tile indices per task, from the tile geometry only."""
        n = strategy.get_num_patches()
        if n < 1:
            raise ValueError("the tiling strategy produced no patches")
        if isinstance(strategy, OverlapTilingStrategy):
            per = self.max_batch_size or default_batch(n, math.prod(strategy.window_shape()) * strategy.img_size[0])
            return strategy.batches(per)
        per = self.max_batch_size or default_batch(n, 1, max_pixels=2**62)
        return [list(range(s, min(s + per, n))) for s in range(0, n, per)]

    def placement(self, strategy: DistributedSignalStrategy, batches: list[list[int]]) -> list[str]:
        """A worker for each batch, so that all workers finish together.

        Left to itself the scheduler puts these tasks next to their input (one worker holds
        the image) and moves them only when work stealing notices, which on a few equal
        tasks costs a large part of a pass. The restriction is loose: a lost worker's batches
        run elsewhere.
        """
        threads = self.ctx.worker_threads()
        workers = list(threads)
        if isinstance(strategy, OverlapTilingStrategy):
            sizes = [math.prod(a.win_stop - a.win_start for a in t.axes) for t in strategy.tiles]
            costs = [sum(sizes[i] for i in b) for b in batches]
        else:
            costs = [len(b) for b in batches]
        return [workers[k] for k in balance_loads(costs, list(threads.values()))]

    # ------------------------------------------------------------------ memory
    def tile_bytes(self, method: str, shape: Sequence[int], window: Sequence[int], tiles: int, args: tuple,
                   kwargs: dict, itemsize: int) -> int:
        """Bytes of one network call on ``tiles`` windows (input, output, two largest activations)."""
        key = (method, shape[1], len(shape) - 2, repr(args), repr(sorted(kwargs.items())))
        if key not in self._activations:
            dtype = self.param_dtype or torch.float32
            self._activations[key] = activation_channels(self.processor, method, shape[1], len(shape) - 2, dtype,
                                                          args, kwargs)
        act = self._activations[key] or 0.0
        return int(tiles * shape[0] * math.prod(window) * itemsize * (2 * shape[1] + 2 * act))

    def kept_bytes(self, method: str, shape: Sequence[int], strategy: Any, args: tuple, kwargs: dict,
                   itemsize: int) -> int | None:
        """Bytes a backward pass would keep for all tiles (every leaf module's output); None if unknown."""
        key = ("total", method, shape[1], len(shape) - 2, repr(args), repr(sorted(kwargs.items())))
        if key not in self._activations:
            dtype = self.param_dtype or torch.float32
            self._activations[key] = activation_channels(self.processor, method, shape[1], len(shape) - 2, dtype,
                                                          args, kwargs, total=True)
        act = self._activations[key]
        if act is None or not isinstance(strategy, OverlapTilingStrategy):
            return None
        return int(shape[0] * strategy.processed_pixels() * itemsize * act)

    def check_memory(self, need: int, what: str) -> None:
        check_fits(self.ctx.client, need, what,
                   f"lower patch_size (now {self.patch_size}) or max_batch_size (now {self.max_batch_size}), or give "
                   "the workers more memory")

    def check_tensor_call(self, x: torch.Tensor, strategy: Any, batches: list[list[int]], method: str, args: tuple,
                          kwargs: dict) -> None:
        """Refuse a tensor pass whose network call (with the whole image, held by the task) fits no worker."""
        if not isinstance(strategy, OverlapTilingStrategy):
            return
        gpu = self.ctx.device_mode != "cpu" and self.ctx.device.type == "cuda"
        per_call = self.max_batch_size or (max(len(b) for b in batches) if gpu else 1)
        window = strategy.window_shape()
        need = x.element_size() * x.nelement() + self.tile_bytes(method, x.shape, window, per_call, args, kwargs,
                                                                 x.element_size())
        self.check_memory(need, f"one denoiser call on {per_call} tile(s) of {'×'.join(map(str, window))} pixels "
                                f"(image {tuple(x.shape)}, {x.dtype}, held whole by the task)")

    def check_chunk(self, x: da.Array, depth: dict, tiling_dims: tuple, patch: tuple, overlap: tuple, method: str,
                    args: tuple, kwargs: dict) -> None:
        """Refuse a chunk task that cannot fit a worker; once per chunk geometry (it asks the scheduler)."""
        key = (tuple(max(c) for c in x.chunks), str(x.dtype), method, repr(args), repr(sorted(kwargs.items())),
               self.ctx.membership)
        if key in self._checked:
            return
        itemsize = np.dtype(x.dtype).itemsize
        block = [max(c) + 2 * depth[d] if d > 1 else max(c) for d, c in enumerate(x.chunks)]
        window = [min(p + 2 * o, block[d]) for d, p, o in zip(tiling_dims, patch, overlap)]
        need = 3 * math.prod(block) * itemsize + self.tile_bytes(method, block, window, self.max_batch_size or 1,
                                                                 args, kwargs, itemsize)
        self.check_memory(need, f"one chunk task (chunk with halo {'×'.join(map(str, block))}, {x.dtype}) "
                                f"tiled in windows of {'×'.join(map(str, window))} pixels")
        self._checked.add(key)

    def memory_limits(self) -> list[int]:
        """The workers' memory limits, asked of the scheduler again only when membership changes."""
        membership = self.ctx.membership
        if membership is None or self._limits is None or self._limits[0] != membership:
            info = scheduler_workers(self.ctx.client, self.ctx.stall_timeout)
            self._limits = (membership, [w.get("memory_limit") or 0 for w in info.values()])
        return self._limits[1]


class ActivationBudget:
    """Whether a forward's activations stay on the workers for its backward, and how many bytes do.

    ``mode`` is deepinv 0.5's ``checkpoint_batches``: ``"always"`` recomputes each tile batch
    in the backward (one network call's activations at a time); ``"never"`` keeps them on the
    worker from the forward; ``"auto"`` keeps them while all kept activations stay within a
    quarter of the smallest worker memory limit per worker, and recomputes beyond.
    """

    def __init__(self, plan: TilePlan, mode: str) -> None:
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint_batches must be one of {CHECKPOINT_MODES}, got {mode!r}")
        self.plan, self.mode = plan, mode
        self.live = 0  # bytes of activations kept on the workers for pending backward passes

    def reserve(self, method: str, shape: Sequence[int], strategy: Any, args: tuple, kwargs: dict,
                itemsize: int) -> int:
        """Bytes of activations the workers keep for this call's backward, counted as live (0: recompute)."""
        need = self._need(method, shape, strategy, args, kwargs, itemsize)
        self.live += need
        return need

    def _need(self, method: str, shape: Sequence[int], strategy: Any, args: tuple, kwargs: dict,
              itemsize: int) -> int:
        if self.mode == "always" or method == "grad":
            return 0
        need = self.plan.kept_bytes(method, shape, strategy, args, kwargs, itemsize)
        if self.mode == "never":
            return need or 1
        if need is None:
            return 0
        limits = self.plan.memory_limits()
        if not limits or min(limits) == 0:
            return need
        per_worker = (self.live + need) / len(limits)
        return need if per_worker <= 0.25 * min(limits) else 0

    def release(self, call_id: str, nbytes: int) -> None:
        """Drop a forward's kept activations on every worker (its backward ran, or never will).

        Runs from a finalizer, possibly after the context closed (a result that outlived it,
        freed at interpreter exit): then there is no cluster to tell, and nothing to say.
        """
        self.live = max(0, self.live - nbytes)
        ctx = self.plan.ctx
        if ctx.started:
            release_everywhere(ctx.client, denoising_tasks.release_kept, call_id)
