"""A model shipped to the workers once: pickled on the driver, delivered by a worker plugin.

The plugin reaches every worker, present and future (one that joins or restarts gets it too);
each worker unpickles the model in the first task that needs it and caches it on its device
(:mod:`daskrecon.tasks.denoising`), so tasks carry only the model's key. A lazy array handed
to a user carries the pickled model as one graph key instead (:attr:`ModelShipment.payload`),
so it computes on any client, also after :meth:`ModelShipment.close`. When the parameters
change on the driver (an optimizer step), :meth:`ModelShipment.state` places the new values
on the cluster once per version; tasks name that key and each worker loads it into its copy.
"""

from __future__ import annotations

import uuid
from typing import Any

import cloudpickle
import dask
import torch
from distributed import Future
from distributed.diagnostics.plugin import WorkerPlugin

from daskrecon.planning.fingerprint import fingerprint
from daskrecon.runtime.arrays import place, usable
from daskrecon.runtime.waiting import bounded
from daskrecon.tasks import denoising as denoising_tasks

__all__ = ["ModelShipment", "module_of", "param_dtype"]


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


def module_of(processor: Any) -> torch.nn.Module | None:
    """The processor as a module (its parameters are what trains), if it is one."""
    return processor if isinstance(processor, torch.nn.Module) else None


def param_dtype(processor: Any) -> torch.dtype | None:
    """The dtype of the first floating-point parameter of a module (or of a prior's denoiser)."""
    module = processor if isinstance(processor, torch.nn.Module) else getattr(processor, "denoiser", None)
    if not isinstance(module, torch.nn.Module):
        return None
    return next((p.dtype for p in module.parameters() if p.dtype.is_floating_point), None)


def _param_versions(module: torch.nn.Module | None) -> tuple:
    """Identity and in-place version counter of every parameter: changes when an optimizer steps."""
    if module is None:
        return ()
    return tuple((name, id(p), p._version) for name, p in module.named_parameters())


class ModelShipment:
    """``processor`` pickled once and sent to every worker of ``ctx`` (see the module).

    Parameters
    ----------
    ctx : DistributedContext
    processor : callable
        The model (any picklable callable; a ``torch.nn.Module`` trains).
    channels_last : bool
        Run 2-D convolutional networks in NHWC on the workers.
    one_task_per_worker : bool
        Run one of the model's tile tasks at a time on each worker, with all its threads' torch threads.

    Attributes
    ----------
    key : str
        What tasks name the model by.
    payload : dask.delayed.Delayed
        The pickled model as one graph key, for graphs that must compute anywhere.
    fingerprint : str
        A hash of the pickled model, weights included.
    """

    def __init__(self, ctx: Any, processor: Any, channels_last: bool, one_task_per_worker: bool = False) -> None:
        self.ctx = ctx
        self.processor = processor
        self.key = f"{type(processor).__name__}-{uuid.uuid4().hex[:10]}"
        self.plugin_name = f"daskrecon-model-{self.key}"
        # Not released when this object is garbage collected: a lazy dask array made with it may
        # be computed later. close() (or the end of the context) releases it.
        options = {"channels_last": channels_last, "one_task_per_worker": one_task_per_worker}
        payload = cloudpickle.dumps((processor, options))
        self.payload = dask.delayed(payload, pure=True, name=f"daskrecon-model-payload-{self.key}")
        # one task per worker changes the torch threads a tile runs with (and so, on CPUs, its last
        # bits): part of the identity a checkpoint checks; absent when off, as before the option
        self.fingerprint = fingerprint((processor, channels_last, *(["one task per worker"] * one_task_per_worker)))
        self._pickled = payload
        self._registered_on = None
        ctx.client  # noqa: B018  (raises outside the context's with block, as before any shipping)
        self.ensure_on_cluster()

    def ensure_on_cluster(self) -> None:
        """Register the model's plugin with the context's client, once per client: a context closed and
        started again (``ctx.close(); ctx.start()``) has a new cluster, whose workers never got it."""
        if not self.ctx.started:  # nothing to send to; a lazy array carries the payload in its graph anyway
            return
        client = self.ctx.client
        if client is self._registered_on:
            return
        bounded(client, client._register_worker_plugin, plugin=_ModelPlugin(self.key, self._pickled),
                name=self.plugin_name, idempotent=False, what="sending the model to the workers",
                timeout=self.ctx.setup_timeout)
        self._registered_on = client
        self._sent_versions = _param_versions(self.module)
        self._state_cache: tuple[tuple, Any] | None = None

    @property
    def module(self) -> torch.nn.Module | None:
        return module_of(self.processor)

    def state(self) -> Future | None:
        """The future of the model's current parameters if they changed since pickling, else ``None``.

        One key per version (an optimizer step), fetched once by each worker that needs it;
        tasks carry the key and a worker loads it into its copy of the model when the version
        differs. Placed with lineage (not scattered): a worker lost mid-backward gets it back.
        """
        versions = _param_versions(self.module)
        if versions == self._sent_versions:
            return None
        if self._state_cache is None or self._state_cache[0] != versions or not usable(self._state_cache[1]):
            state = {"version": uuid.uuid4().hex,
                     "params": {n: p.detach().cpu().numpy().copy() for n, p in self.module.named_parameters()}}
            self._state_cache = (versions, place(self.ctx.client, state))
        return self._state_cache[1]

    def close(self) -> None:
        """Remove the model from the workers (lazy arrays that carry its payload still compute)."""
        try:
            client = self.ctx.client
            bounded(client, client._unregister_worker_plugin, self.plugin_name,
                    what="removing the model from the workers", timeout=self.ctx.stall_timeout)
        except Exception:  # the cluster may be gone already
            pass
