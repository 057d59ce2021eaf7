"""`OperatorStack`: ``N`` operators held on their workers, one task per operator, results gathered or tree-summed.

The machinery under :class:`~daskrecon.frontend.physics.DistributedPhysics`, which puts deepinv's
interface on top of it: which worker holds which operator (:mod:`daskrecon.runtime.placement`),
submitting ``fn(A_i, ...)`` on that worker, and turning the per-operator futures into what the
driver receives — a list in operator order, or their sum along the tree fixed by operator index
(:mod:`daskrecon.planning.reduction`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from deepinv.physics import LinearPhysics, Physics
from distributed import Future

from daskrecon.errors import LinearityError
from daskrecon.frontend.context import DistributedContext
from daskrecon.frontend.measurements import MeasurementList
from daskrecon.operators.chunkwise import local_form, local_form_of
from daskrecon.planning.fingerprint import fingerprint
from daskrecon.planning.reduction import REDUCTIONS
from daskrecon.runtime.arrays import gather_arrays, gather_tensors
from daskrecon.runtime.placement import ObjectSet, Placement
from daskrecon.tasks import operators as operator_tasks

__all__ = ["OperatorStack"]


class OperatorStack:
    """``N`` operators, each built once on the worker that owns it, and the tasks that use them.

    Parameters
    ----------
    ctx : DistributedContext
    sources : sequence
        One entry per operator: a ``Physics`` object (pickled once, unpickled on its worker
        with the first task that needs it) or a factory ``factory(i, device, factory_kwargs)``
        (run on its worker now: its result says whether the operator is linear).
    factory_kwargs : dict, optional
    fast : bool
        Let sums over operators use a faster equivalent of an operator where one is known
        (:mod:`daskrecon.tasks.substitutes`).
    """

    def __init__(self, ctx: DistributedContext, sources: Sequence[Any], *, factory_kwargs: dict | None,
                 fast: bool) -> None:
        self.ctx = ctx
        self.sources = list(sources)
        self.num_operators = len(self.sources)
        self.factory_kwargs = factory_kwargs
        self.fast = fast
        self.placement = Placement(ctx, self.num_operators)
        # Objects reach their worker with the first task that needs them, not here: an out-of-core
        # run, which uses only their chunk-wise forms, never puts a whole operator (an image-sized
        # Inpainting mask, say) on a worker.
        self.objects = ObjectSet(ctx, self.sources, self.num_operators, factory_kwargs=factory_kwargs, fast=fast)
        self.placement.register(self.objects)
        self._forms: list | None = None
        self._driver_copies: list | None = None
        self.updates: list[tuple[str, dict, tuple[int, ...] | None]] = []
        if all(isinstance(s, Physics) for s in self.sources):
            self.linear = [isinstance(s, LinearPhysics) for s in self.sources]
        else:
            self.linear = [d["linear"] for d in self.map(operator_tasks.describe, what="physics factory")]

    @property
    def owners(self) -> list[str]:
        """The worker holding each operator (re-planned when workers join or leave)."""
        return self.placement.owners

    # ------------------------------------------------------------------ tasks
    def submit(self, fn: Callable, *args: Any, per_op: Sequence[Sequence[Any]] = ()) -> list[Future]:
        """One task ``fn(A_i, *per_op[.][i], *args)`` per operator, on the worker holding ``A_i``."""
        return self.placement.map(fn, objects=[self.objects], per_op=per_op, shared=args)

    def map(self, fn: Callable, *args: Any, what: str = "operator") -> list:
        """``[fn(A_i, *args) for each i]`` run where the operators live, gathered in operator order."""
        return self.gather_values(self.submit(fn, *args), what)

    def gather_values(self, futures: list[Future], what: str) -> list:
        """Per-operator results (any picklable value) on the driver, in operator order."""
        return gather_arrays(self.ctx.client, futures, what, labels=self.placement.labels(futures),
                             stall_timeout=self.ctx.stall_timeout)

    def reduce(self, futures: list[Future]) -> Future:
        """The sum of per-operator tensors along the fixed tree, as a future."""
        return self.placement.reduce(futures)

    def finish(self, futures: list[Future], gather: bool, reduce_op: str | None, what: str) -> Any:
        """Per-operator futures → a MeasurementList (``list`` unless ``gather``), or their tree sum or mean."""
        labels = self.placement.labels(futures)
        if reduce_op is None:
            tensors = gather_tensors(self.ctx.client, futures, self.ctx.device, what, labels=labels,
                                     stall_timeout=self.ctx.stall_timeout)
            return MeasurementList(tensors) if gather else tensors
        if reduce_op not in REDUCTIONS:
            raise ValueError(f"reduce_op must be None, 'sum' or 'mean', got {reduce_op!r}")
        total = gather_tensors(self.ctx.client, [self.reduce(futures)], self.ctx.device, what, labels=labels,
                               stall_timeout=self.ctx.stall_timeout)[0]
        return total / self.num_operators if reduce_op == "mean" else total

    def seeds(self) -> list[int]:
        """One noise seed per operator, drawn from the driver's RNG (so noise does not depend on the workers)."""
        base = int(torch.randint(0, 2**62, (1,)).item())
        return [base + i for i in range(self.num_operators)]

    def update(self, method: str, kwargs: dict, indices: Sequence[int] | None = None) -> None:
        """deepinv's ``update`` / ``update_parameters`` (``method``) on every operator, or on ``indices``.

        As on deepinv's stack, an operator given as an object is updated in place, on the driver; a
        factory's operators record the call, replayed after every build (on a worker, also one that
        joins later, and on the driver's copies). The workers' copies are then dropped: each is
        rebuilt, updated, by the next task that needs it, as it was built the first time.
        """
        chosen = range(self.num_operators) if indices is None else indices
        for i in sorted(set(chosen)):
            source = self.sources[i]
            if isinstance(source, Physics):
                getattr(source, method)(**kwargs)
            elif self._driver_copies is not None:
                getattr(self._driver_copies[i], method)(**kwargs)
        if not all(isinstance(s, Physics) for s in self.sources):
            self.updates.append((method, dict(kwargs), None if indices is None else tuple(chosen)))
        # a new set: the old one's workers' copies are forgotten with it (its finalizer)
        self.objects = ObjectSet(self.ctx, self.sources, self.num_operators, factory_kwargs=self.factory_kwargs,
                                 fast=self.fast, updates=self.updates)
        self.placement.register(self.objects)
        self._forms = None

    # ------------------------------------------------------------------ what the operators are
    def require_linear(self, method: str) -> None:
        """Raise :class:`~daskrecon.errors.LinearityError`, naming ``method``, unless every operator is linear."""
        bad = [i for i, lin in enumerate(self.linear) if not lin]
        if bad:
            raise LinearityError(
                f"{method} needs linear operators, but operators {bad} are not LinearPhysics; "
                "use A_vjp (autograd) or a data fidelity gradient instead"
            )

    def chunkwise_forms(self) -> list:
        """Each operator's chunk-wise form (:func:`~daskrecon.operators.chunkwise.local_form`), ``None`` where global."""
        if self._forms is None:
            if all(isinstance(s, Physics) for s in self.sources):
                self._forms = [local_form(s) for s in self.sources]
            else:
                self._forms = self.map(local_form_of, what="local form of operator")
        return self._forms

    def driver_copies(self) -> list[Physics]:
        """The operators on the driver: as given, or built by their factory here when first asked."""
        if self._driver_copies is None:
            self._driver_copies = [
                s if isinstance(s, Physics) else s(i, self.ctx.device, self.factory_kwargs)
                for i, s in enumerate(self.sources)
            ]
        return self._driver_copies

    @property
    def built_on_driver(self) -> bool:
        """Whether :meth:`driver_copies` has been asked for (no computation ever uses those copies)."""
        return self._driver_copies is not None

    def fingerprint(self) -> str:
        """A hash of what defines the operators (their state and factory arguments), stable across processes."""
        defined = (self.sources, self.factory_kwargs, self.fast)
        return fingerprint(defined + (self.updates,) if self.updates else defined)  # earlier checkpoints still match
