"""Placement: which worker holds operator ``i``, and running per-operator tasks there.

An operator (or a data fidelity) is never a Dask task result, so Dask never has to move
one between workers — many deepinv objects cannot even be pickled once they have run. Each
lives in its worker's registry (:func:`daskrecon.tasks.registry.obtain`) and is built there from a
*source*: the object as the user gave it, or its factory, pickled on the driver into bytes
held by a task with lineage. A task that needs operator ``i`` carries that source as a
dependency and is restricted, strictly, to operator ``i``'s owner, so work stealing never
moves it. If the owner leaves the cluster, daskrecon's scheduler plugin lifts the
restriction; the task runs elsewhere and rebuilds the operator from its source there.
When the set of workers changes, owners are re-planned with as few moves as possible
(:func:`daskrecon.planning.sharding.reassign_owners`).
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import cloudpickle
import dask
from distributed import Client, Future

from daskrecon.errors import SerializationError
from daskrecon.planning.sharding import reassign_owners
from daskrecon.runtime.arrays import place, usable
from daskrecon.runtime.graphs import tree_reduce
from daskrecon.runtime.scheduler_plugin import PLACED
from daskrecon.tasks import registry

if TYPE_CHECKING:  # annotations only: the front is a layer above
    from daskrecon.frontend.context import DistributedContext

__all__ = ["ObjectSet", "Placement"]


class Placement:
    """The owner worker of each of ``n`` operators, kept valid as workers come and go.

    Parameters
    ----------
    ctx : DistributedContext
    n : int
        Number of operators.

    Examples
    --------
    >>> placement = Placement(ctx, 4)                                    # doctest: +SKIP
    >>> futs = placement.map(fn, objects=[ops], per_op=[ys], shared=[x])  # doctest: +SKIP
    >>> total = placement.reduce(futs)                                    # doctest: +SKIP
    """

    def __init__(self, ctx: DistributedContext, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"a placement needs at least one operator, got {n!r}")
        self.ctx = ctx
        self.n = n
        self._owners = ctx.owners(n)
        self._generation = ctx.membership
        self._sets: weakref.WeakSet[ObjectSet] = weakref.WeakSet()

    @property
    def owners(self) -> list[str]:
        """The worker address owning each operator, re-planned if workers joined or left."""
        generation = self.ctx.membership
        if generation is None or generation != self._generation:
            previous = self._owners
            self._owners = reassign_owners(previous, self.ctx.workers())
            self._generation = generation
            moved = [i for i, (a, b) in enumerate(zip(previous, self._owners)) if a != b]
            if moved:
                self._evict(previous, moved)
        return list(self._owners)

    def _evict(self, previous: list[str], moved: list[int]) -> None:
        """Tell the old owners still alive to drop what they no longer own (fire and forget)."""
        alive = set(self._owners)
        for worker in {previous[i] for i in moved} & alive:
            slots = [i for i in moved if previous[i] == worker]
            for objects in list(self._sets):
                _fire_and_forget(self.ctx.client, objects.token, objects.slots_of(slots), [worker])

    def register(self, objects: ObjectSet) -> None:
        self._sets.add(objects)

    def map(
        self,
        fn: Callable,
        *,
        objects: Sequence[ObjectSet] = (),
        per_op: Sequence[Sequence[Any]] = (),
        shared: Sequence[Any] = (),
        indices: Sequence[int] | None = None,
    ) -> list[Future]:
        """One task ``fn(obj_1[i], …, per_op[0][i], …, *shared)`` per operator ``i``, on its owner.

        ``indices`` restricts the map to some operators; results come in that order.
        """
        client = self.ctx.client
        owners = self.owners
        indices = range(self.n) if indices is None else indices
        token = uuid.uuid4().hex[:12]
        futures = []
        with dask.annotate(daskrecon=PLACED):
            for i in indices:
                owner = owners[i]
                refs = [objects_.ref(i, owner) for objects_ in objects]
                futures.append(client.submit(
                    registry.on_objects, fn, owner, refs, *[p[i] for p in per_op], *shared,
                    key=f"{fn.__name__}-{i}-{token}", workers=[owner], allow_other_workers=False, pure=False,
                ))
        return futures

    def labels(self, futures: Sequence[Future], indices: Sequence[int] | None = None) -> dict:
        """``{key: "operator i"}`` for messages about stuck or failed tasks."""
        indices = range(len(futures)) if indices is None else indices
        return {f.key: f"operator {i}" for f, i in zip(futures, indices)}

    def reduce(self, futures: Sequence[Future]) -> Future:
        """Their sum on the workers, along the tree fixed by operator index."""
        return tree_reduce(self.ctx.client, futures, self.ctx.fan_in)


class ObjectSet:
    """``n`` objects (operators, data fidelities) that live on the workers owning their index.

    Parameters
    ----------
    ctx : DistributedContext
    sources : sequence or callable
        The objects themselves (pickled once, on the driver) or a factory
        ``factory(i, device, factory_kwargs)`` run on the worker; with ``shared=True`` a
        single object used for every index.
    n : int
    factory_kwargs : dict, optional
    fast : bool
        Substitute known faster equivalents on the workers (:mod:`daskrecon.tasks.substitutes`).
    shared : bool
        One object for all indices (a data fidelity shared by every operator).
    updates : sequence of (method, kwargs, indices)
        Calls replayed on what a factory builds (:func:`daskrecon.tasks.registry.build_object`).
    """

    def __init__(self, ctx: DistributedContext, sources: Any, n: int, *, factory_kwargs: dict | None = None,
                 fast: bool = False, shared: bool = False, updates: Sequence = ()) -> None:
        self.ctx = ctx
        self.n = n
        self.shared = shared
        self.token = uuid.uuid4().hex[:12]
        self.sources = sources
        self.factory_kwargs = factory_kwargs
        self.fast = fast
        self.updates = tuple(updates)
        self._placed: dict[int, Future] = {}
        # The workers' copies go when this set does (or at the latest with the cluster).
        weakref.finalize(self, _forget_everywhere, ctx.client, self.token)

    def slot(self, i: int) -> int:
        return 0 if self.shared else i

    def slots_of(self, indices: Sequence[int]) -> list[int]:
        return [] if self.shared else list(indices)  # a shared object serves the owner's other operators too

    def source_of(self, i: int) -> Any:
        if self.shared:
            return self.sources
        if callable(self.sources) and not isinstance(self.sources, (list, tuple)):
            return self.sources
        return self.sources[i]

    def ref(self, i: int, owner: str) -> tuple[str, int, Future]:
        """What a task needs to obtain object ``i``: its key and the future of its source."""
        slot = self.slot(i)
        fut = self._placed.get(slot)
        if not usable(fut):  # first use, or cancelled by a restart of the workers: place the source again
            spec = dict(source=self.source_of(i), index=i, factory_kwargs=self.factory_kwargs,
                        device_mode=self.ctx.device_mode, fast=self.fast, updates=self.updates)
            try:
                payload = cloudpickle.dumps(spec)
            except Exception as exc:  # any pickling failure: name the object and the fix
                raise SerializationError(
                    f"object {i} ({type(spec['source']).__name__}) cannot be serialized to be built on its worker: "
                    f"{type(exc).__name__}: {exc}. An operator may stop being picklable once it has run (deepinv's "
                    "compute_norm leaves autograd wrappers in Tomography): distribute it before using it, distribute "
                    "a copy.deepcopy made before, or pass a factory") from exc
            fut = place(self.ctx.client, payload, owner)
            self._placed[slot] = fut
        return (self.token, slot, fut)


def release_everywhere(client: Client, fn: Callable, *args: Any) -> None:
    """Run the coroutine function ``fn(*args)`` on every worker without waiting (from finalizers: any thread,
    even the client's loop)."""
    try:
        if client.status == "running":
            client.loop.add_callback(client._run, fn, *args, wait=False, on_error="ignore")
    except Exception:  # interpreter shutdown, closed client: what stays only costs memory
        pass


def _forget_everywhere(client: Client, token: str) -> None:
    _fire_and_forget(client, token, None, None)


def _fire_and_forget(client: Client, token: str, slots: list[int] | None, workers: list[str] | None) -> None:
    """Ask workers to drop objects, without waiting: runs from finalizers, on any thread, even the client's loop."""
    try:
        if client.status == "running":
            client.loop.add_callback(client._run, registry.forget_objects, token, slots, workers=workers, wait=False,
                                     on_error="ignore")
    except Exception:  # interpreter shutdown, closed client: a stale copy only costs memory
        pass
