"""The per-worker registry of operators and data fidelities (see :mod:`daskrecon.runtime.placement`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import cloudpickle
import torch

from daskrecon.tasks.arrays import worker_device
from daskrecon.tasks.substitutes import specialize

__all__ = ["build_object", "forget_objects", "held_objects", "object_builds", "obtain", "on_objects", "running_keys",
           "task_states"]


def build_object(
    source: Any,
    index: int,
    factory_kwargs: dict | None,
    device_mode: str | None,
    fast: bool = False,
    updates: tuple = (),
) -> Any:
    """Build (or receive) the object of one operator index on this worker.

    ``source`` is either the object itself (unpickled once, here) or a factory
    ``factory(index, device, factory_kwargs)`` in deepinv's convention. ``updates`` are the
    ``(method, kwargs, indices)`` calls made on the stack since (deepinv's ``update`` /
    ``update_parameters``), replayed in order on what a factory builds (an object given as such
    was updated on the driver before it was pickled). With ``fast=True`` a known faster equivalent
    is substituted (:func:`daskrecon.tasks.substitutes.specialize`).
    """
    device = worker_device(device_mode)
    if isinstance(source, torch.nn.Module):
        obj = source
    elif callable(source):
        obj = source(index, device, factory_kwargs)
        for method, kwargs, indices in updates:
            if indices is None or index in indices:
                getattr(obj, method)(**kwargs)
    else:
        obj = source
    if isinstance(obj, torch.nn.Module):
        obj = obj.to(device)
        obj.eval()
    if fast:
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
    the task waiting for ever (see :mod:`daskrecon.runtime.waiting`).
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


def running_keys(dask_worker: Any = None) -> list:
    """The keys this worker's threads are running now, cancelled ones included (they run to their end)."""
    state = dask_worker.state
    return [ts.key for ts in (*state.executing, *state.long_running)]
