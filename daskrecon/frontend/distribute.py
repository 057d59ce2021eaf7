"""`distribute()`: wrap a deepinv object into its distributed counterpart, by type.

Dispatch is a :func:`functools.singledispatch` registry keyed on the deepinv class,
so the most specific class wins (``StackedPhysicsDataFidelity`` before
``DataFidelity``) and users can register their own types with :func:`register`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from deepinv.models import Denoiser
from deepinv.optim import BaseOptim
from deepinv.optim.data_fidelity import DataFidelity
from deepinv.optim.prior import Prior
from deepinv.physics import LinearPhysics, Physics
from deepinv.physics.forward import StackedLinearPhysics, StackedPhysics

from daskrecon.frontend.autograd import DistributedReplicatedParameters
from daskrecon.frontend.context import DistributedContext
from daskrecon.frontend.fidelity import DistributedDataFidelity
from daskrecon.frontend.physics import DistributedLinearPhysics, DistributedPhysics
from daskrecon.frontend.processing import DistributedPrior, DistributedProcessing

__all__ = ["distribute", "register"]

_PHYSICS_OPTIONS = frozenset({"num_operators", "factory_kwargs", "gather_strategy", "dtype", "fast_operators",
                              "reduction"})
_TILING_OPTIONS = frozenset({"tiling_strategy", "patch_size", "overlap", "tiling_dims", "max_batch_size",
                             "strategy_kwargs", "blend", "align", "channels_last", "dtype", "checkpoint_batches",
                             "checkpoint_use_reentrant", "checkpoint_preserve_rng_state", "precision",
                             "precision_tol", "one_task_per_worker"})
_KIND_OPTIONS: dict[str, frozenset[str]] = {
    "physics": _PHYSICS_OPTIONS,
    "linear_physics": _PHYSICS_OPTIONS,
    "data_fidelity": frozenset({"num_operators", "factory_kwargs", "reduction"}),
    "denoiser": _TILING_OPTIONS,
    "prior": _TILING_OPTIONS,
    # deepinv 0.5's training kinds
    "parameters": frozenset({"average"}),
    "module": _TILING_OPTIONS | {"reduction", "average"},
}
# deepinv 0.5 passes these to every kind with its own defaults; a script written for it may too.
_SHARED_DEFAULTS = {"dtype": torch.float32, "gather_strategy": "concatenated", "tiling_strategy": None,
                    "checkpoint_batches": "auto", "checkpoint_use_reentrant": False,
                    "checkpoint_preserve_rng_state": True}
_ALL_OPTIONS = frozenset().union(*_KIND_OPTIONS.values())
_HANDLERS: dict[str, Callable[..., Any]] = {}


def distribute(obj: Any, ctx: DistributedContext, *, type_object: str = "auto", **options: Any) -> Any:
    """Return the distributed counterpart of a deepinv object.

    Parameters
    ----------
    obj : StackedPhysics, list of Physics, factory, DataFidelity, list of DataFidelity,
          StackedPhysicsDataFidelity, Denoiser or Prior
        What to distribute. A factory ``f(i, device, factory_kwargs)`` needs
        ``num_operators``; its kind is detected by building operator 0 on the driver
        (pass ``type_object`` to skip that).
    ctx : DistributedContext
        A started context.
    type_object : {"auto", "physics", "linear_physics", "data_fidelity", "denoiser", "prior", "parameters", "module"}
        Force the kind instead of detecting it. deepinv 0.5's training kinds:
        ``"module"`` (an unfolded ``BaseOptim``, distributed in place: its data fidelities
        and its priors' denoisers) and ``"parameters"`` (see
        :class:`~daskrecon.frontend.framework.DistributedReplicatedParameters`).
    **options
        Per kind. Physics: ``num_operators``, ``factory_kwargs``, ``gather_strategy``,
        ``dtype``, ``fast_operators``, ``reduction``. Data fidelity: ``num_operators``,
        ``factory_kwargs``, ``reduction``. Denoiser / prior: ``patch_size`` (256),
        ``overlap`` (64), ``tiling_strategy``, ``tiling_dims``, ``max_batch_size``,
        ``strategy_kwargs``, ``blend``, ``align``, ``channels_last`` and deepinv 0.5's
        ``checkpoint_batches``, ``checkpoint_use_reentrant``, ``checkpoint_preserve_rng_state``;
        ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"auto"``), ``precision_tol`` and
        ``one_task_per_worker`` (:class:`~daskrecon.frontend.processing.DistributedProcessing`). An option that does not apply to the detected kind raises ``TypeError``, except
        deepinv 0.5's shared options at their default value (``dtype=torch.float32``...).

    Returns
    -------
    DistributedPhysics, DistributedLinearPhysics, DistributedDataFidelity,
    DistributedProcessing or DistributedPrior

    Raises
    ------
    ValueError
        ``obj`` cannot be placed (unknown type, empty or mixed list, factory without
        ``num_operators``), or ``type_object`` is unknown.
    TypeError
        An option unknown or not meant for the kind of ``obj``.
    """
    unknown = set(options) - _ALL_OPTIONS
    if unknown:
        raise TypeError(f"distribute() got unexpected keyword arguments {sorted(unknown)}; "
                        f"known options: {sorted(_ALL_OPTIONS)}")
    if type_object == "auto":
        kind = _kind_of(obj, options)
    elif type_object in _HANDLERS:
        kind = type_object
    else:
        raise ValueError(f"type_object must be 'auto' or one of {sorted(_HANDLERS)}, got {type_object!r}")
    # A deepinv default passed explicitly (distribute(dfid, ctx, dtype=torch.float32)) is not an error.
    options = {k: v for k, v in options.items()
               if k in _KIND_OPTIONS[kind] or not (k in _SHARED_DEFAULTS and _same(v, _SHARED_DEFAULTS[k]))}
    misplaced = set(options) - _KIND_OPTIONS[kind]
    if misplaced:
        raise TypeError(f"options {sorted(misplaced)} do not apply to {kind!r} objects "
                        f"(accepted: {sorted(_KIND_OPTIONS[kind])})")
    return _HANDLERS[kind](obj, ctx, **options)


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


# ---------------------------------------------------------------------- detection
@functools.singledispatch
def _kind_of(obj: Any, options: dict) -> str:
    if callable(obj) and not isinstance(obj, torch.nn.Module):
        return _probe_factory(obj, options)
    raise ValueError(
        f"cannot distribute an object of type {type(obj).__name__}: expected StackedPhysics, a list of Physics, "
        "a factory with num_operators, a DataFidelity (or a list of them), a Denoiser or a Prior; "
        "for another network pass type_object='denoiser'"
    )


@_kind_of.register
def _(obj: StackedPhysics, options: dict) -> str:
    return "linear_physics" if isinstance(obj, StackedLinearPhysics) else "physics"


@_kind_of.register
def _(obj: Physics, options: dict) -> str:
    return "linear_physics" if isinstance(obj, LinearPhysics) else "physics"


@_kind_of.register
def _(obj: DistributedPhysics, options: dict) -> str:
    raise _already_distributed(obj)


def _already_distributed(obj: DistributedPhysics) -> TypeError:
    return TypeError(f"this {type(obj).__name__} is distributed already (its operators live on the workers); "
                     "use it as it is, or distribute the deepinv operators themselves")


def _refuse_distributed(obj: Any) -> None:
    for o in obj if isinstance(obj, (list, tuple)) else [obj]:
        if isinstance(o, DistributedPhysics):
            raise _already_distributed(o)


@_kind_of.register
def _(obj: DataFidelity, options: dict) -> str:
    return "data_fidelity"


@_kind_of.register
def _(obj: Denoiser, options: dict) -> str:
    return "denoiser"


@_kind_of.register
def _(obj: Prior, options: dict) -> str:
    return "prior"


@_kind_of.register
def _(obj: torch.nn.Parameter, options: dict) -> str:
    return "parameters"


@_kind_of.register
def _(obj: BaseOptim, options: dict) -> str:
    return "module"


@_kind_of.register(list)
@_kind_of.register(tuple)
def _(obj: list, options: dict) -> str:
    if not obj:
        raise ValueError("cannot distribute an empty list")
    if all(isinstance(o, torch.nn.Parameter) for o in obj):
        return "parameters"
    if all(isinstance(o, Physics) for o in obj):
        return "linear_physics" if all(isinstance(o, LinearPhysics) for o in obj) else "physics"
    if all(isinstance(o, DataFidelity) for o in obj):
        return "data_fidelity"
    kinds = sorted({type(o).__name__ for o in obj})
    raise ValueError(f"a list to distribute must hold only Physics or only DataFidelity objects, got {kinds}")


def _probe_factory(factory: Callable, options: dict) -> str:
    n = options.get("num_operators")
    if not isinstance(n, int) or n < 1:
        raise ValueError("When using a factory, you must provide num_operators (a positive int)")
    try:
        probe = factory(0, torch.device("cpu"), options.get("factory_kwargs"))
    except Exception as exc:
        raise ValueError(
            f"could not detect what the factory builds (calling factory(0, 'cpu', factory_kwargs) failed: {exc}); "
            "pass type_object='physics', 'linear_physics' or 'data_fidelity'"
        ) from exc
    if isinstance(probe, (Physics, DataFidelity)):
        return _kind_of(probe, options)
    raise ValueError(f"the factory returned a {type(probe).__name__}, expected a Physics or a DataFidelity")


def register(cls: type, kind: str) -> None:
    """Let :func:`distribute` treat instances of ``cls`` (a user type) as ``kind``.

    Parameters
    ----------
    cls : type
    kind : {"physics", "linear_physics", "data_fidelity", "denoiser", "prior"}
    """
    if kind not in _HANDLERS:
        raise ValueError(f"kind must be one of {sorted(_HANDLERS)}, got {kind!r}")
    _kind_of.register(cls, lambda obj, options: kind)


# ---------------------------------------------------------------------- handlers
def _physics_handler(linear: bool) -> Callable[..., DistributedPhysics]:
    def handler(obj: Any, ctx: DistributedContext, *, num_operators: int | None = None,
                factory_kwargs: dict | None = None, gather_strategy: str = "concatenated",
                dtype: torch.dtype | None = None, fast_operators: bool = True,
                reduction: str = "sum") -> DistributedPhysics:
        _refuse_distributed(obj)
        if isinstance(obj, StackedPhysics):
            factory: Any = list(obj.physics_list)
        elif isinstance(obj, Physics):
            factory = [obj]
        elif isinstance(obj, (list, tuple)):
            factory = list(obj)
        elif callable(obj):
            if not isinstance(num_operators, int) or num_operators < 1:
                raise ValueError("When using a factory for physics, you must provide num_operators (a positive int)")
            factory = obj
        else:
            raise ValueError(f"cannot build physics from a {type(obj).__name__}")
        if not callable(factory):
            if num_operators is not None and num_operators != len(factory):
                raise ValueError(f"num_operators={num_operators} but {len(factory)} operators were given")
            num_operators = len(factory)
        cls = DistributedLinearPhysics if linear else DistributedPhysics
        return cls(ctx, num_operators, factory, factory_kwargs=factory_kwargs,
                   gather_strategy=gather_strategy, dtype=dtype, fast_operators=fast_operators, reduction=reduction)

    return handler


def _fidelity_handler(obj: Any, ctx: DistributedContext, *, num_operators: int | None = None,
                      factory_kwargs: dict | None = None, reduction: str = "sum") -> DistributedDataFidelity:
    return DistributedDataFidelity(ctx, obj, num_operators, factory_kwargs=factory_kwargs, reduction=reduction)


def _tiling_options(options: dict) -> dict:
    options = dict(options)
    options.pop("dtype", None)  # outputs keep the input's dtype
    if "tiling_strategy" in options:
        options["strategy"] = options.pop("tiling_strategy")  # None: the default, as in deepinv 0.5
    return options


def _parameters_handler(obj: Any, ctx: DistributedContext, *, average: bool = True) -> Any:
    """deepinv 0.5's ``type_object="parameters"``: the parameter itself (a list for a list), on the context's
    device, carrying its :class:`DistributedReplicatedParameters` as ``_deepinv_dist_sync``.

    Usable as it is in ``Adam([p])`` and arithmetic; its gradient is complete without hooks.
    """
    single = isinstance(obj, torch.nn.Parameter)
    params = [obj] if single else list(obj)
    for i, p in enumerate(params):
        if not isinstance(p, torch.nn.Parameter):
            raise TypeError(f"expected torch.nn.Parameter, got {type(p).__name__} at index {i}")
        if p.device != ctx.device:  # as deepinv: a new Parameter on the context's device
            params[i] = torch.nn.Parameter(p.data.to(ctx.device), requires_grad=p.requires_grad)
    sync = DistributedReplicatedParameters(ctx, params, average=average)
    for p in params:
        p._deepinv_dist_sync = sync
    return params[0] if single else params


def _module_handler(obj: Any, ctx: DistributedContext, *, reduction: str = "sum", average: bool = True,
                    **options: Any) -> Any:
    """deepinv 0.5's ``type_object="module"``: an unfolded algorithm, distributed in place.

    Each data fidelity becomes a :class:`DistributedDataFidelity` and each prior's
    denoiser a :class:`DistributedProcessing` (with the tiling options); the algorithm's
    trainable parameters stay on the driver, where autograd gives them their whole
    gradient (there are no replicas to synchronise).
    """
    if not isinstance(obj, BaseOptim) or not getattr(obj, "unfold", False):
        raise TypeError(f"type_object='module' takes an unfolded deepinv algorithm (BaseOptim with unfold=True, "
                        f"e.g. optim_builder(..., unfold=True)), got {type(obj).__name__}"
                        + ("" if not isinstance(obj, BaseOptim) else " with unfold=False"))
    for i, fid in enumerate(obj.data_fidelity):
        if not isinstance(fid, DistributedDataFidelity) and not type(fid).__name__ == "ZeroFidelity":
            obj.data_fidelity[i] = DistributedDataFidelity(ctx, fid, reduction=reduction)
    for prior in obj.prior:
        den = getattr(prior, "denoiser", None)
        if isinstance(den, torch.nn.Module) and not isinstance(den, DistributedProcessing):
            prior.denoiser = DistributedProcessing(ctx, den, **_tiling_options(options))
    params = [p for v in getattr(obj, "params_algo", {}).values() if isinstance(v, torch.nn.ParameterList)
              for p in v]
    if params:  # deepinv attaches its gradient sync of the trainable step sizes here
        obj._deepinv_dist_sync = DistributedReplicatedParameters(ctx, params, average=average)
    return obj


def _denoiser_handler(obj: Any, ctx: DistributedContext, **options: Any) -> DistributedProcessing:
    return DistributedProcessing(ctx, obj, **_tiling_options(options))


def _prior_handler(obj: Any, ctx: DistributedContext, **options: Any) -> DistributedPrior:
    return DistributedPrior(ctx, obj, **_tiling_options(options))


_HANDLERS.update(
    physics=_physics_handler(linear=False),
    linear_physics=_physics_handler(linear=True),
    data_fidelity=_fidelity_handler,
    denoiser=_denoiser_handler,
    prior=_prior_handler,
    parameters=_parameters_handler,
    module=_module_handler,
)
