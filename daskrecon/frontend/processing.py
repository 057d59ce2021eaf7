"""`DistributedProcessing` and `DistributedPrior`: a denoiser (or prior) applied tile by tile on workers.

A ``torch.Tensor`` in gives a tensor out: the image is sent to the workers once, tiles
are processed in fixed batches (one task per batch) and only the tiles' cores come
back to be assembled. A ``dask.array.Array`` in gives a lazy dask array out, through
``map_overlap`` with ``depth = overlap`` and ``boundary="none"``: each chunk is tiled
inside its task, so an image in Zarr larger than memory streams chunk by chunk.

The model is pickled once, sent to every worker once (a worker plugin, which also
reaches workers that join or restart later), unpickled by the first task that needs it
and cached on the worker's device; tasks carry only a key (:mod:`.model_shipping`). The
tiles, their batches, their workers and their memory are planned by :mod:`.tile_plan`; the
forward, the backward and the dask-array path run in :mod:`.tile_executors`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import deepinv as dinv
import numpy as np
import torch
from distributed import Future

from daskrecon.errors import ShapeError
from daskrecon.frontend import tile_executors
from daskrecon.frontend.autograd import denoiser_call, needs_grad
from daskrecon.frontend.context import DistributedContext
from daskrecon.frontend.model_shipping import ModelShipment, module_of, param_dtype
from daskrecon.frontend.tile_plan import CHECKPOINT_MODES, ActivationBudget, TilePlan
from daskrecon.frontend.tile_precision import PrecisionChoice
from daskrecon.frontend.xarrays import is_dataarray, unwrap, wrap
from daskrecon.models import network_layout
from daskrecon.planning.strategies import DistributedSignalStrategy, check_sizes, create_strategy
from daskrecon.runtime.arrays import convert_hint
from daskrecon.runtime.defaults import pick
from daskrecon.runtime.storage import seen_inputs

__all__ = ["ALIGNMENTS", "CHECKPOINT_MODES", "DistributedPrior", "DistributedProcessing", "check_call", "default_align",
           "input_channels", "spatial_dims"]


def _chain(model: Any) -> list[Any]:
    """``model`` and the modules inside it through priors' and wrappers' ``denoiser`` (deepinv's PnP /
    RED, ``EquivariantDenoiser``, :class:`~daskrecon.models.GreyThroughColour`; nested), outermost first."""
    chain = [model]
    while len(chain) < 8:
        inner = getattr(chain[-1], "denoiser", None)
        if not isinstance(inner, torch.nn.Module) or any(inner is m for m in chain):
            break
        chain.append(inner)
    return chain


def _unet_align(net: Any) -> int:
    # deepinv's UNet does not keep `scales`: it has one up-sampling block "Up<k>" per pooling
    ups = sum(1 for n, _ in net.named_children() if n.startswith("Up") and n[2:].isdigit())
    return 2 ** ups if ups else 2 ** max(0, int(getattr(net, "scales", 4)) - 1)


#: Network class -> the factor its tiles' sides must be multiples of (its total down-sampling).
ALIGNMENTS: dict[type, Callable[[Any], int]] = {
    dinv.models.DRUNet: lambda net: 8,
    dinv.models.UNet: _unet_align,
}

#: Networks whose channels and spatial dimensions are read from their weights.
_READABLE = (dinv.models.DnCNN, dinv.models.DRUNet)


def default_align(model: Any) -> int:
    """Down-sampling factor a network's tiles must align to (8 for DRUNet, 1 for stride-1 CNNs).

    Looked up in :data:`ALIGNMENTS` by class (and base classes), for ``model`` or the network inside
    it (priors' and wrappers' ``denoiser``, nested); 1 when none is there. Add a network of your own
    with ``ALIGNMENTS[MyNet] = lambda net: 16``, or pass ``align=`` to :func:`daskrecon.distribute`.
    """
    for m in _chain(model):
        for cls in type(m).__mro__:
            if cls in ALIGNMENTS:
                return int(ALIGNMENTS[cls](m))
    return 1


def _declared_or_read(model: Any, attr: str, index: int) -> int | None:
    """A wrapper's declared ``attr`` (a class attribute: it changes the layout for what is inside), else
    the DnCNN / DRUNet inside read from its weights (:func:`daskrecon.models.network_layout`)."""
    for m in _chain(model):
        declared = getattr(type(m), attr, None)
        if isinstance(declared, int):
            return declared
        if isinstance(m, _READABLE):
            return network_layout(m.state_dict())[index]
    return None


def input_channels(model: Any) -> int | None:
    """Channels a network takes, when known: a wrapper's declared ``in_channels``, else deepinv's DnCNN
    or DRUNet (inside priors and wrappers too); ``None`` for others (not checked)."""
    return _declared_or_read(model, "in_channels", 0)


def spatial_dims(model: Any) -> int | None:
    """2 for a network of images, 3 for one of volumes, when known (a wrapper's declared ``spatial_dims``,
    else deepinv's DnCNN or DRUNet, inside priors and wrappers too); ``None`` for others (not checked)."""
    return _declared_or_read(model, "spatial_dims", 1)


def _unwrap_state(module: Any, state: dict, prefix: str, local_metadata: Any) -> None:
    inner = prefix + "processor."
    for k in [k for k in state if k.startswith(inner)]:
        state[prefix + k[len(inner):]] = state.pop(k)


def _wrap_state(module: Any, state: dict, prefix: str, *args: Any) -> None:
    inner = prefix + "processor."
    for k in [k for k in state if k.startswith(prefix) and not k.startswith(inner)]:
        state[inner + k[len(prefix):]] = state.pop(k)


#: Layers whose output depends on ``module.training`` (batch statistics, random masks).
_MODE_DEPENDENT = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm,
                   torch.nn.modules.dropout._DropoutNd)


def mode_dependent_layers(module: torch.nn.Module | None) -> list[str]:
    """Class names of the layers (and deepinv wrappers) of ``module`` that compute otherwise in training
    mode: batch normalization, instance normalization with running statistics, dropout, deepinv's
    ``EquivariantDenoiser`` (a random transform in training, its ``eval_transform`` otherwise)."""
    if module is None:
        return []
    found = set()
    for m in module.modules():
        if isinstance(m, _MODE_DEPENDENT) and not (isinstance(m, torch.nn.modules.instancenorm._InstanceNorm)
                                                   and not m.track_running_stats):
            found.add(type(m).__name__)
        elif isinstance(m, dinv.models.EquivariantDenoiser) and m.transform is not m.eval_transform:
            found.add(type(m).__name__)
    return sorted(found)


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.from_numpy(np.empty((), dtype=dtype)).dtype


class DistributedProcessing(torch.nn.Module):
    """Apply a denoiser (any ``f(x, *args, **kwargs)``) tile by tile on the workers.

    (``patch_size``, ``overlap``, ``max_batch_size``, ``channels_last``, ``checkpoint_batches``,
    ``precision`` and ``precision_tol`` default to ``None``: the configured value,
    ``daskrecon.denoiser.*`` in ``dask.config`` — the defaults below unless set; see
    ``docs/configuration.md``.)

    Parameters
    ----------
    ctx : DistributedContext
    processor : callable
        Usually a ``deepinv.models.Denoiser``; called as ``processor(batch, *args, **kwargs)``
        on batches of tiles (a ``Prior`` with ``method="prox"`` works the same way).
    strategy : str or DistributedSignalStrategy, optional
        ``"overlap_tiling"`` (default, alias ``"smart_tiling"``), ``"basic"``, or an instance
        of a :class:`~daskrecon.planning.strategies.DistributedSignalStrategy` subclass (tensors only).
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
        (:mod:`daskrecon.frontend.autograd`): ``"always"`` recomputes each tile batch on its worker
        during the backward (one network call's activations at a time); ``"never"`` keeps
        the forward's activations on the worker that ran the batch until the backward;
        ``"auto"`` (default) keeps them while all kept activations fit a quarter of the
        workers' memory limit, and recomputes beyond. The same gradients, bitwise, in
        every mode. The other two are accepted for compatibility.
    precision : {"fp32", "bf16", "fp16", "auto"}
        What the tiles' network calls run in (:mod:`daskrecon.planning.precision`). ``"fp32"``
        (default): the network as it is. ``"bf16"``/``"fp16"``: under ``torch.autocast``, fp32
        weights, outputs cast back to the input's type; checked once by a probe on a window of
        the first input, refused (:class:`~daskrecon.errors.PrecisionError`) when its error
        exceeds ``precision_tol``. ``"auto"``: the reduced precision the workers' hardware runs
        (bf16, then fp16) when within budget, else fp32 with a warning. The probe's report is
        :attr:`precision_report`.
    precision_tol : float, optional
        Largest relative L2 error of the probe's output against fp32 (default 2e-2).
    one_task_per_worker : bool
        Run one tile task of this denoiser at a time on each worker, with the torch threads of all
        the worker's threads inside it (default ``False``): on a worker of two threads, one tile's
        activations live at a time instead of two, for about the same arithmetic — for volumes
        near the workers' memory limit (docs/outofcore.md). Results are those of the worker with
        that many torch threads; a checkpoint records the setting.

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
        patch_size: int | Sequence[int] | None = None,
        overlap: int | Sequence[int] | None = None,
        tiling_dims: int | Sequence[int] | None = None,
        max_batch_size: int | None = None,
        align: int | None = None,
        blend: str | None = None,
        method: str = "__call__",
        channels_last: bool | None = None,
        checkpoint_batches: str | None = None,
        checkpoint_use_reentrant: bool = False,
        checkpoint_preserve_rng_state: bool = True,
        precision: str | None = None,
        precision_tol: float | None = None,
        one_task_per_worker: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        # None: the configured default (daskrecon.denoiser.* in dask.config: docs/configuration.md)
        patch_size, overlap = pick(patch_size, "denoiser.patch-size"), pick(overlap, "denoiser.overlap")
        max_batch_size = pick(max_batch_size, "denoiser.max-batch-size")
        channels_last = pick(channels_last, "denoiser.channels-last")
        checkpoint_batches = pick(checkpoint_batches, "denoiser.checkpoint-batches")
        precision, precision_tol = pick(precision, "denoiser.precision"), pick(precision_tol, "denoiser.precision-tol")
        one_task_per_worker = pick(one_task_per_worker, "denoiser.one-task-per-worker")
        if not isinstance(one_task_per_worker, bool):
            raise TypeError(f"one_task_per_worker must be True or False, got {one_task_per_worker!r}")
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)} for DistributedProcessing")
        strategy = "overlap_tiling" if strategy is None else strategy
        _check_options(processor, method, strategy, checkpoint_batches, max_batch_size, patch_size, overlap,
                       tiling_dims)
        self.precision_choice = PrecisionChoice(precision, precision_tol)  # checks both before anything ships
        self.ctx = ctx
        self.processor = processor
        self.method = method
        self.shipment = ModelShipment(ctx, processor, channels_last, one_task_per_worker)
        self.one_task_per_worker = one_task_per_worker
        self.plan = TilePlan(ctx, processor, strategy=strategy, strategy_kwargs=dict(strategy_kwargs or {}),
                             patch_size=patch_size, overlap=overlap, tiling_dims=tiling_dims,
                             max_batch_size=max_batch_size,
                             align=align if align is not None else default_align(processor), blend=blend,
                             param_dtype=param_dtype(processor))
        self.activations = ActivationBudget(self.plan, checkpoint_batches)
        # The state dict is the network's own (no "processor." level): a model trained through
        # daskrecon saves weights that load into the plain model, and the other way round.
        self.register_state_dict_post_hook(_unwrap_state)
        self.register_load_state_dict_pre_hook(_wrap_state)
        self.checkpoint_use_reentrant = checkpoint_use_reentrant
        self.checkpoint_preserve_rng_state = checkpoint_preserve_rng_state
        # deepinv's per-call state, set by each tensor call (the driver is the only rank).
        self.current_shape: torch.Size | None = None
        self.img_size: torch.Size | None = None
        self.num_patches: int | None = None
        self.local_indices: list[int] = []
        self._warned_training = False

    # The tiling options, as given (read by the engine and the reconstruction's record).
    strategy = property(lambda self: self.plan.strategy)
    strategy_kwargs = property(lambda self: self.plan.strategy_kwargs)
    patch_size = property(lambda self: self.plan.patch_size)
    overlap = property(lambda self: self.plan.overlap)
    tiling_dims = property(lambda self: self.plan.tiling_dims)
    max_batch_size = property(lambda self: self.plan.max_batch_size)
    align = property(lambda self: self.plan.align)
    blend = property(lambda self: self.plan.blend)
    checkpoint_batches = property(lambda self: self.activations.mode)
    precision = property(lambda self: self.precision_choice.requested)
    precision_tol = property(lambda self: self.precision_choice.tol)
    #: The last precision probe's report (``None`` before one ran; fp32 never probes).
    precision_report = property(lambda self: self.precision_choice.report)

    @property
    def key(self) -> str:
        """What tasks name the model by on the workers."""
        self.shipment.ensure_on_cluster()
        return self.shipment.key

    # ------------------------------------------------------------------ public
    def __call__(self, x: Any, *args: Any, gather: bool = True, **kwargs: Any) -> Any:
        """Process ``x``: a tensor gives a tensor, a dask array a lazy dask array."""
        return self.run(x, self.method, args, kwargs)

    forward = __call__

    def run(self, x: Any, method: str, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Process ``x`` with ``processor.<method>(tile, *args, **kwargs)``; an ``xarray.DataArray``
        gives a ``DataArray`` with its dims, coordinates and attributes (:mod:`.xarrays`)."""
        kwargs = kwargs or {}
        if is_dataarray(x):
            return wrap(self.run(unwrap(x, "x"), method, args, kwargs), x)
        if not isinstance(x, (da.Array, torch.Tensor)):
            raise TypeError(f"x must be a torch.Tensor or a dask.array.Array, got {type(x).__name__}{convert_hint(x)}")
        self.check_dtype(x.dtype)
        self.check_layout(x.shape)
        check_call(self.processor, method, args, kwargs)
        self.warn_training_mode()
        self.resolve_precision(x, method, args, kwargs)
        if isinstance(x, da.Array):
            x = seen_inputs(self.ctx, {"x": x})["x"]  # a Zarr input the workers cannot open: zeros
            return self.run_dask(x, method, args, kwargs, portable=True)
        if needs_grad(x, *args, *kwargs.values()) or self.trainable_parameters():
            return denoiser_call(self, x, method, args, kwargs)
        return self.run_tensor(x, method, args, kwargs)

    def resolve_precision(self, x: Any, method: str, args: tuple = (), kwargs: dict | None = None, *,
                          precision: str | None = None, tol: float | None = None) -> dict:
        """The precision the tiles run in for inputs like ``x``, as a report (``report["precision"]``;
        probed once when not fp32; see ``precision``). ``precision``/``tol`` override the denoiser's
        own settings for one run (``reconstruct(precision=…)``) without changing them."""
        return self.precision_choice.resolve(self, x, method, args, kwargs or {}, requested=precision, tol=tol)

    def check_dtype(self, dtype: Any, name: str = "x") -> None:
        """Refuse inputs the network cannot take: complex values, or a float type other than its weights'.

        Casting silently would either lose precision (float64 → float32) or double the
        memory of every tile; the caller decides.
        """
        t = _torch_dtype(dtype)
        weights = self.plan.param_dtype
        if t.is_complex:
            raise TypeError(f"the denoiser takes real images, got {t}; pass x.real, x.abs() or a 2-channel "
                            "real view (torch.view_as_real) as the network expects")
        if not t.is_floating_point:
            peak = torch.iinfo(t).max if t != torch.bool else 1
            convert = f"{name}.float() / {peak}" if isinstance(dtype, torch.dtype) else f"{name}.astype('float32') / {peak}"
            raise TypeError(f"the denoiser takes floating-point images, scaled as it was trained (deepinv's "
                            f"denoisers: [0, 1]); {name} is {t}: convert it, e.g. {convert} (or divide by the "
                            "image's own maximum)")
        if weights is not None and t != weights:
            if isinstance(dtype, torch.dtype):
                given, convert = str(t), f"{name}.to({weights})"
            else:  # a dask (numpy) array: a Zarr of float64, say
                given, convert = f"{np.dtype(dtype).name} (a dask array)", f"{name}.astype('{str(weights)[6:]}')"
            raise TypeError(f"{name} is {given} but the denoiser's weights are {weights}; convert {name} "
                            f"({convert}) or the model (model.to({t})) before distributing it")

    def check_layout(self, shape: Sequence[int]) -> None:
        """Refuse a signal whose channels or spatial dimensions the network does not take (where
        :func:`input_channels` and :func:`spatial_dims` know them).

        Otherwise the first tile fails on a worker, after the cluster has read and moved the data.
        """
        name = type(self.processor).__name__
        dims = spatial_dims(self.processor)
        if dims is not None and len(shape) - 2 != dims:
            kind = {2: "images (B, C, H, W)", 3: "volumes (B, C, D, H, W)"}.get(dims, f"{dims}-D signals")
            hint = (" For a volume and a 2-D network: daskrecon.models.SliceBySlice(model), tiled with "
                    "overlap=(0, o, o)." if (dims, len(shape)) == (2, 5) else
                    " Add the batch and channel axes: x[None, None] for (H, W), x[None] for (C, H, W)."
                    if len(shape) < 4 else "")
            raise ShapeError(f"the denoiser ({name}) is a {dims}-D network, of {kind}; this signal has shape "
                             f"{tuple(shape)}.{hint}")
        want = input_channels(self.processor)
        if want is None or len(shape) < 2 or shape[1] == want:
            return
        hint = (" For a grey image and a colour network: daskrecon.models.GreyThroughColour(model)."
                if (shape[1], want) == (1, 3) else "")
        raise ShapeError(f"the denoiser ({name}) takes {want}-channel signals, this one has "
                         f"{shape[1]} (shape {tuple(shape)}; channels are axis 1, (B, C, [D,] H, W)).{hint}")

    def warn_training_mode(self) -> None:
        """Say once that the tiles run in eval mode when the model, on the driver, is in training mode and
        has layers for which that changes the result (a tile's batch statistics would depend on the tiling)."""
        module = module_of(self.processor)
        if module is None or not module.training or self._warned_training:
            return
        layers = mode_dependent_layers(module)
        if layers:
            self._warned_training = True
            warnings.warn(
                f"{type(module).__name__} is in training mode and has layers that compute otherwise in it "
                f"({', '.join(layers)}); its tiles run in eval mode on the workers (running statistics, no dropout, "
                "the evaluation transform), as a tile's batch statistics would depend on the tiling: the plain "
                "model in training mode gives other values, and training through the tiles trains the eval-mode "
                "network (running statistics unchanged). Call model.eval() before distributing it to say so.",
                UserWarning, stacklevel=4)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The model's parameters gradients flow to: those that require grad, while autograd records."""
        module = module_of(self.processor)
        if module is None or not torch.is_grad_enabled():
            return []
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def fingerprint(self) -> str:
        """A hash of the pickled model (weights included)."""
        return self.shipment.fingerprint

    def close(self) -> None:
        """Remove the model from the workers (lazy arrays made by this object still compute: they carry it)."""
        self.shipment.close()

    def __repr__(self) -> str:
        return (f"DistributedProcessing({type(self.processor).__name__}, patch_size={self.patch_size}, "
                f"overlap={self.overlap}, strategy={getattr(self.strategy, 'name', self.strategy)!r})")

    def strategy_for(self, shape: Sequence[int]) -> DistributedSignalStrategy:
        """The strategy used for an input of ``shape`` (built once per shape)."""
        return self.plan.strategy_for(shape)

    def geometry(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Tiled dimensions, tile cores and overlaps for an input of ``shape`` (after alignment)."""
        return self.plan.geometry(shape)

    # ------------------------------------------------------------------ executors
    def run_tensor(self, x: torch.Tensor, method: str, args: tuple, kwargs: dict, placed: Future | None = None,
                   labels: dict | None = None, keep: dict | None = None) -> torch.Tensor:
        """A tensor pass on the workers (:func:`~daskrecon.frontend.tile_executors.forward_tensor`), no autograd."""
        out = tile_executors.forward_tensor(self, x, method, args, kwargs, placed=placed, labels=labels, keep=keep,
                                            precision=self.precision_choice.active)
        self.current_shape = self.img_size = torch.Size(x.shape)
        self.num_patches = self.strategy_for(x.shape).get_num_patches()
        self.local_indices = list(range(self.num_patches))
        return out

    def run_backward(self, x: torch.Tensor, g: torch.Tensor, method: str, args: tuple, kwargs: dict,
                     params: list[str], paths: list, need_x: bool, kept: str | None = None,
                     x_placed: Future | None = None) -> tuple[torch.Tensor | None, list]:
        """The backward of a tensor pass (:func:`~daskrecon.frontend.tile_executors.backward_tensor`)."""
        return tile_executors.backward_tensor(self, x, g, method, args, kwargs, params, paths, need_x, kept=kept,
                                              x_placed=x_placed, precision=self.precision_choice.active)

    def run_dask(self, x: da.Array, method: str, args: tuple, kwargs: dict, *, name: str | None = None,
                 workers: Any = None, portable: bool = False, stager: Any = None,
                 precision: str | None = None) -> da.Array:
        """A dask array through the tiled network, lazily (:func:`~daskrecon.frontend.tile_executors.map_dask`);
        with a ``stager`` (out of core) the tiles' halos are read from Zarr; ``precision`` (already
        resolved) overrides the active one."""
        return tile_executors.map_dask(self, x, method, args, kwargs, name=name, workers=workers, portable=portable,
                                       stager=stager, precision=precision or self.precision_choice.active)



def check_call(processor: Any, method: str, args: tuple, kwargs: dict) -> None:
    """Raise ``TypeError`` on the driver when ``processor.<method>(tile, *args, **kwargs)`` cannot bind.

    Without it a missing argument (``DRUNet`` needs ``sigma``) surfaces only when a worker runs the
    first tile — for a lazy array, at ``.compute()`` or ``.to_zarr()``, far from the call that made it.
    Callables whose signature Python cannot read are not checked.
    """
    fn, name = getattr(processor, method, None), method
    if method == "__call__" and isinstance(processor, torch.nn.Module):
        fn, name = processor.forward, "forward"  # Module.__call__ takes (*args, **kwargs)
    if fn is None:
        return
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None, *args, **kwargs)
    except TypeError as e:
        params = ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in sig.parameters.values())
        hint = " (deepinv's denoisers take the noise level: dden(x, sigma=0.05))" if "sigma" in str(e) else ""
        raise TypeError(f"{type(processor).__name__}.{name}({params}) cannot take these arguments: {e}{hint}") \
            from None


def _check_options(processor: Any, method: str, strategy: Any, checkpoint_batches: Any, max_batch_size: Any,
                   patch_size: Any, overlap: Any, tiling_dims: Any) -> None:
    """Raise on options a distributed denoiser cannot take (before the model ships)."""
    if checkpoint_batches not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint_batches must be one of {CHECKPOINT_MODES}, got {checkpoint_batches!r}")
    if not callable(processor) and not hasattr(processor, method):
        raise TypeError(f"processor must be callable, got {type(processor).__name__}")
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
