"""`DistributedProcessing` and `DistributedPrior`: a denoiser (or prior) applied tile by tile on workers.

A ``torch.Tensor`` in gives a tensor out: the image is sent to the workers once, tiles
are processed in fixed batches (one task per batch) and only the tiles' cores come
back to be assembled. A ``dask.array.Array`` in gives a lazy dask array out, through
``map_overlap`` with ``depth = overlap`` and ``boundary="none"``: each chunk is tiled
inside its task, so an image in Zarr larger than memory streams chunk by chunk.

The model is pickled once, sent to every worker once (a worker plugin, which also
reaches workers that join or restart later), unpickled by the first task that needs it
and cached on the worker's device; tasks carry only a key.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any

import cloudpickle
import dask
import dask.array as da
import numpy as np
import torch
from distributed import Future
from distributed.diagnostics.plugin import WorkerPlugin

from daskrecon import staging
from daskrecon.tasks import denoising as denoising_tasks
from daskrecon._arrays import as_numpy, gather_arrays, place
from daskrecon.context import DistributedContext
from daskrecon.errors import ShapeError
from daskrecon.fingerprint import fingerprint
from daskrecon.memory import activation_channels, check_fits
from daskrecon.autograd import denoiser_call, needs_grad
from daskrecon.context import scheduler_workers
from daskrecon.placement import release_everywhere
from daskrecon.reduction import tree_reduce
from daskrecon.sharding import balance_loads
from daskrecon.strategies import DistributedSignalStrategy, OverlapTilingStrategy, check_sizes, create_strategy
from daskrecon.tiling import default_batch
from daskrecon.waiting import bounded

__all__ = ["CHECKPOINT_MODES", "DistributedPrior", "DistributedProcessing", "default_align"]

CHECKPOINT_MODES = ("auto", "always", "never")


class _ModelPlugin(WorkerPlugin):
    """Delivers a pickled model to every worker, present and future."""

    def __init__(self, key: str, payload: bytes) -> None:
        self.key = key
        self.payload = payload

    def setup(self, worker: Any) -> None:
        # Runs on the worker's event loop: store bytes only, unpickle in the first task.
        denoising_tasks.store_model_payload(self.key, self.payload, getattr(worker, "address", None))

    def teardown(self, worker: Any) -> None:
        denoising_tasks.forget_model(self.key, getattr(worker, "address", None))


def default_align(model: Any) -> int:
    """Down-sampling factor a network's tiles must align to (8 for DRUNet, 1 for stride-1 CNNs)."""
    net = getattr(model, "denoiser", model)
    name = type(net).__name__
    if name == "DRUNet":
        return 8
    if name == "UNet":
        # deepinv's UNet does not keep `scales`: it has one up-sampling block "Up<k>" per pooling
        ups = sum(1 for n, _ in net.named_children() if n.startswith("Up") and n[2:].isdigit())
        return 2 ** ups if ups else 2 ** max(0, int(getattr(net, "scales", 4)) - 1)
    return 1


def _release(client: Any, name: str, timeout: float | None = None) -> None:
    try:
        bounded(client, client._unregister_worker_plugin, name, what="removing the model from the workers",
                timeout=timeout)
    except Exception:  # the cluster may be gone already
        pass


def _param_dtype(processor: Any) -> torch.dtype | None:
    module = processor if isinstance(processor, torch.nn.Module) else getattr(processor, "denoiser", None)
    if not isinstance(module, torch.nn.Module):
        return None
    return next((p.dtype for p in module.parameters() if p.dtype.is_floating_point), None)


def _module_of(processor: Any) -> torch.nn.Module | None:
    return processor if isinstance(processor, torch.nn.Module) else None


def _param_versions(module: torch.nn.Module | None) -> tuple:
    """Identity and in-place version counter of every parameter: changes when an optimizer steps."""
    if module is None:
        return ()
    return tuple((name, id(p), p._version) for name, p in module.named_parameters())


def _unwrap_state(module: Any, state: dict, prefix: str, local_metadata: Any) -> None:
    inner = prefix + "processor."
    for k in [k for k in state if k.startswith(inner)]:
        state[prefix + k[len(inner):]] = state.pop(k)


def _wrap_state(module: Any, state: dict, prefix: str, *args: Any) -> None:
    inner = prefix + "processor."
    for k in [k for k in state if k.startswith(prefix) and not k.startswith(inner)]:
        state[inner + k[len(prefix):]] = state.pop(k)


def _arg_at(args: tuple, kwargs: dict, path: tuple) -> Any:
    return args[path[1]] if path[0] == "arg" else kwargs[path[1]]


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.from_numpy(np.empty((), dtype=dtype)).dtype


class DistributedProcessing(torch.nn.Module):
    """Apply a denoiser (any ``f(x, *args, **kwargs)``) tile by tile on the workers.

    Parameters
    ----------
    ctx : DistributedContext
    processor : callable
        Usually a ``deepinv.models.Denoiser``; called as ``processor(batch, *args, **kwargs)``
        on batches of tiles (a ``Prior`` with ``method="prox"`` works the same way).
    strategy : str or DistributedSignalStrategy, optional
        ``"overlap_tiling"`` (default, alias ``"smart_tiling"``), ``"basic"``, or an instance
        of a :class:`~daskrecon.strategies.DistributedSignalStrategy` subclass (tensors only).
    strategy_kwargs : dict, optional
        Extra options of the named strategy.
    patch_size : int or sequence of int
        Core size of a tile; a patch at least the image size gives one tile.
    overlap : int or sequence of int
        Context each tile gets on every side that is not the image border. Exact when at
        least the network's receptive radius (see :func:`daskrecon.receptive_radius`).
    tiling_dims : int or sequence of int, optional
        Dimensions to tile (default: all spatial dimensions).
    max_batch_size : int, optional
        Tiles per network call and per task. Default: tasks of tiles chosen from the tile
        geometry only (so results are bitwise the same on any number of workers), run one
        tile per call on CPU workers (fastest there) and all at once on GPU workers.
    align : int, optional
        Window origins multiple of this; default from the network (8 for DRUNet).
    blend : {None, "cosine"}
        Cross-fade neighbouring tiles instead of cutting at the seams.
    method : str
        Method of ``processor`` to call (``"__call__"``, ``"prox"``, ``"grad"``).
    channels_last : bool
        Run 2-D convolutional networks in NHWC memory format on the workers (20-30 %
        faster on CPU; results differ from NCHW by float rounding, ~1e-7).
    checkpoint_batches, checkpoint_use_reentrant, checkpoint_preserve_rng_state
        deepinv 0.5's activation checkpointing of tile batches, for backward passes
        (:mod:`daskrecon.autograd`): ``"always"`` recomputes each tile batch on its worker
        during the backward (one network call's activations at a time); ``"never"`` keeps
        the forward's activations on the worker that ran the batch until the backward;
        ``"auto"`` (default) keeps them while all kept activations fit a quarter of the
        workers' memory limit, and recomputes beyond. The same gradients, bitwise, in
        every mode. The other two are accepted for compatibility.

    Examples
    --------
    >>> dden = dr.distribute(DnCNN(pretrained=None), ctx, patch_size=128, overlap=20)  # doctest: +SKIP
    >>> out = dden(x)                          # tensor in, tensor out
    >>> lazy = dden(da.from_zarr("big.zarr"))  # dask array in, lazy dask array out
    >>> lazy.to_zarr("denoised.zarr")          # streams chunk by chunk

    Notes
    -----
    A lazy array carries the pickled model in its graph (one key, sent to each worker
    that needs it once per compute), so it computes on any client, on this context's
    cluster or another, also after :meth:`close`. It computes on Dask's default
    client, the most recently started one; to choose, use ``ctx.client.compute(lazy)``
    or ``with ctx.client.as_current(): ...``.
    """

    def __init__(
        self,
        ctx: DistributedContext,
        processor: Any,
        *,
        strategy: str | DistributedSignalStrategy | None = None,
        strategy_kwargs: dict | None = None,
        patch_size: int | Sequence[int] = 256,
        overlap: int | Sequence[int] = 64,
        tiling_dims: int | Sequence[int] | None = None,
        max_batch_size: int | None = None,
        align: int | None = None,
        blend: str | None = None,
        method: str = "__call__",
        channels_last: bool = True,
        checkpoint_batches: str = "auto",
        checkpoint_use_reentrant: bool = False,
        checkpoint_preserve_rng_state: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)} for DistributedProcessing")
        if checkpoint_batches not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint_batches must be one of {CHECKPOINT_MODES}, got {checkpoint_batches!r}")
        if not callable(processor) and not hasattr(processor, method):
            raise TypeError(f"processor must be callable, got {type(processor).__name__}")
        if strategy is None:
            strategy = "overlap_tiling"
        if isinstance(strategy, str):
            create_strategy(strategy, (1, 1, 8, 8))  # unknown names fail here, not at the first call
        elif not isinstance(strategy, DistributedSignalStrategy):
            raise TypeError("strategy must be a name or a DistributedSignalStrategy instance, "
                            f"got {type(strategy).__name__}")
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
        check_sizes(patch_size, "patch_size", 1)
        check_sizes(overlap, "overlap", 0)
        if tiling_dims is not None and not (
                isinstance(tiling_dims, int) or (isinstance(tiling_dims, (list, tuple)) and
                                                 all(isinstance(d, int) for d in tiling_dims))):
            raise ValueError(f"tiling_dims must be an int or a sequence of ints, got {tiling_dims!r}")
        self.ctx = ctx
        self.processor = processor
        self.strategy = strategy
        self.strategy_kwargs = dict(strategy_kwargs or {})
        self.patch_size = patch_size
        self.overlap = overlap
        self.tiling_dims = tiling_dims
        self.max_batch_size = max_batch_size
        self.align = align if align is not None else default_align(processor)
        self.blend = blend
        self.method = method
        self.key = f"{type(processor).__name__}-{uuid.uuid4().hex[:10]}"
        self._plugin_name = f"daskrecon-model-{self.key}"
        # Not released when this object is garbage collected: a lazy dask array made by it
        # may be computed later. close() (or the end of the context) releases it.
        payload = cloudpickle.dumps((processor, {"channels_last": channels_last}))
        # A lazy array carries the pickled model as one graph key (sent to each worker that
        # needs it, once per compute), so that it computes on any client, even after close().
        self._payload = dask.delayed(payload, pure=True, name=f"daskrecon-model-payload-{self.key}")
        self._fingerprint = fingerprint((processor, channels_last))
        bounded(ctx.client, ctx.client._register_worker_plugin, plugin=_ModelPlugin(self.key, payload),
                name=self._plugin_name, idempotent=False, what="sending the model to the workers",
                timeout=ctx.setup_timeout)
        self._strategies: dict[tuple, DistributedSignalStrategy] = {}
        self._param_dtype = _param_dtype(processor)
        # Parameters as pickled: a later change (an optimizer step) is sent to the workers once
        # per version, as one key that tasks name (see _state).
        self._sent_versions = _param_versions(self._module)
        self._state_cache: tuple[tuple, Any] | None = None
        self._activations: dict[tuple, float | None] = {}
        self._checked: set[tuple] = set()
        self._kept_live = 0  # bytes of activations kept on the workers for pending backward passes
        self._limits: tuple[int | None, list[int]] | None = None
        # The state dict is the network's own (no "processor." level): a model trained through
        # daskrecon saves weights that load into the plain model, and the other way round.
        self.register_state_dict_post_hook(_unwrap_state)
        self.register_load_state_dict_pre_hook(_wrap_state)
        self.checkpoint_batches = checkpoint_batches
        self.checkpoint_use_reentrant = checkpoint_use_reentrant
        self.checkpoint_preserve_rng_state = checkpoint_preserve_rng_state
        # deepinv's per-call state, set by each tensor call (the driver is the only rank).
        self.current_shape: torch.Size | None = None
        self.img_size: torch.Size | None = None
        self.num_patches: int | None = None
        self.local_indices: list[int] = []

    # ------------------------------------------------------------------ public
    def __call__(self, x: Any, *args: Any, gather: bool = True, **kwargs: Any) -> Any:
        """Process ``x``: a tensor gives a tensor, a dask array a lazy dask array."""
        return self.run(x, self.method, args, kwargs)

    forward = __call__

    def run(self, x: Any, method: str, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Process ``x`` with ``processor.<method>(tile, *args, **kwargs)``."""
        kwargs = kwargs or {}
        if not isinstance(x, (da.Array, torch.Tensor)):
            raise TypeError(f"x must be a torch.Tensor or a dask.array.Array, got {type(x).__name__}")
        self.check_dtype(x.dtype)
        if isinstance(x, da.Array):
            return self._run_dask(x, method, args, kwargs, portable=True)
        if needs_grad(x, *args, *kwargs.values()) or self.trainable_parameters():
            return denoiser_call(self, x, method, args, kwargs)
        return self._run_tensor(x, method, args, kwargs)

    def check_dtype(self, dtype: Any) -> None:
        """Refuse inputs the network cannot take: complex values, or a float type other than its weights'.

        Casting silently would either lose precision (float64 → float32) or double the
        memory of every tile; the caller decides.
        """
        t = _torch_dtype(dtype)
        if t.is_complex:
            raise TypeError(f"the denoiser takes real images, got {t}; pass x.real, x.abs() or a 2-channel "
                            "real view (torch.view_as_real) as the network expects")
        if not t.is_floating_point:
            raise TypeError(f"the denoiser takes floating-point images, got {t}; convert with x.float()")
        if self._param_dtype is not None and t != self._param_dtype:
            raise TypeError(f"x is {t} but the denoiser's weights are {self._param_dtype}; convert x "
                            f"(x.to({self._param_dtype})) or the model (model.to({t})) before distributing it")

    def _tile_bytes(self, method: str, shape: Sequence[int], window: Sequence[int], tiles: int, args: tuple,
                    kwargs: dict, itemsize: int) -> int:
        """Bytes of one network call on ``tiles`` windows (input, output, two largest activations)."""
        key = (method, shape[1], len(shape) - 2, repr(args), repr(sorted(kwargs.items())))
        if key not in self._activations:
            dtype = self._param_dtype or torch.float32
            self._activations[key] = activation_channels(self.processor, method, shape[1], len(shape) - 2, dtype,
                                                          args, kwargs)
        act = self._activations[key] or 0.0
        return int(tiles * shape[0] * math.prod(window) * itemsize * (2 * shape[1] + 2 * act))

    def _kept_bytes(self, method: str, shape: Sequence[int], strategy: Any, args: tuple, kwargs: dict,
                    itemsize: int) -> int | None:
        """Bytes a backward pass would keep for all tiles (every leaf module's output); None if unknown."""
        key = ("total", method, shape[1], len(shape) - 2, repr(args), repr(sorted(kwargs.items())))
        if key not in self._activations:
            dtype = self._param_dtype or torch.float32
            self._activations[key] = activation_channels(self.processor, method, shape[1], len(shape) - 2, dtype,
                                                          args, kwargs, total=True)
        act = self._activations[key]
        if act is None or not isinstance(strategy, OverlapTilingStrategy):
            return None
        return int(shape[0] * strategy.processed_pixels() * itemsize * act)

    def _keeps(self, method: str, shape: Sequence[int], strategy: Any, args: tuple, kwargs: dict,
               itemsize: int) -> int:
        """Bytes of activations the workers keep for this call's backward (0: recompute it there).

        ``checkpoint_batches``: ``"always"`` recomputes each tile batch in the backward
        (one network call's activations at a time); ``"never"`` keeps them on the worker
        from the forward; ``"auto"`` keeps them while all kept activations stay within a
        quarter of the smallest worker memory limit per worker, and recomputes beyond.
        """
        if self.checkpoint_batches == "always" or method == "grad":
            return 0
        need = self._kept_bytes(method, shape, strategy, args, kwargs, itemsize)
        if self.checkpoint_batches == "never":
            return need or 1
        if need is None:
            return 0
        limits = self._memory_limits()
        if not limits or min(limits) == 0:
            return need
        per_worker = (self._kept_live + need) / len(limits)
        return need if per_worker <= 0.25 * min(limits) else 0

    def _check_memory(self, need: int, what: str) -> None:
        check_fits(self.ctx.client, need, what,
                   f"lower patch_size (now {self.patch_size}) or max_batch_size (now {self.max_batch_size}), or give "
                   "the workers more memory")

    @property
    def _module(self) -> torch.nn.Module | None:
        return _module_of(self.processor)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The model's parameters gradients flow to: those that require grad, while autograd records."""
        if self._module is None or not torch.is_grad_enabled():
            return []
        return [(n, p) for n, p in self._module.named_parameters() if p.requires_grad]

    def _state(self) -> Any:
        """The future of the model's current parameters if they changed since pickling, else None.

        One key per version (an optimizer step), fetched once by each worker that needs it;
        tasks carry the key and a worker loads it into its copy of the model when the
        version differs.
        """
        versions = _param_versions(self._module)
        if versions == self._sent_versions:
            return None
        if self._state_cache is None or self._state_cache[0] != versions:
            state = {"version": uuid.uuid4().hex,
                     "params": {n: p.detach().cpu().numpy().copy() for n, p in self._module.named_parameters()}}
            # placed with lineage (not scattered): a worker lost mid-backward gets it back
            self._state_cache = (versions, place(self.ctx.client, state))
        return self._state_cache[1]

    def _memory_limits(self) -> list[int]:
        """The workers' memory limits, asked of the scheduler again only when membership changes."""
        membership = self.ctx.membership
        if membership is None or self._limits is None or self._limits[0] != membership:
            info = scheduler_workers(self.ctx.client, self.ctx.stall_timeout)
            self._limits = (membership, [w.get("memory_limit") or 0 for w in info.values()])
        return self._limits[1]

    def _release_kept(self, call_id: str, nbytes: int) -> None:
        """Drop a forward's kept activations on every worker (its backward ran, or never will).

        Runs from a finalizer, possibly after the context closed (a result that outlived it, freed
        at interpreter exit): then there is no cluster to tell, and nothing to say.
        """
        self._kept_live = max(0, self._kept_live - nbytes)
        if self.ctx.started:
            release_everywhere(self.ctx.client, denoising_tasks.release_kept, call_id)

    def fingerprint(self) -> str:
        """A hash of the pickled model (weights included)."""
        return self._fingerprint

    def close(self) -> None:
        """Remove the model from the workers (lazy arrays made by this object still compute: they carry it)."""
        _release(self.ctx.client, self._plugin_name, self.ctx.stall_timeout)

    def __repr__(self) -> str:
        return (f"DistributedProcessing({type(self.processor).__name__}, patch_size={self.patch_size}, "
                f"overlap={self.overlap}, strategy={getattr(self.strategy, 'name', self.strategy)!r})")

    # ------------------------------------------------------------------ tensors
    def strategy_for(self, shape: Sequence[int]) -> DistributedSignalStrategy:
        """The strategy used for an input of ``shape`` (built once per shape)."""
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

    def _batches(self, strategy: DistributedSignalStrategy) -> list[list[int]]:
        n = strategy.get_num_patches()
        if n < 1:
            raise ValueError("the tiling strategy produced no patches")
        if isinstance(strategy, OverlapTilingStrategy):
            per = self.max_batch_size or default_batch(n, math.prod(strategy.window_shape()) * strategy.img_size[0])
            return strategy.batches(per)
        per = self.max_batch_size or default_batch(n, 1, max_pixels=2**62)
        return [list(range(s, min(s + per, n))) for s in range(0, n, per)]

    def _placement(self, strategy: DistributedSignalStrategy, batches: list[list[int]]) -> list[str]:
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

    def run_placed(self, x: Future, shape: Sequence[int], dtype: torch.dtype, method: str | None = None,
                   args: tuple = (), kwargs: dict | None = None, labels: dict | None = None) -> torch.Tensor:
        """Process an image already in cluster memory (the future of a numpy array) → tensor.

        Saves sending the image from the driver when it was computed on the workers (the
        ``x − τ∇f`` of a PnP step). ``labels`` names the tasks ``x`` comes from, for
        messages about stuck work.
        """
        self.check_dtype(dtype)
        meta = torch.empty(tuple(shape), dtype=dtype, device="meta")
        return self._run_tensor(meta, method or self.method, args, kwargs or {}, placed=x, labels=labels)

    def _run_tensor(self, x: torch.Tensor, method: str, args: tuple, kwargs: dict,
                    placed: Future | None = None, labels: dict | None = None, keep: dict | None = None) -> torch.Tensor:
        if x.dim() < 3:
            raise ShapeError(f"x must be (B, C, *spatial), got shape {tuple(x.shape)}")
        strategy = self.strategy_for(x.shape)
        self.current_shape = self.img_size = torch.Size(x.shape)
        self.num_patches = strategy.get_num_patches()
        self.local_indices = list(range(self.num_patches))
        client = self.ctx.client
        batches = self._batches(strategy)
        if isinstance(strategy, OverlapTilingStrategy):
            gpu = self.ctx.device_mode != "cpu" and self.ctx.device.type == "cuda"
            per_call = self.max_batch_size or (max(len(b) for b in batches) if gpu else 1)
            window = strategy.window_shape()
            need = x.element_size() * x.nelement() + self._tile_bytes(method, x.shape, window, per_call, args, kwargs,
                                                                      x.element_size())
            self._check_memory(need, f"one denoiser call on {per_call} tile(s) of {'×'.join(map(str, window))} pixels "
                                     f"(image {tuple(x.shape)}, {x.dtype}, held whole by the task)")
        x_fut = placed if placed is not None else place(client, as_numpy(x))
        state = self._state()
        futs = [
            client.submit(denoising_tasks.process_patches, self.key, self.ctx.device_mode, method, strategy, x_fut,
                          idx, self.max_batch_size, args, kwargs, state, keep, pure=False, workers=[w],
                          allow_other_workers=True)
            for idx, w in zip(batches, self._placement(strategy, batches))
        ]
        out = torch.zeros(x.shape, dtype=x.dtype, device="cpu")
        names = dict(labels or {})
        names.update({f.key: f"tile batch {k} (tiles {b[0]}..{b[-1]})" for k, (f, b) in enumerate(zip(futs, batches))})
        results = gather_arrays(client, futs, "tile batch", labels=names, stall_timeout=self.ctx.stall_timeout)
        pairs = [(i, torch.from_numpy(a)) for group in results for i, a in group]
        strategy.reduce_patches(out, pairs)
        return out.to(self.ctx.device)

    def _backward_tensor(self, x: torch.Tensor, g: torch.Tensor, method: str, args: tuple, kwargs: dict,
                         params: list[str], paths: list, need_x: bool, kept: str | None = None,
                         x_placed: Future | None = None) -> tuple[torch.Tensor | None, list]:
        """Gradients of ``<g, denoise(x)>``: w.r.t. ``x``, the parameters named ``params`` and the arguments at ``paths``.

        Each tile batch is backpropagated from the cotangent of its tiles' cores, from the
        activations its forward kept on the worker (``kept``, the forward's call id) or,
        where they are not there (``checkpoint_batches``, a worker lost since), recomputed
        with grad enabled one network call at a time — the same gradients either way.
        Window gradients come back and are added in tile order; parameter and argument
        gradients (one flat vector per batch) are summed on the workers along the fixed
        tree. Batches follow the tile geometry only: bitwise the same on any number of workers.
        """
        strategy = self.strategy_for(x.shape)
        if not hasattr(strategy, "patch_cotangents"):
            raise NotImplementedError(f"backward through the {type(strategy).__name__} strategy is not supported: "
                                      "it needs patch_cotangents(grad_out, indices); use overlap tiling")
        client = self.ctx.client
        batches = self._batches(strategy)
        x_fut = x_placed if x_placed is not None else place(client, as_numpy(x))
        g_fut = place(client, as_numpy(g, "grad"))
        state = self._state()
        futs = [
            client.submit(denoising_tasks.backward_patches, self.key, self.ctx.device_mode, method, strategy, x_fut,
                          g_fut, idx, self.max_batch_size, args, kwargs, state, params, paths, need_x, kept,
                          pure=False, workers=[w], allow_other_workers=True)
            for idx, w in zip(batches, self._placement(strategy, batches))
        ]
        labels = {f.key: f"backward of tile batch {k} (tiles {b[0]}..{b[-1]})"
                  for k, (f, b) in enumerate(zip(futs, batches))}
        leaves = [client.submit(denoising_tasks.leaf_gradients, f, pure=False) for f in futs]
        total = tree_reduce(client, leaves, self.ctx.fan_in)
        windows = [client.submit(denoising_tasks.window_gradients, f, pure=False) for f in futs]
        results = gather_arrays(client, windows + [total], "tile batch backward", labels=labels,
                                stall_timeout=self.ctx.stall_timeout)
        flat = torch.from_numpy(results[-1])
        gx = None
        if need_x:
            gx = torch.zeros(x.shape, dtype=x.dtype)
            pairs = sorted((i, a) for group in results[:-1] for i, a in group)
            for i, a in pairs:
                gx[strategy.window_index(i)] += torch.from_numpy(a)
            gx = gx.to(self.ctx.device)
        shapes = [p.shape for n, p in self._module.named_parameters() if n in params] if params else []
        shapes += [_arg_at(args, kwargs, path).shape for path in paths]
        used = flat[len(flat) - len(shapes):] if shapes else flat[:0]
        out, start = [], 0
        for shape, u in zip(shapes, used):
            size = math.prod(shape)
            out.append(flat[start:start + size].reshape(shape).to(self.ctx.device) if u > 0 else None)
            start += size
        return gx, out

    # ------------------------------------------------------------------ dask arrays
    def geometry(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Tiled dimensions, tile cores and overlaps for an input of ``shape`` (after alignment)."""
        probe = OverlapTilingStrategy(tuple(shape), self.tiling_dims, self.patch_size, self.overlap, self.align,
                                      self.blend)
        return probe.tiling_dims, tuple(probe.patch_size), tuple(probe.overlap)

    def _run_dask(self, x: da.Array, method: str, args: tuple, kwargs: dict, *, name: str | None = None,
                  workers: Any = None, portable: bool = False) -> da.Array:
        """``map_overlap`` of the tiled network over ``x``'s chunks.

        ``workers``, a function of a chunk's block index, places each chunk's task (loosely);
        ``name`` names the tasks on the dashboard. ``portable`` puts the pickled model in
        the graph (arrays handed to users); the engine's graphs run where the plugin is.
        """
        if isinstance(self.strategy, DistributedSignalStrategy) or self.strategy == "basic":
            raise TypeError("dask arrays are processed with overlap tiling inside each chunk; "
                            "custom and 'basic' strategies apply to torch tensors")
        if x.ndim < 3:
            raise ShapeError(f"x must be (B, C, *spatial), got shape {x.shape}")
        if x.numblocks[1] != 1:
            x = x.rechunk({1: -1})  # the network needs every channel of a pixel
        tiling_dims, patch, overlap = self.geometry(x.shape)
        depth = {d: 0 for d in range(x.ndim)}
        for d, o in zip(tiling_dims, overlap):
            depth[d] = o
            chunks = x.chunks[d]
            if len(chunks) > 1 and chunks[-1] < o <= min(chunks[:-1]):
                # a short remainder chunk: fold it into its neighbour rather than fail
                chunks = chunks[:-2] + (chunks[-2] + chunks[-1],)
                x = x.rechunk({d: chunks})
            if len(chunks) > 1 and min(chunks) < o:
                raise ShapeError(f"chunks along axis {d} ({min(chunks)} px) are smaller than overlap={o}: "
                                 f"rechunk to at least {o} (ideally >= 2048) along that axis")
            if len(chunks) > 1 and any(c % self.align for c in chunks[:-1]):
                raise ShapeError(f"chunks along axis {d} must be multiples of align={self.align} "
                                 f"for this network, got {chunks[:3]}...; rechunk to multiples of {self.align}")
        for d in range(x.ndim):
            if d not in tiling_dims and d > 1 and x.numblocks[d] > 1:
                x = x.rechunk({d: -1})
        tiling = dict(tiling_dims=tiling_dims, patch_size=patch, overlap=overlap, align=self.align, blend=self.blend)
        self._check_chunk(x, depth, tiling_dims, patch, overlap, method, args, kwargs)
        meta = np.empty((0,) * x.ndim, dtype=x.dtype)
        extra = {"name": name} if name else {}
        if portable:
            extra["payload"] = self._payload
        state = self._state()
        if state is not None:
            extra["state"] = state
        where = {"workers": workers, "allow_other_workers": True} if workers else {}
        if all(x.numblocks[d] == 1 for d in tiling_dims):  # one chunk: no halo to exchange
            with dask.annotate(**where):
                return x.map_blocks(
                    denoising_tasks.process_block, dtype=x.dtype, meta=meta, model_key=self.key,
                    device_mode=self.ctx.device_mode, method=method, tiling=tiling,
                    max_batch_size=self.max_batch_size, args=args, kwargs=kwargs, **extra,
                )
        return staging.map_overlap(
            denoising_tasks.process_block, x, depth=depth, boundary="none", annotations=where, dtype=x.dtype,
            meta=meta, model_key=self.key, device_mode=self.ctx.device_mode, method=method, tiling=tiling,
            max_batch_size=self.max_batch_size, args=args, kwargs=kwargs, **extra,
        )

    def _check_chunk(self, x: da.Array, depth: dict, tiling_dims: tuple, patch: tuple, overlap: tuple, method: str,
                     args: tuple, kwargs: dict) -> None:
        """Refuse a chunk task that cannot fit a worker; once per chunk geometry (it asks the scheduler)."""
        key = (tuple(max(c) for c in x.chunks), str(x.dtype), method, repr(args), repr(sorted(kwargs.items())),
               self.ctx.membership)
        if key in self._checked:
            return
        itemsize = np.dtype(x.dtype).itemsize
        block = [max(c) + 2 * depth[d] if d > 1 else max(c) for d, c in enumerate(x.chunks)]
        window = [min(p + 2 * o, block[d]) for d, p, o in zip(tiling_dims, patch, overlap)]
        need = 3 * math.prod(block) * itemsize + self._tile_bytes(method, block, window, self.max_batch_size or 1,
                                                                  args, kwargs, itemsize)
        self._check_memory(need, f"one chunk task (chunk with halo {'×'.join(map(str, block))}, {x.dtype}) "
                                 f"tiled in windows of {'×'.join(map(str, window))} pixels")
        self._checked.add(key)


class DistributedPrior(torch.nn.Module):
    """A deepinv ``Prior`` (PnP, RED, ...) whose ``prox`` and ``grad`` run tile by tile.

    Takes the options of :class:`DistributedProcessing`. ``prox(x, sigma_denoiser=…)``
    calls ``prior.prox`` on tiles; ``grad(x, …)`` calls ``prior.grad`` on tiles. Both
    are exact for priors that act locally (a denoiser with a bounded receptive field).
    """

    def __init__(self, ctx: DistributedContext, prior: Any, **options: Any) -> None:
        super().__init__()
        self.prior = prior
        self.processing = DistributedProcessing(ctx, prior, method="prox", **options)

    @staticmethod
    def _data(x: Any) -> Any:
        return getattr(x, "data", x) if not isinstance(x, (torch.Tensor, da.Array)) else x

    def prox(self, x: Any, *args: Any, sigma_denoiser: float | None = None, **kwargs: Any) -> Any:
        """``prior.prox`` tile by tile; ``x`` may be a tensor, a dask array or a ``DistributedSignal``."""
        if sigma_denoiser is not None:
            kwargs["sigma_denoiser"] = sigma_denoiser
        return self.processing.run(self._data(x), "prox", args, kwargs)

    def grad(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """``prior.grad`` tile by tile."""
        return self.processing.run(self._data(x), "grad", args, kwargs)

    def close(self) -> None:
        self.processing.close()

    def __repr__(self) -> str:
        return f"DistributedPrior({type(self.prior).__name__}, {self.processing!r})"
