"""Code that runs inside Dask tasks, on the workers.

Everything here is a module-level function, so a task pickles as a reference to it
plus its (small or array) arguments. Operators, fidelities and models are built once
per worker by a *build* task and then live in worker memory as that task's result;
compute tasks receive them as dependencies and exchange only numpy arrays (dask's
memory accounting understands numpy, not torch: see the engineering notes §2.6).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from dask.sizeof import sizeof

__all__ = [
    "build_object",
    "forward_op",
    "sum_arrays",
    "worker_device",
]


@sizeof.register(torch.Tensor)
def _sizeof_tensor(t: torch.Tensor) -> int:
    return t.element_size() * t.nelement()


@sizeof.register(torch.nn.Module)
def _sizeof_module(m: torch.nn.Module) -> int:
    tensors = list(m.parameters()) + list(m.buffers())
    return 1000 + sum(t.element_size() * t.nelement() for t in tensors)


# --------------------------------------------------------------------- devices, arrays
def worker_device(device_mode: str | None) -> torch.device:
    """The device this worker computes on: its (first visible) GPU unless told "cpu"."""
    if device_mode != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def module_device(obj: Any) -> torch.device:
    """Device of a module's first buffer or parameter (cpu when it has none)."""
    if isinstance(obj, torch.nn.Module):
        for t in obj.buffers():
            return t.device
        for t in obj.parameters():
            return t.device
    return torch.device("cpu")


def to_tensor(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().resolve_conj().cpu().numpy()


def set_torch_threads(n: int) -> None:
    """Bound torch's intra-op threads in this worker process (called by the plugin)."""
    torch.set_num_threads(max(1, int(n)))
    os.environ["DASKRECON_TORCH_THREADS"] = str(n)


# --------------------------------------------------------------------- building objects
def build_object(
    source: Any,
    index: int,
    factory_kwargs: dict | None,
    device_mode: str | None,
    fast: bool = False,
) -> Any:
    """Build (or receive) the object of one operator index on this worker.

    ``source`` is either the object itself (unpickled once, here) or a factory
    ``factory(index, device, factory_kwargs)`` in deepinv's convention. With
    ``fast=True`` a known faster equivalent is substituted
    (:func:`daskrecon.operators.specialize`).
    """
    device = worker_device(device_mode)
    if isinstance(source, torch.nn.Module):
        obj = source
    elif callable(source):
        obj = source(index, device, factory_kwargs)
    else:
        obj = source
    if isinstance(obj, torch.nn.Module):
        obj = obj.to(device)
        obj.eval()
    if fast:
        from daskrecon.operators import specialize

        obj = specialize(obj)
    return obj


# Objects (operators, data fidelities) built on this worker, by (worker, token, slot). They are
# never task results, so Dask never serializes them: a task that needs one finds it here, or
# builds it here from its source (pickled bytes, which any worker can fetch), so an operator
# never travels between workers (many deepinv objects cannot be pickled once used). Keyed by
# worker too, since the workers of a threads-only cluster share this module.
_OBJECTS: dict[tuple[str | None, str, int], Any] = {}
_OBJECT_LOCKS: dict[tuple[str | None, str, int], threading.Lock] = {}
_REGISTRY_LOCK = threading.Lock()
#: (worker, token, slot) -> times built in this process (read by tests and diagnostics).
BUILDS: dict[tuple[str | None, str, int], int] = {}


def _here() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:  # not inside a worker (local scheduler)
        return None


def obtain(token: str, slot: int, owner: str | None, source: bytes) -> Any:
    """The object ``(token, slot)`` on this worker: cached, or built from ``source``.

    It is cached only on its ``owner``; a task that runs elsewhere (its owner left) builds
    a private copy, so that workers do not accumulate copies of others' operators.
    """
    here = _here()
    key = (here, token, slot)
    obj = _OBJECTS.get(key)
    if obj is not None:
        return obj
    with _REGISTRY_LOCK:
        lock = _OBJECT_LOCKS.setdefault(key, threading.Lock())
    with lock:  # several dask threads may ask at once: build once
        obj = _OBJECTS.get(key)
        if obj is None:
            import cloudpickle

            obj = build_object(**cloudpickle.loads(source))
            BUILDS[key] = BUILDS.get(key, 0) + 1
            if owner is None or here is None or here == owner:
                _OBJECTS[key] = obj
    return obj


def on_objects(fn: Callable, owner: str | None, refs: list[tuple[str, int, bytes]], *args: Any) -> Any:
    """Task: ``fn(*objects, *args)``, the objects taken from this worker's registry (see :func:`obtain`)."""
    return fn(*[obtain(token, slot, owner, src) for token, slot, src in refs], *args)


async def forget_objects(token: str, slots: list[int] | None = None, dask_worker: Any = None) -> int:
    """Drop this worker's objects of ``token`` (all, or ``slots``); run with ``client.run``.

    A coroutine, so that drivers can send it without waiting (``client.run(..., wait=False)``).
    """
    here = getattr(dask_worker, "address", None)
    keys = [k for k in list(_OBJECTS) if k[0] == here and k[1] == token and (slots is None or k[2] in slots)]
    for k in keys:
        _OBJECTS.pop(k, None)
        _OBJECT_LOCKS.pop(k, None)
    return len(keys)


def held_objects(token: str | None = None, dask_worker: Any = None) -> list[tuple[str, int]]:
    """``(token, slot)`` of the objects this worker holds; run with ``client.run``."""
    here = getattr(dask_worker, "address", None)
    return sorted(k[1:] for k in _OBJECTS if k[0] == here and (token is None or k[1] == token))


def object_builds(token: str | None = None, dask_worker: Any = None) -> dict[int, int]:
    """``{slot: times built}`` on this worker (for ``token``); run with ``client.run``."""
    here = getattr(dask_worker, "address", None)
    return {k[2]: n for k, n in BUILDS.items() if k[0] == here and (token is None or k[1] == token)}


def task_states(keys: list, dask_worker: Any = None) -> dict:
    """This worker's view of some tasks: ``{key: (state, {input: reason} of inputs in error)}``.

    An input in the ``error`` state is one this worker failed to fetch: distributed keeps
    the task waiting for ever (see :mod:`daskrecon.waiting`).
    """
    out: dict = {}
    tasks = dask_worker.state.tasks
    for key in keys:
        ts = tasks.get(key)
        if ts is None:
            out[key] = None
            continue
        failed = {d.key: (getattr(d, "exception_text", "") or "") for d in ts.dependencies if d.state == "error"}
        out[key] = (ts.state, failed)
    return out


def place_array(a: np.ndarray) -> np.ndarray:
    """Identity task: keeps an array in worker memory with a recomputable lineage."""
    return a


def build_measurement(factory: Callable, index: int, shared: Any, device_mode: str | None) -> np.ndarray:
    """Run a measurement factory ``factory(index, device, shared)`` on the worker."""
    y = factory(index, worker_device(device_mode), shared)
    return to_numpy(torch.as_tensor(y))


# --------------------------------------------------------------------- per-operator tasks
@contextlib.contextmanager
def _seeded(seed: int | None):
    """Draw from ``seed`` inside the block, leaving the worker's global RNG as it was."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def forward_op(op: torch.nn.Module, x: np.ndarray, kwargs: dict, seed: int | None, noise: bool) -> np.ndarray:
    """``A_i(x)`` (``noise=False``) or ``forward_i(x)`` with noise drawn from ``seed``."""
    dev = module_device(op)
    with torch.no_grad(), _seeded(seed):
        xt = to_tensor(x, dev)
        out = op.forward(xt, **kwargs) if noise else op.A(xt, **kwargs)
    return to_numpy(out)


def adjoint_op(op: torch.nn.Module, y: np.ndarray, kwargs: dict) -> np.ndarray:
    """``A_iᵀ y_i``."""
    dev = module_device(op)
    with torch.no_grad():
        return to_numpy(op.A_adjoint(to_tensor(y, dev), **kwargs))


def vjp_op(op: torch.nn.Module, x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(∂A_i/∂x)ᵀ v_i``; by autograd when the operator is not linear."""
    dev = module_device(op)
    xt, vt = to_tensor(x, dev), to_tensor(v, dev)
    with torch.enable_grad():
        return to_numpy(op.A_vjp(xt, vt))


def adjoint_A_op(op: torch.nn.Module, x: np.ndarray, kwargs: dict) -> np.ndarray:
    """``A_iᵀ A_i x``."""
    dev = module_device(op)
    with torch.no_grad():
        return to_numpy(op.A_adjoint_A(to_tensor(x, dev), **kwargs))


def sqnorm_op(op: torch.nn.Module, x0: np.ndarray, max_iter: int, tol: float) -> float:
    """``‖A_i‖²`` by the operator's own power method."""
    dev = module_device(op)
    with torch.no_grad():
        out = op.compute_sqnorm(to_tensor(x0, dev), max_iter=max_iter, tol=tol, verbose=False)
    return float(out)


def dagger_op(op: torch.nn.Module, y: np.ndarray, kwargs: dict) -> np.ndarray:
    """``A_i^† y_i`` by the operator's own pseudo-inverse.

    Solver options are passed only where the operator's ``A_dagger`` names them (a
    closed-form pseudo-inverse such as ``BlurFFT``'s takes none).
    """
    named = inspect.signature(op.A_dagger).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in named}
    dev = module_device(op)
    with torch.no_grad():
        return to_numpy(op.A_dagger(to_tensor(y, dev), **kwargs))


def _uses_chain_rule(fidelity: Any) -> bool:
    from deepinv.optim.data_fidelity import L2, DataFidelity

    return type(fidelity).grad in (DataFidelity.grad, L2.grad)


def _check_measurement(index: int, ax: torch.Tensor, y: torch.Tensor) -> None:
    if tuple(ax.shape) != tuple(y.shape):
        from daskrecon.errors import ShapeError

        raise ShapeError(
            f"y[{index}] has shape {tuple(y.shape)} but operator {index} maps x to shape {tuple(ax.shape)}; "
            "check the image shape and that y is in operator order"
        )


def _grad_and_value(op: torch.nn.Module, fidelity: Any, x: np.ndarray, y: np.ndarray, index: int, kwargs: dict,
                    value: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    dev = module_device(op)
    xt, yt = to_tensor(x, dev), to_tensor(y, dev)
    v = None
    if _uses_chain_rule(fidelity):
        with torch.no_grad():
            ax = op.A(xt)
            _check_measurement(index, ax, yt)
            g = fidelity.d.grad(ax, yt, **kwargs)
            if value:
                v = fidelity.d(ax, yt, **kwargs).sum()
        with torch.enable_grad():
            out = op.A_vjp(xt, g)
    else:
        with torch.enable_grad():
            out = fidelity.grad(xt, yt, op, **kwargs)
        if value:
            with torch.no_grad():
                v = torch.as_tensor(fidelity.fn(xt, yt, op, **kwargs)).sum()
    return out, v


def fidelity_grad_op(
    op: torch.nn.Module, fidelity: Any, x: np.ndarray, y: np.ndarray, index: int, kwargs: dict
) -> np.ndarray:
    """``∇_x d_i(A_i x, y_i) = (∂A_i/∂x)ᵀ ∇d_i(A_i x, y_i)``.

    For fidelities whose gradient is the chain rule (``L2``, any plain ``DataFidelity``)
    this costs one ``A`` and one ``A_vjp``, not ``L2.grad``'s ``AᵀA x − Aᵀ y`` (one
    more operator pass); other fidelities use their own ``grad``.
    """
    return to_numpy(_grad_and_value(op, fidelity, x, y, index, kwargs, value=False)[0])


def fidelity_grad_value_op(
    op: torch.nn.Module, fidelity: Any, x: np.ndarray, y: np.ndarray, index: int, kwargs: dict
) -> np.ndarray:
    """``[∇_x d_i(A_i x, y_i).ravel(), d_i(A_i x, y_i)]``: the gradient and the value in one pass.

    For chain-rule fidelities the value comes from the ``A_i x`` the gradient needs anyway.
    Summing these arrays sums gradients and values alike (the value is the last entry).
    """
    out, v = _grad_and_value(op, fidelity, x, y, index, kwargs, value=True)
    flat = to_numpy(out).ravel()
    return np.concatenate([flat, np.asarray([float(v)], dtype=flat.dtype)])


def step_from_gradient(x: np.ndarray, grad_value: np.ndarray, tau: float, scale: float) -> np.ndarray:
    """``x − τ · scale · ∇f`` from a summed :func:`fidelity_grad_value_op` result."""
    g = grad_value[:-1].reshape(x.shape)
    if scale != 1.0:
        g = g * np.asarray(scale, dtype=g.dtype)
    return x - np.asarray(tau, dtype=x.dtype) * g


def last_value(grad_value: np.ndarray, scale: float = 1.0) -> float:
    """``f`` from a summed :func:`fidelity_grad_value_op` result."""
    return float(grad_value[-1]) * scale


def fidelity_fn_op(
    op: torch.nn.Module, fidelity: Any, x: np.ndarray, y: np.ndarray, index: int, kwargs: dict
) -> np.ndarray:
    """``d_i(A_i x, y_i)`` per batch element."""
    dev = module_device(op)
    from deepinv.optim.data_fidelity import DataFidelity

    with torch.no_grad():
        xt, yt = to_tensor(x, dev), to_tensor(y, dev)
        if type(fidelity).fn is DataFidelity.fn:
            ax = op.A(xt)
            _check_measurement(index, ax, yt)
            out = fidelity.d(ax, yt, **kwargs)
        else:
            out = fidelity.fn(xt, yt, op, **kwargs)
    return to_numpy(torch.as_tensor(out))


# --------------------------------------------------------------------- reductions
def sum_arrays(*arrays: np.ndarray) -> np.ndarray:
    """Sum in argument order (fixed order = bitwise reproducible)."""
    out = np.array(arrays[0], copy=True)
    for a in arrays[1:]:
        if a.shape != out.shape:
            raise ValueError(
                f"cannot sum per-operator results of shapes {out.shape} and {a.shape}: "
                "reduce_op='sum'/'mean' needs operators with equal output shapes"
            )
        out += a
    return out


def scale_array(a: np.ndarray, factor: float) -> np.ndarray:
    """``factor · a``, keeping ``a``'s dtype."""
    return a * np.asarray(factor, dtype=a.dtype)


def describe(obj: Any) -> dict:
    """What the driver needs to know about a built operator."""
    from deepinv.physics import LinearPhysics

    return {"linear": isinstance(obj, LinearPhysics), "type": type(getattr(obj, "op", obj)).__name__}


def local_form_of(op: Any) -> Any:
    """The chunk-wise form of an operator built on this worker (:mod:`daskrecon.local`)."""
    from daskrecon.local import local_form

    return local_form(op)


# --------------------------------------------------------------------- models and tiles
_MODEL_PAYLOADS: dict[str, bytes] = {}
_MODELS: dict[tuple[str, str | None], Any] = {}
MODEL_LOADS: dict[str, int] = {}
_MODEL_LOCK = threading.Lock()


def store_model_payload(key: str, payload: bytes) -> None:
    """Keep a pickled model until the first task on this worker needs it (plugin setup)."""
    _MODEL_PAYLOADS[key] = payload


def forget_model(key: str) -> None:
    _MODEL_PAYLOADS.pop(key, None)
    for k in [k for k in _MODELS if k[0] == key]:
        _MODELS.pop(k, None)


def get_model(key: str, device_mode: str | None) -> Any:
    """The model of ``key`` on this worker's device, unpickled once per worker process."""
    model = _MODELS.get((key, device_mode))
    if model is None:
        with _MODEL_LOCK:  # several dask threads may ask at once: load once
            model = _MODELS.get((key, device_mode))
            if model is None:
                payload = _MODEL_PAYLOADS.get(key)
                if payload is None:
                    raise RuntimeError(
                        f"model {key} has not reached this worker: its plugin was unregistered "
                        "(DistributedProcessing.close()) or the worker joined without plugins"
                    )
                import cloudpickle

                model, options = cloudpickle.loads(payload)
                if isinstance(model, torch.nn.Module):
                    model = model.to(worker_device(device_mode)).eval()
                    if options.get("channels_last") and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
                        # oneDNN and cuDNN convolutions run 20-30 % faster on NHWC tensors
                        model = model.to(memory_format=torch.channels_last)
                        model._daskrecon_channels_last = True
                _MODELS[(key, device_mode)] = model
                MODEL_LOADS[key] = MODEL_LOADS.get(key, 0) + 1
    return model


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _run_patches(model: Any, method: str, strategy: Any, xt: torch.Tensor, indices: list[int],
                 max_batch_size: int | None, args: tuple, kwargs: dict) -> list[tuple[int, torch.Tensor]]:
    """Process some patches: ``max_batch_size`` tiles per network call.

    Default: one tile per call on the CPU (measured fastest per pixel with oneDNN), all
    of them on a GPU.
    """
    fn = model if method == "__call__" else getattr(model, method)
    args, kwargs = _to_device(args, xt.device), _to_device(kwargs, xt.device)
    pairs = strategy.get_local_patches(xt, indices)
    per_call = max_batch_size or (len(pairs) if xt.device.type == "cuda" else 1)
    batches = strategy.apply_batching([p for _, p in pairs], per_call)
    nhwc = getattr(model, "_daskrecon_channels_last", False)
    grad = torch.enable_grad() if method == "grad" else torch.no_grad()
    with grad:
        outs = []
        for b in batches:
            if nhwc and b.dim() == 4:
                b = b.contiguous(memory_format=torch.channels_last)
            outs.append(fn(b, *args, **kwargs).detach().contiguous())
    results = strategy.unpack_batched_results(outs, len(pairs))
    return [(i, strategy.trim_patch(i, r)) for (i, _), r in zip(pairs, results)]


def model_device(model: Any, device_mode: str | None) -> torch.device:
    return module_device(model) if isinstance(model, torch.nn.Module) else worker_device(device_mode)


def process_patches(model_key: str, device_mode: str | None, method: str, strategy: Any, x: np.ndarray,
                    indices: list[int], max_batch_size: int | None, args: tuple, kwargs: dict) -> list[tuple[int, np.ndarray]]:
    """Process some patches of an image held by this worker; return ``(index, trimmed output)`` pairs."""
    model = get_model(model_key, device_mode)
    xt = to_tensor(x, model_device(model, device_mode))
    return [(i, to_numpy(r)) for i, r in _run_patches(model, method, strategy, xt, indices, max_batch_size, args, kwargs)]


def process_block(block: np.ndarray, model_key: str, device_mode: str | None, method: str, tiling: dict,
                  max_batch_size: int | None, args: tuple, kwargs: dict) -> np.ndarray:
    """``map_overlap`` function: exact overlap tiling of one (halo-extended) block."""
    from daskrecon.strategies import OverlapTilingStrategy
    from daskrecon.tiling import default_batch

    model = get_model(model_key, device_mode)
    strategy = OverlapTilingStrategy(block.shape, **tiling)
    per_batch = max_batch_size or default_batch(strategy.get_num_patches(), int(np.prod(strategy.window_shape())),
                                                target_tasks=1)
    xt = to_tensor(block, model_device(model, device_mode))
    out = torch.zeros_like(xt)
    for indices in strategy.batches(per_batch):
        strategy.reduce_patches(out, _run_patches(model, method, strategy, xt, indices, max_batch_size, args, kwargs))
    return to_numpy(out).astype(block.dtype, copy=False)


# --------------------------------------------------------------------- chunk-wise local operators
# A chunk arrives from ``map_overlap`` with a halo of ``radius`` on the sides that face another
# chunk (all sides when the boundary is periodic). The sides on the image border get the
# operator's own padding here, with torch's modes, so a chunk sees exactly the values the
# whole-image operator sees (dask's "reflect" is numpy's "symmetric", not torch's "reflect").
def _border_sides(block_id: tuple[int, ...] | None, nblocks: tuple[int, int], periodic: bool) -> tuple[bool, ...]:
    """(top, bottom, left, right): which sides of the chunk lie on the image border."""
    if periodic or block_id is None:
        return (False,) * 4
    i, j = block_id[-2], block_id[-1]
    return (i == 0, i == nblocks[0] - 1, j == 0, j == nblocks[1] - 1)


def _pad_border(t: torch.Tensor, radius: tuple[int, int], border: tuple[bool, ...], padding: str) -> torch.Tensor:
    dh, dw = radius
    pad = (dw * border[2], dw * border[3], dh * border[0], dh * border[1])
    if not any(pad):
        return t
    mode = "constant" if padding in ("zeros", "constant") else padding
    return torch.nn.functional.pad(t, pad, mode=mode, value=0.0) if mode == "constant" else \
        torch.nn.functional.pad(t, pad, mode=mode)


def _conv_window(t: torch.Tensor, filt: torch.Tensor, radius: tuple[int, int], border: tuple[bool, ...],
                 padding: str, factor: int) -> torch.Tensor:
    """deepinv's padded ``conv2d`` (then ``[::f, ::f]``) on a window with its halo."""
    from deepinv.physics.functional import conv2d

    t = _pad_border(t, radius, border, padding)
    h, w = filt.shape[-2:]
    # deepinv pads (ph - ih) before and ph after; the halo is ph on each side.
    t = t[..., (h - 1) % 2:, (w - 1) % 2:]
    out = conv2d(t, filt, padding="valid")
    return out[..., ::factor, ::factor] if factor > 1 else out


def local_forward_block(block: np.ndarray, filt: np.ndarray, padding: str, radius: tuple[int, int], factor: int,
                        nblocks: tuple[int, int], block_id: tuple[int, ...] | None = None) -> np.ndarray:
    """``A`` of a padded convolution on one chunk (with its halo) → that chunk of ``y``."""
    periodic = padding == "circular"
    t = torch.from_numpy(np.ascontiguousarray(block))
    border = _border_sides(block_id, nblocks, periodic)
    with torch.no_grad():
        out = _conv_window(t, torch.from_numpy(filt).to(t.dtype), radius, border, padding, factor)
    return out.numpy()


def local_adjoint_block(block: np.ndarray, filt: np.ndarray, padding: str, radius: tuple[int, int], factor: int,
                        nblocks: tuple[int, int], block_id: tuple[int, ...] | None = None) -> np.ndarray:
    """``Aᵀ`` on one chunk of ``y`` (with a halo of ``ceil(radius / factor)``) → that chunk of ``x``.

    The adjoint is the vector-Jacobian product of :func:`local_forward_block` over the
    window of ``x`` that the halo'd ``y`` chunk depends on: exact for a linear map, and the
    same padding semantics as the forward by construction.
    """
    periodic = padding == "circular"
    yt = torch.from_numpy(np.ascontiguousarray(block))
    border = _border_sides(block_id, nblocks, periodic)
    (dh, dw), f = radius, factor
    hy, hw = -(-dh // f), -(-dw // f)
    inner = [not b for b in border]  # sides that carry a halo
    shape = (*yt.shape[:-2], f * yt.shape[-2] + dh * (inner[0] + inner[1]), f * yt.shape[-1] + dw * (inner[2] + inner[3]))
    xw = torch.zeros(shape, dtype=yt.dtype, requires_grad=True)
    with torch.enable_grad():
        out = _conv_window(xw, torch.from_numpy(filt).to(yt.dtype), radius, border, padding, f)
        (g,) = torch.autograd.grad(out, xw, grad_outputs=yt)
    top = (dh + f * hy) * inner[0]
    left = (dw + f * hw) * inner[2]
    core_h = f * (yt.shape[-2] - hy * (inner[0] + inner[1]))
    core_w = f * (yt.shape[-1] - hw * (inner[2] + inner[3]))
    return g[..., top:top + core_h, left:left + core_w].contiguous().numpy()


def pointwise_grad_block(u: np.ndarray, y: np.ndarray, distance: Any) -> np.ndarray:
    """``∇_u d(u, y)`` of a separable distance on one chunk."""
    with torch.no_grad():
        return distance.grad(torch.from_numpy(np.ascontiguousarray(u)), torch.from_numpy(np.ascontiguousarray(y))).numpy()


def pointwise_value_block(u: np.ndarray, y: np.ndarray, distance: Any) -> np.ndarray:
    """``d(u, y)`` of a separable distance on one chunk, per batch element: shape ``(B, 1, …, 1)``."""
    with torch.no_grad():
        v = distance.fn(torch.from_numpy(np.ascontiguousarray(u)), torch.from_numpy(np.ascontiguousarray(y)))
    return v.double().numpy().reshape((u.shape[0],) + (1,) * (u.ndim - 1))
