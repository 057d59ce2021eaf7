"""Denoiser tasks: the model cached per worker, tiles processed in batches, chunks tiled inside."""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from typing import Any

import cloudpickle
import numpy as np
import torch

from daskrecon.planning.strategies import OverlapTilingStrategy
from daskrecon.planning.tiling import default_batch
from daskrecon.tasks.arrays import module_device, to_numpy, to_tensor, worker_device
from daskrecon.tasks.precision import autocast, supported, synchronize

__all__ = ["apply_state", "backward_patches", "forget_model", "get_model", "leaf_gradients", "one_task_at_a_time",
           "precision_probe",
           "process_block", "process_patches", "release_kept", "scaled_grads", "store_model_payload", "to_device", "window_gradients"]


_MODEL_PAYLOADS: dict[str, bytes] = {}
# Workers of this process holding each model's plugin: the workers of a threads-only cluster
# share this module, and one of them leaving must not take the model from the others.
_MODEL_HOLDERS: dict[str, set] = {}
_MODELS: dict[tuple[str, str | None], Any] = {}
_OPTIONS: dict[str, dict] = {}
MODEL_LOADS: dict[str, int] = {}
_MODEL_LOCK = threading.Lock()
# One lock per worker (a threads-only cluster runs several in this process) for the models that
# run one tile task at a time per worker.
_ONE_TASK: dict[str, threading.Lock] = {}


def store_model_payload(key: str, payload: bytes, worker: str | None = None) -> None:
    """Keep a pickled model until the first task on this worker needs it (plugin setup)."""
    with _MODEL_LOCK:
        _MODEL_PAYLOADS[key] = payload
        _MODEL_HOLDERS.setdefault(key, set()).add(worker)


def forget_model(key: str, worker: str | None = None) -> None:
    """Drop ``worker``'s hold on the model; the model goes with the last worker of the process."""
    with _MODEL_LOCK:
        holders = _MODEL_HOLDERS.get(key, set())
        holders.discard(worker)
        if holders:
            return
        _MODEL_HOLDERS.pop(key, None)
        _MODEL_PAYLOADS.pop(key, None)
        _OPTIONS.pop(key, None)
        for k in [k for k in _MODELS if k[0] == key]:
            _MODELS.pop(k, None)


def get_model(key: str, device_mode: str | None, payload: bytes | None = None) -> Any:
    """The model of ``key`` on this worker's device, unpickled once per worker process.

    ``payload``, the pickled model carried by a lazy array's graph, stands in for the
    plugin where it never ran: the array computed on another client's cluster, or after
    ``close()``.
    """
    model = _MODELS.get((key, device_mode))
    if model is None:
        with _MODEL_LOCK:  # several dask threads may ask at once: load once
            model = _MODELS.get((key, device_mode))
            if model is None:
                payload = _MODEL_PAYLOADS.get(key, payload)
                if payload is None:
                    raise RuntimeError(
                        f"model {key} has not reached this worker: its plugin was unregistered "
                        "(DistributedProcessing.close()) or the worker joined without plugins"
                    )
                model, options = cloudpickle.loads(payload)
                _OPTIONS[key] = options
                if isinstance(model, torch.nn.Module):
                    model = model.to(worker_device(device_mode)).eval()
                    if options.get("channels_last") and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
                        # oneDNN and cuDNN convolutions run 20-30 % faster on NHWC tensors
                        model = model.to(memory_format=torch.channels_last)
                        model._daskrecon_channels_last = True
                _MODELS[(key, device_mode)] = model
                MODEL_LOADS[key] = MODEL_LOADS.get(key, 0) + 1
    return model


@contextlib.contextmanager
def one_task_at_a_time(model_key: str):
    """For a model shipped with ``one_task_per_worker``: wait until no other of its tile tasks runs on
    this worker, then run with the torch threads of all the worker's threads (``torch_threads`` ×
    threads, at most the cores), so one tile's activations live at a time for the same arithmetic.
    Otherwise nothing."""
    if not _OPTIONS.get(model_key, {}).get("one_task_per_worker"):
        yield
        return
    try:
        from distributed import get_worker

        worker = get_worker()
        name, threads = worker.address, worker.state.nthreads
    except ValueError:  # not in a worker (a local compute)
        name, threads = "", 1
    with _MODEL_LOCK:
        lock = _ONE_TASK.setdefault(name, threading.Lock())
    with lock:
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, before * threads)))
        try:
            yield
        finally:
            torch.set_num_threads(before)


def apply_state(model: Any, state: dict | None) -> None:
    """Load a parameter version sent by the driver (after an optimizer step), once per worker and version."""
    if state is None or not isinstance(model, torch.nn.Module):
        return
    if getattr(model, "_daskrecon_state_version", None) == state["version"]:
        return
    with _MODEL_LOCK:
        if getattr(model, "_daskrecon_state_version", None) == state["version"]:
            return
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in state["params"]:
                    p.copy_(torch.from_numpy(state["params"][name]).to(p.device))
        model._daskrecon_state_version = state["version"]


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors in ``value`` (nested lists, tuples, dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _run_patches(model: Any, method: str, strategy: Any, xt: torch.Tensor, indices: list[int],
                 max_batch_size: int | None, args: tuple, kwargs: dict,
                 precision: str = "fp32") -> list[tuple[int, torch.Tensor]]:
    """Process some patches: ``max_batch_size`` tiles per network call, in ``precision``.

    Default: one tile per call on the CPU (measured fastest per pixel with oneDNN), all
    of them on a GPU. Outputs come back in the input's type whatever the precision.
    """
    fn = model if method == "__call__" else getattr(model, method)
    args, kwargs = to_device(args, xt.device), to_device(kwargs, xt.device)
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
            with autocast(xt.device, precision):
                out = fn(b, *args, **kwargs)
            outs.append(out.detach().to(xt.dtype).contiguous())
    results = strategy.unpack_batched_results(outs, len(pairs))
    return [(i, strategy.trim_patch(i, r)) for (i, _), r in zip(pairs, results)]


def model_device(model: Any, device_mode: str | None) -> torch.device:
    return module_device(model) if isinstance(model, torch.nn.Module) else worker_device(device_mode)


def process_patches(model_key: str, device_mode: str | None, method: str, strategy: Any, x: np.ndarray,
                    indices: list[int], max_batch_size: int | None, args: tuple, kwargs: dict,
                    state: dict | None = None, keep: dict | None = None,
                    precision: str = "fp32") -> list[tuple[int, np.ndarray]]:
    """Process some patches of an image held by this worker; return ``(index, trimmed output)`` pairs.

    With ``keep`` (a forward whose backward will follow) the network runs with grad
    enabled and each call's graph stays on this worker, under ``keep["id"]``, for
    :func:`backward_patches`.
    """
    model = get_model(model_key, device_mode)
    apply_state(model, state)
    with one_task_at_a_time(model_key):
        xt = to_tensor(x, model_device(model, device_mode))
        if keep is not None:
            return _run_keeping(model, method, strategy, xt, indices, max_batch_size, args, kwargs, keep, precision)
        return [(i, to_numpy(r)) for i, r in _run_patches(model, method, strategy, xt, indices, max_batch_size, args,
                                                          kwargs, precision)]


#: fp16 backward: the loss is multiplied by this before backpropagating, gradients divided after
#: (torch.amp.GradScaler's initial scale); halved while a network call's gradients overflow.
FP16_LOSS_SCALE = 2.0 ** 16


def scaled_grads(loss: torch.Tensor, wrt: list, scale: float) -> list:
    """``∂loss/∂wrt`` (``None`` where unused), through ``loss · scale`` when ``scale > 1`` (fp16).

    fp16's range would flush small gradients to zero: the loss is scaled up, the gradients
    divided after (a power of two: exact). Where the scaled gradients overflow, the scale is
    halved and the same graph backpropagated again (torch.amp.GradScaler's back-off, per network
    call instead of per step, so no step is skipped and the result does not depend on which
    worker ran which tiles). Overflowing even unscaled means fp16's range is too small for the
    network: :class:`FloatingPointError`.
    """
    if not wrt:
        return []
    if scale == 1.0:
        return list(torch.autograd.grad(loss, wrt, allow_unused=True))
    while True:
        grads = torch.autograd.grad(loss * scale, wrt, allow_unused=True, retain_graph=scale > 1.0)
        grads = [None if g is None else g / scale for g in grads]
        if all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            return grads
        if scale <= 1.0:
            raise FloatingPointError("the fp16 backward overflows even with no loss scale: train in "
                                     "precision='bf16' (fp32's range) or 'fp32'")
        scale = max(scale / 2.0, 1.0)

# Graphs of forwards whose backward is pending: call id -> {tile indices of a task: entry}.
_KEPT: dict[str, dict[tuple, dict]] = {}


async def release_kept(call_id: str) -> None:
    """Forget a forward's kept graphs on this worker (its backward ran, or never will).

    A coroutine: run on the worker's event loop by a fire-and-forget ``client.run``.
    """
    _KEPT.pop(call_id, None)


def _calls(pairs: list, per_call: int) -> list[list]:
    return [pairs[s:s + per_call] for s in range(0, len(pairs), per_call)]


def _network_call(model: Any, fn: Any, group: list, args: tuple, kwargs: dict, need_x: bool,
                  precision: str = "fp32") -> tuple:
    """One network call on a group of windows; ``(input batch, output)`` with the graph between them.

    In a reduced precision the output is cast back to the input's type inside the graph:
    gradients reach the fp32 weights (the master copy) and the fp32 input through the cast.
    """
    b = torch.cat([p for _, p in group], dim=0).detach()
    if getattr(model, "_daskrecon_channels_last", False) and b.dim() == 4:
        b = b.contiguous(memory_format=torch.channels_last)
    b.requires_grad_(need_x)
    with autocast(b.device, precision):
        out = fn(b, *args, **kwargs)
    return b, out.to(b.dtype)


def _run_keeping(model: Any, method: str, strategy: Any, xt: torch.Tensor, indices: list[int],
                 max_batch_size: int | None, args: tuple, kwargs: dict, keep: dict,
                 precision: str = "fp32") -> list[tuple[int, np.ndarray]]:
    dev = xt.device
    args, kwargs, arg_leaves = _with_leaves(args, kwargs, keep["paths"], dev)
    named = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else {}
    for n in keep["params"]:
        named[n].requires_grad_(True)
    fn = model if method == "__call__" else getattr(model, method)
    pairs = strategy.get_local_patches(xt, indices)
    per_call = max_batch_size or (len(pairs) if dev.type == "cuda" else 1)
    calls, results = [], []
    with torch.enable_grad():
        for group in _calls(pairs, per_call):
            b, out = _network_call(model, fn, group, args, kwargs, keep["need_x"], precision)
            trimmed = [(i, strategy.trim_patch(i, o)) for (i, _), o in zip(group, out.split(group[0][1].shape[0], dim=0))]
            calls.append((group, b, trimmed))
            results += [(i, to_numpy(t.contiguous())) for i, t in trimmed]
    _KEPT.setdefault(keep["id"], {})[tuple(indices)] = {"calls": calls, "arg_leaves": arg_leaves}
    return results


def process_block(block: np.ndarray, model_key: str, device_mode: str | None, method: str, tiling: dict,
                  max_batch_size: int | None, args: tuple, kwargs: dict, payload: bytes | None = None,
                  state: dict | None = None, precision: str = "fp32") -> np.ndarray:
    """``map_overlap`` function: exact overlap tiling of one (halo-extended) block, the network in ``precision``."""
    model = get_model(model_key, device_mode, payload)
    apply_state(model, state)
    strategy = OverlapTilingStrategy(block.shape, **tiling)
    per_batch = max_batch_size or default_batch(strategy.get_num_patches(), int(np.prod(strategy.window_shape())),
                                                target_tasks=1)
    with one_task_at_a_time(model_key):
        xt = to_tensor(block, model_device(model, device_mode))
        out = torch.zeros_like(xt)
        for indices in strategy.batches(per_batch):
            strategy.reduce_patches(out, _run_patches(model, method, strategy, xt, indices, max_batch_size, args,
                                                      kwargs, precision))
        return to_numpy(out).astype(block.dtype, copy=False)


def _with_leaves(args: tuple, kwargs: dict, paths: list, device: torch.device) -> tuple[tuple, dict, list]:
    """Arguments on ``device``, those at ``paths`` made leaves that require grad."""
    args, kwargs = list(to_device(args, device)), to_device(kwargs, device)
    leaves = []
    for kind, key in paths:
        holder = args if kind == "arg" else kwargs
        holder[key] = holder[key].detach().clone().requires_grad_(True)
        leaves.append(holder[key])
    return tuple(args), kwargs, leaves


def backward_patches(model_key: str, device_mode: str | None, method: str, strategy: Any, x: np.ndarray,
                     grad_out: np.ndarray, indices: list[int], max_batch_size: int | None, args: tuple, kwargs: dict,
                     state: dict | None, params: list[str], paths: list, need_x: bool, kept: str | None = None,
                     precision: str = "fp32") -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
    """Backward of some tiles: ``(index, window gradient)`` pairs and the flat gradient of the parameters and arguments.

    The flat vector ends with one flag per parameter/argument: 1 where the network used it.

    The graphs the forward kept here under ``kept`` are backpropagated; where they are not
    here (recomputation asked for, or the forward ran on a worker since lost) the tiles are
    recomputed with grad enabled, one network call at a time (the same calls as the
    forward: ``max_batch_size`` tiles, or one on the CPU), each call's activations freed
    before the next. Each call is backpropagated from the output cotangent of the cores it
    contributes; gradients of the calls add up in call order.

    In ``precision="fp16"`` the loss is scaled by :data:`FP16_LOSS_SCALE` before the backward
    and the gradients unscaled after (fp16's range would flush small gradients to zero), the
    scale halved while a call's gradients overflow (:func:`scaled_grads`). bf16 has fp32's
    range and needs no scale.
    """
    model = get_model(model_key, device_mode)
    apply_state(model, state)
    with one_task_at_a_time(model_key):  # a backward holds a tile's activations too
        return _backward_patches(model, device_mode, method, strategy, x, grad_out, indices, max_batch_size, args,
                                 kwargs, params, paths, need_x, kept, precision)


def _backward_patches(model: Any, device_mode: str | None, method: str, strategy: Any, x: np.ndarray,
                      grad_out: np.ndarray, indices: list[int], max_batch_size: int | None, args: tuple, kwargs: dict,
                      params: list[str], paths: list, need_x: bool, kept: str | None,
                      precision: str) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
    dev = model_device(model, device_mode)
    xt, gt = to_tensor(x, dev), to_tensor(grad_out, dev)
    named = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else {}
    entry = _KEPT.get(kept, {}).pop(tuple(indices), None) if kept else None
    if entry is not None:
        arg_leaves, calls = entry["arg_leaves"], entry["calls"]
    else:
        args, kwargs, arg_leaves = _with_leaves(args, kwargs, paths, dev)
        fn = model if method == "__call__" else getattr(model, method)
        pairs = strategy.get_local_patches(xt, indices)
        per_call = max_batch_size or (len(pairs) if xt.device.type == "cuda" else 1)
        calls = _calls(pairs, per_call)  # recomputed one at a time below
    leaves = [named[n].requires_grad_(True) for n in params] + arg_leaves
    cotangents = dict(strategy.patch_cotangents(gt, indices))
    totals = [torch.zeros_like(t) for t in leaves]
    used = torch.zeros(len(leaves), dtype=xt.dtype)
    windows = []
    while calls:
        call = calls.pop(0)  # dropped as soon as it is backpropagated
        with torch.enable_grad():
            if entry is not None:
                group, b, trimmed = call
            else:
                group = call
                b, out = _network_call(model, fn, group, args, kwargs, need_x, precision)
                trimmed = [(i, strategy.trim_patch(i, o)) for (i, _), o in zip(group, out.split(group[0][1].shape[0], dim=0))]
            loss = sum((t * cotangents[i]).sum() for i, t in trimmed)
            wrt = ([b] if need_x else []) + leaves
            grads = scaled_grads(loss, wrt, FP16_LOSS_SCALE if precision == "fp16" else 1.0)
        if need_x:
            gb, grads = grads[0], grads[1:]
            windows += [(i, to_numpy(w.contiguous())) for (i, _), w in zip(group, gb.split(group[0][1].shape[0], dim=0))]
        for k, (t, gr) in enumerate(zip(totals, grads)):
            if gr is not None:
                t.add_(gr)
                used[k] = 1
    # one flag per leaf after the gradients: summed over batches, zero means "not used" (None, as torch says)
    flat = torch.cat([t.reshape(-1).cpu() for t in totals] + [used])
    return windows, to_numpy(flat)


def window_gradients(result: tuple) -> list[tuple[int, np.ndarray]]:
    """The window gradients of a :func:`backward_patches` result."""
    return result[0]


def leaf_gradients(result: tuple) -> np.ndarray:
    """The flat parameter/argument gradient of a :func:`backward_patches` result."""
    return result[1]


def precision_probe(model_key: str, device_mode: str | None, method: str, window: np.ndarray, args: tuple,
                    kwargs: dict, candidates: list[str], repeats: int = 3) -> dict[str, dict[str, float]]:
    """The network on ``window`` in fp32 and in each of ``candidates`` this worker's device runs in hardware.

    Returns ``{precision: {"seconds": median of repeats, "max_error": …, "rel_error": …}}``,
    errors against fp32 (computed in float64). The first call of each precision warms up and
    is not timed; ``repeats=0``: that one call only, its time reported (what an asked-for
    precision needs: the error, not a timing — half the cost or less).
    """
    model = get_model(model_key, device_mode)
    dev = model_device(model, device_mode)
    xt = to_tensor(window, dev)
    if getattr(model, "_daskrecon_channels_last", False) and xt.dim() == 4:
        xt = xt.contiguous(memory_format=torch.channels_last)
    fn = model if method == "__call__" else getattr(model, method)
    args, kwargs = to_device(args, dev), to_device(kwargs, dev)
    native = supported(dev)
    outputs, report = {}, {}
    for p in ["fp32"] + [c for c in candidates if c in native]:
        times = []
        with torch.no_grad():
            for k in range(repeats + 1):
                synchronize(dev)
                t0 = time.perf_counter()
                with autocast(dev, p):
                    out = fn(xt, *args, **kwargs)
                out = out.to(xt.dtype)
                synchronize(dev)
                if k or not repeats:
                    times.append(time.perf_counter() - t0)
        outputs[p] = out.double()
        ref = outputs["fp32"]
        diff = outputs[p] - ref
        report[p] = {"seconds": statistics.median(times), "max_error": float(diff.abs().max()),
                     "rel_error": float(diff.norm() / ref.norm()) if float(ref.norm()) > 0 else float(diff.norm())}
    return report
