"""`DistributedPhysics` and `DistributedLinearPhysics`: a stack of operators, one per task.

Operator ``i`` is built once, on the worker that owns it, and stays there in that worker's
registry (:mod:`daskrecon.runtime.placement`): it never travels between workers. Every method
submits one task per operator on its owner, then either gathers the per-operator results
in operator order or sums them on the workers along a tree fixed by operator index
(:mod:`daskrecon.planning.reduction`).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np
import torch
from deepinv.physics import LinearPhysics, Physics
from deepinv.physics.forward import StackedLinearPhysics
from deepinv.utils import TensorList
from distributed import Future

from daskrecon.errors import LinearityError, MeasurementError
from daskrecon.frontend.autograd import needs_grad, physics_call
from daskrecon.frontend.context import DistributedContext
from daskrecon.frontend.operator_inputs import OperatorInputs
from daskrecon.frontend.operator_stack import OperatorStack
from daskrecon.frontend.operator_views import OperatorView
from daskrecon.frontend.physics_arrays import apply_lazily
from daskrecon.planning.reduction import REDUCTIONS
from daskrecon.tasks import arrays as array_tasks
from daskrecon.tasks import operators as operator_tasks

__all__ = [
    "DistributedLinearPhysics",
    "DistributedPhysics",
    "DistributedStackedLinearPhysics",
    "DistributedStackedPhysics",
]

GATHER_STRATEGIES = ("naive", "concatenated", "broadcast")


class _Reduction:
    """Default of ``reduce_op``: the physics' ``reduction`` (``"sum"`` unless set otherwise)."""

    def __repr__(self) -> str:
        return "<the physics' reduction>"


BY_REDUCTION: Any = _Reduction()


Factory = Callable[[int, torch.device, "dict | None"], Physics]


def _entries_of(y: Any) -> list:
    return [y[i] for i in range(len(y))] if isinstance(y, (TensorList, list, tuple)) else [y]


def _is_chunked(y: Any) -> bool:
    return isinstance(y, (list, tuple)) and len(y) > 0 and all(isinstance(v, da.Array) for v in y)


class _LinearOnly:
    """A linear-only method looked up on the non-linear stack: calling it raises LinearityError, naming it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self

        def refuse(*args: Any, **kwargs: Any) -> Any:
            obj.require_linear(self.name)
            raise LinearityError(f"{self.name} is a method of DistributedLinearPhysics: distribute these linear "
                                 "operators with type_object='linear_physics'")

        return refuse


class DistributedPhysics(Physics):
    """A stack of physics operators ``A = [A_1; …; A_N]`` spread over Dask workers.

    Parameters
    ----------
    ctx : DistributedContext
    num_operators : int
        ``N``.
    factory : callable or sequence of Physics
        Either ``factory(i, device, factory_kwargs) -> Physics``, called on the worker
        that owns operator ``i``, or the ``N`` operators themselves (each is pickled
        once and unpickled once, on its worker).
    factory_kwargs : dict, optional
        Third argument of ``factory``.
    dtype : torch.dtype, optional
        Kept for compatibility with deepinv (results keep the operators' dtypes).
    gather_strategy : {"naive", "concatenated", "broadcast"}
        Accepted for compatibility with deepinv; on Dask every strategy returns the
        same result, fetched by the client.
    fast_operators : bool
        Let workers evaluate operators with a known faster equivalent of the same linear
        map (:mod:`daskrecon.tasks.substitutes`: circular blurs by FFT) where results are sums over
        operators — data-fidelity values and gradients, the normal operator, the
        reconstruction engine. This class's own operator methods (``A``, ``A_adjoint``,
        ``A_adjoint_A``, ``A_vjp``...) always run each operator as built, bit for bit
        deepinv's computation. Default True.
    reduction : {"sum", "mean"}
        How per-operator results in the signal space combine by default, as
        ``StackedLinearPhysics(..., reduction=...)``: ``A_adjoint``, ``A_vjp`` and
        ``A_adjoint_A`` sum (or average over the ``N`` operators) unless their
        ``reduce_op`` says otherwise, and ``A_A_adjoint``, ``compute_sqnorm`` and
        ``A_dagger`` follow. ``"mean"`` makes ``A_adjoint`` ``(1/N)·Aᵀ``, so that
        ``(A, A_adjoint)`` is no longer an adjoint pair (deepinv#1066; deepinv deprecates
        it): a warning says so. The true adjoint stays available as
        ``A_adjoint(y, reduce_op="sum")``; to average a data term over operators, use
        ``distribute(L2(), ctx, reduction="mean")``, whose value and gradient stay consistent.

    Attributes
    ----------
    local_indexes : list of int
        deepinv's "operators owned by this rank": every index, since the driver is the
        only rank and receives every operator's result (where each *runs* is
        :attr:`owners`).
    local_physics : list of Physics
        The operators as the driver sees them: the objects given, or built by the factory
        on the driver (``factory(i, ctx.device, factory_kwargs)``) when first read. The
        computations never use these copies; they run on the workers.

    Notes
    -----
    ``gather=False`` keeps deepinv's single-process return types (a ``list`` rather
    than a ``TensorList`` for per-operator results): the driver is the only rank and
    sees every operator. Non-linear operators support :meth:`A`, :meth:`forward` and
    :meth:`A_vjp` (by autograd on the worker). Every method on tensors is differentiable:
    its backward is the adjoint operation, run per operator on the workers (noise in
    :meth:`forward` is treated as additive: its backward is that of :meth:`A`).
    """

    def __init__(
        self,
        ctx: DistributedContext,
        num_operators: int,
        factory: Factory | Sequence[Physics],
        *,
        factory_kwargs: dict | None = None,
        dtype: torch.dtype | None = None,
        gather_strategy: str = "concatenated",
        fast_operators: bool = True,
        reduction: str = "sum",
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)} for {type(self).__name__}")
        # Not super(): deepinv's StackedLinearPhysics.__init__ (next for the linear stack) builds a
        # driver-side operator list, which this class replaces by operators on the workers.
        (LinearPhysics if isinstance(self, LinearPhysics) else Physics).__init__(self)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}; for per-operator "
                             "results in the signal space pass reduce_op=None to the call")
        if reduction == "mean":
            warnings.warn(
                "reduction='mean' makes A_adjoint (1/N)·Aᵀ, so (A, A_adjoint) is no longer an adjoint pair "
                "(as in deepinv's StackedLinearPhysics, deepinv#1066); the adjoint is A_adjoint(y, reduce_op='sum'). "
                "To average a data term, use distribute(L2(), ctx, reduction='mean') instead", UserWarning, stacklevel=2)
        self.reduction = reduction
        if not isinstance(num_operators, int) or num_operators < 1:
            raise ValueError(f"num_operators must be a positive int, got {num_operators!r}")
        if gather_strategy not in GATHER_STRATEGIES:
            raise ValueError(f"gather_strategy must be one of {GATHER_STRATEGIES}, got {gather_strategy!r}")
        if not callable(factory) and len(factory) != num_operators:
            raise ValueError(f"got {len(factory)} operators for num_operators={num_operators}")
        self.ctx = ctx
        self.num_operators = num_operators
        self.dtype = dtype or torch.float32
        self.gather_strategy = gather_strategy
        self.factory_kwargs = factory_kwargs
        self.fast_operators = fast_operators
        sources = [factory] * num_operators if callable(factory) and not isinstance(factory, Physics) else list(factory)
        self.stack = OperatorStack(ctx, sources, factory_kwargs=factory_kwargs, fast=fast_operators)
        # What the stack holds, under the names the engine, the views and deepinv's code read.
        self.sources, self.linear = self.stack.sources, self.stack.linear
        self.placement = self.stack.placement
        #: Counts the updates of the operators (:meth:`update_operators`): caches of what is derived from
        #: them (the engine's default step size) key on it.
        self.operators_version = 0
        self.inputs = OperatorInputs(self)
        self._check_linearity()

    def _check_linearity(self) -> None:
        """Hook for the linear subclass."""

    @property
    def objects(self) -> Any:
        """The operators on their workers (:class:`~daskrecon.runtime.placement.ObjectSet`); a new set after
        :meth:`update`."""
        return self.stack.objects

    def update_parameters(self, **kwargs: Any) -> None:
        """deepinv's ``update_parameters`` on every operator (a blur's ``filter``, a mask, ...), as
        ``StackedPhysics.update_parameters`` does: operators given as objects are updated in place; the
        workers' copies are rebuilt with the new parameters by the next call. deepinv's ``Trainer``
        calls :meth:`update` with a ``physics_generator``'s parameters before each batch."""
        self.update_operators("update_parameters", kwargs)

    def update(self, **kwargs: Any) -> None:
        """deepinv's ``update`` on every operator: its parameters and its noise model's (``sigma``...)."""
        self.update_operators("update", kwargs)

    def set_noise_model(self, noise_model: Any, item: int = 0) -> None:
        """The noise model of operator ``item``, as ``StackedPhysics.set_noise_model``: used by the next
        :meth:`forward` on its worker."""
        n = self.num_operators
        if not isinstance(item, int) or isinstance(item, bool) or not -n <= item < n:
            raise IndexError(f"operator index {item!r} out of range for {n} operators")
        self.update_operators("set_noise_model", {"noise_model": noise_model}, [item % n])

    def update_operators(self, method: str, kwargs: dict, indices: Sequence[int] | None = None) -> None:
        """Call deepinv's ``update``, ``update_parameters`` or ``set_noise_model`` (``method``) with ``kwargs``
        on every operator, or on ``indices`` (``physics[i].update(...)``); see :meth:`update_parameters`."""
        if method not in ("update", "update_parameters", "set_noise_model"):
            raise ValueError(f"method must be 'update', 'update_parameters' or 'set_noise_model', got {method!r}")
        if not kwargs:  # deepinv's Trainer calls update() before every batch, mostly with nothing to change
            return
        self.stack.update(method, kwargs, indices)
        self.operators_version += 1  # what was derived from the operators before (a step size) no longer holds

    @property
    def local_indexes(self) -> list[int]:
        """Every operator index: the driver is the only rank (deepinv's attribute; see the class notes)."""
        return self.ctx.local_indices(self.num_operators)

    @property
    def local_physics(self) -> list[Physics]:
        """The operators on the driver: as given, or built by the factory here (see the class notes)."""
        return self.stack.driver_copies()

    def _reduce_op(self, reduce_op: Any) -> str | None:
        return self.reduction if reduce_op is BY_REDUCTION else reduce_op

    @property
    def owners(self) -> list[str]:
        """The worker holding each operator (re-planned when workers join or leave)."""
        return self.stack.owners

    def map_operators(self, fn: Callable, *args: Any, what: str = "operator") -> list:
        """``[fn(A_i, *args) for each i]``, each call on the worker holding ``A_i``; results in operator order.

        ``fn`` must be importable (or picklable) on the workers; its results travel back to
        the driver. Use it to inspect the operators where they live (their device, type...).
        """
        return self.stack.map(fn, *args, what=what)

    # ------------------------------------------------------------------ inputs, placed on the workers
    def place_x(self, x: torch.Tensor | Future, name: str = "x") -> Future:
        """An image placed on the cluster once, for every operator's task (a future passes through)."""
        return self.inputs.place_x(x, name)

    def place_y(self, y: Any, name: str = "y") -> list[Future]:
        """Futures of ``y_1 … y_N`` on their operators' workers; a TensorList is placed once and reused."""
        return self.inputs.place_y(y, name)

    def place_each(self, tensors: Sequence[torch.Tensor]) -> list[Future]:
        """One tensor per operator, each placed on its operator's worker (not cached, unlike ``y``)."""
        return self.inputs.place_each(tensors)

    def require_linear(self, method: str) -> None:
        """Raise :class:`~daskrecon.errors.LinearityError`, naming ``method``, unless every operator is linear."""
        self.stack.require_linear(method)

    # ------------------------------------------------------------------ forward model
    def A(self, x: torch.Tensor, gather: bool = True, reduce_op: str | None = None,
          force_input_grad_sync: bool = False, return_graph_anchor: bool = False, **kwargs: Any):
        """``[A_1 x, …, A_N x]`` in operator order (``reduce_op`` sums or averages them).

        ``x`` may be a (B, C, H, W) dask array: see :meth:`local_forms`. A tensor that
        requires grad gives a result whose backward runs on the workers
        (:mod:`daskrecon.frontend.autograd`); deepinv 0.5's ``force_input_grad_sync`` changes nothing
        (gradients are always whole); ``return_graph_anchor=True`` also returns the input,
        as deepinv does.
        """
        if isinstance(x, da.Array):
            return apply_lazily(self, "A", x, reduce_op)
        if needs_grad(x):
            out = physics_call(self, "A", x=x, gather=gather, reduce_op=reduce_op, **kwargs)
            return (out, x) if return_graph_anchor else out
        futs = self.stack.submit(operator_tasks.forward_op, self.place_x(x), kwargs, None, False)
        out = self.stack.finish(futs, gather, reduce_op, f"A(x), x of shape {tuple(x.shape)} and dtype {x.dtype}: operator")
        return (out, x) if return_graph_anchor else out

    def forward(self, x: torch.Tensor, gather: bool = True, reduce_op: str | None = None,
                force_input_grad_sync: bool = False, return_graph_anchor: bool = False, **kwargs: Any):
        """Noisy measurements ``[N_1(A_1 x), …]``; noise seeded per operator from the driver's RNG."""
        if needs_grad(x):
            out = physics_call(self, "forward", x=x, gather=gather, reduce_op=reduce_op, **kwargs)
            return (out, x) if return_graph_anchor else out
        n = self.num_operators
        futs = self.stack.submit(operator_tasks.forward_op, per_op=[[self.place_x(x)] * n, [kwargs] * n,
                                                            self.stack.seeds(), [True] * n])
        out = self.stack.finish(futs, gather, reduce_op, "forward(x): operator")
        return (out, x) if return_graph_anchor else out

    def A_vjp(self, x: torch.Tensor, v: Any, gather: bool = True, reduce_op: str | None = BY_REDUCTION):
        """``Σ_i (∂A_i/∂x)ᵀ v_i`` (autograd for non-linear operators); averaged with ``reduction="mean"``."""
        if needs_grad(x, *_entries_of(v)):
            return physics_call(self, "A_vjp", x=x, ys=v, gather=gather, reduce_op=self._reduce_op(reduce_op))
        futs = self.stack.submit(operator_tasks.vjp_op, per_op=[[self.place_x(x)] * self.num_operators,
                                                        self.place_y(v, "v")])
        return self.stack.finish(futs, gather, self._reduce_op(reduce_op), "A_vjp: operator")

    def vjp_backward(self, x: torch.Tensor, v: Sequence[torch.Tensor], g: torch.Tensor,
                      wrt_x: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The backward of ``A_vjp(x, v)`` (summed) at cotangent ``g``: ``Σ_i ∂⟨g, J_iᵀ v_i⟩/∂x`` along
        the tree (``None`` unless ``wrt_x``) and ``[J_i g]`` per operator, ``J_i`` the Jacobian at ``x``."""
        futs = self.stack.submit(operator_tasks.vjp_backward_op, self.place_x(g, "g"), bool(wrt_x),
                                 per_op=[[self.place_x(x)] * self.num_operators, self.place_each(list(v))])
        part = lambda k: [self.ctx.client.submit(operator.itemgetter(k), f, pure=False) for f in futs]
        gv = self.stack.finish(part(1), False, None, "backward of A_vjp: operator")
        return (self.stack.finish(part(0), False, "sum", "backward of A_vjp: operator") if wrt_x else None), gv

    # ------------------------------------------------------------------ per-operator inputs
    def A_each(self, xs: Sequence[torch.Tensor], gather: bool = True):
        """``[A_1 x_1, …, A_N x_N]``: each operator on its own input (the backward of ``A_adjoint``)."""
        if len(xs) != self.num_operators:
            raise MeasurementError(f"A_each needs one input per operator ({self.num_operators}), got {len(xs)}")
        if needs_grad(*xs):
            self.require_linear("A_each with inputs that require grad")
            return physics_call(self, "A_each", ys=list(xs), gather=gather)
        futs = self.stack.submit(operator_tasks.forward_op, {}, None, False, per_op=[self.place_each(xs)])
        return self.stack.finish(futs, gather, None, "A_each: operator")

    # Linear-only methods live on DistributedLinearPhysics; on this class they raise LinearityError.
    A_adjoint = _LinearOnly()
    A_adjoint_A = _LinearOnly()
    A_A_adjoint = _LinearOnly()
    A_adjoint_A_each = _LinearOnly()
    compute_sqnorm = _LinearOnly()

    # ------------------------------------------------------------------ chunk-wise (dask arrays)
    def chunkwise_forms(self) -> list:
        """The chunk-wise form of each operator (:func:`daskrecon.operators.chunkwise.local_form`), ``None`` where global.

        When every operator is local, :meth:`A`, :meth:`A_adjoint` and :meth:`A_adjoint_A`
        take and return dask arrays lazily, chunk by chunk (``map_overlap``), so an image
        larger than the cluster's memory streams from and to Zarr. Otherwise a dask array
        is assembled and goes through the per-operator tasks.
        """
        return self.stack.chunkwise_forms()

    local_forms = chunkwise_forms  # the name it had: "local" as in deepinv's local operators

    @property
    def chunkable(self) -> bool:
        """Whether every operator has a chunk-wise form."""
        return all(f is not None for f in self.chunkwise_forms())

    # ------------------------------------------------------------------ misc
    def fingerprint(self) -> str:
        """A hash of what defines the operators (their state and factory arguments), stable across processes."""
        return self.stack.fingerprint()

    def __len__(self) -> int:
        return self.num_operators

    def extra_repr(self) -> str:
        return f"num_operators={self.num_operators}, workers={len(set(self.owners))}, sharding={self.ctx.sharding!r}"


class DistributedLinearPhysics(DistributedPhysics, StackedLinearPhysics):
    """Linear stack ``A = [A_1; …; A_N]``; usable wherever deepinv expects a ``LinearPhysics``
    or a ``StackedLinearPhysics``.

    Adds :meth:`A_adjoint`, :meth:`A_adjoint_A`, :meth:`A_A_adjoint`,
    :meth:`A_dagger` and :meth:`compute_sqnorm`; see :class:`DistributedPhysics` for the
    parameters. Every operator must be a ``deepinv.physics.LinearPhysics``.

    ``physics[i]`` (and ``physics.physics_list``) is operator ``i`` as a deepinv
    ``LinearPhysics`` that runs on the worker holding it (:class:`~daskrecon.frontend.operator_views.OperatorView`),
    so deepinv code that walks a stack operator by operator — deepinv 0.5's ``OSEM`` and
    ``BSREM`` on pre-split subsets — runs each operator where it lives.
    """

    # A StackedLinearPhysics by type (deepinv's OSEM and BSREM accept pre-split subsets only as
    # one), not by its driver-side implementation: what deepinv's stack does through
    # ``physics_list`` on the driver stays this class's own.
    __repr__ = torch.nn.Module.__repr__
    __str__ = object.__str__
    noise = Physics.noise
    sensor = Physics.sensor
    set_noise_model = DistributedPhysics.set_noise_model
    update_parameters = DistributedPhysics.update_parameters
    update = DistributedPhysics.update

    def __getitem__(self, item: int | slice) -> Any:
        """Operator ``item`` as a :class:`~daskrecon.frontend.operator_views.OperatorView` (a list of them for a slice)."""
        n = self.num_operators
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(n))]
        if not isinstance(item, int) or isinstance(item, bool):
            raise TypeError(f"operators are indexed by int or slice, got {type(item).__name__}")
        if not -n <= item < n:
            raise IndexError(f"operator index {item} out of range for {n} operators")
        item %= n
        views = self.__dict__.setdefault("_views", {})
        if item not in views:
            views[item] = OperatorView(self, item)
        return views[item]

    def __iter__(self) -> Any:
        return (self[i] for i in range(self.num_operators))

    @property
    def physics_list(self) -> list[OperatorView]:
        """The operators as views that run on their workers (deepinv's ``StackedPhysics.physics_list``)."""
        return [self[i] for i in range(self.num_operators)]

    def _check_linearity(self) -> None:
        bad = [i for i, lin in enumerate(self.linear) if not lin]
        if bad:
            raise LinearityError(
                f"operators {bad} are not LinearPhysics; a DistributedLinearPhysics needs linear operators "
                "(use DistributedPhysics / distribute(..., type_object='physics') for non-linear ones)"
            )

    def A_adjoint(self, y: Any, gather: bool = True, reduce_op: str | None = BY_REDUCTION, **kwargs: Any):
        """``Σ_i A_iᵀ y_i`` (``(1/N) Σ`` with ``reduction="mean"``; ``reduce_op=None``: the per-operator ``A_iᵀ y_i``)."""
        reduce_op = self._reduce_op(reduce_op)
        if _is_chunked(y):
            return apply_lazily(self, "A_adjoint", list(y), reduce_op)
        if needs_grad(*_entries_of(y)):
            return physics_call(self, "A_adjoint", ys=y, gather=gather, reduce_op=reduce_op, **kwargs)
        futs = self.stack.submit(operator_tasks.adjoint_op, kwargs, per_op=[self.place_y(y)])
        return self.stack.finish(futs, gather, reduce_op, "A_adjoint(y): operator")

    def A_adjoint_A(self, x: torch.Tensor, gather: bool = True, reduce_op: str | None = BY_REDUCTION, **kwargs: Any):
        """``Σ_i A_iᵀ A_i x`` (averaged with ``reduction="mean"``)."""
        reduce_op = self._reduce_op(reduce_op)
        if isinstance(x, da.Array):
            return apply_lazily(self, "A_adjoint_A", x, reduce_op)
        if needs_grad(x):
            return physics_call(self, "A_adjoint_A", x=x, gather=gather, reduce_op=reduce_op, **kwargs)
        futs = self.stack.submit(operator_tasks.adjoint_A_op, kwargs, per_op=[[self.place_x(x)] * self.num_operators])
        return self.stack.finish(futs, gather, reduce_op, "A_adjoint_A(x): operator")

    def A_A_adjoint(self, y: Any, gather: bool = True, **kwargs: Any):
        """``[A_1 (Aᵀ y), …, A_N (Aᵀ y)]`` with the full adjoint ``Aᵀ y = Σ_i A_iᵀ y_i`` (averaged with ``reduction="mean"``)."""
        if needs_grad(*_entries_of(y)):
            return physics_call(self, "A_A_adjoint", ys=y, gather=gather, **kwargs)
        adj = self.stack.reduce(self.stack.submit(operator_tasks.adjoint_op, kwargs, per_op=[self.place_y(y)]))
        if self.reduction == "mean":
            adj = self.ctx.client.submit(array_tasks.scale_array, adj, 1.0 / self.num_operators, pure=False)
        futs = self.stack.submit(operator_tasks.forward_op, adj, kwargs, None, False)
        return self.stack.finish(futs, gather, None, "A_A_adjoint(y): operator")

    def A_adjoint_A_each(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``Σ_i A_iᵀ A_i x_i``: each normal operator on its own input, summed along the fixed tree."""
        if len(xs) != self.num_operators:
            raise MeasurementError(f"A_adjoint_A_each needs one input per operator ({self.num_operators}), "
                                   f"got {len(xs)}")
        if needs_grad(*xs):
            return physics_call(self, "A_adjoint_A_each", ys=list(xs))
        futs = self.stack.submit(operator_tasks.adjoint_A_op, {}, per_op=[self.place_each(xs)])
        return self.stack.finish(futs, True, "sum", "A_adjoint_A_each: operator")

    def A_dagger(
        self,
        y: Any,
        solver: str = "CG",
        max_iter: int | None = None,
        tol: float | None = None,
        verbose: bool = False,
        *,
        local_only: bool = True,
        gather: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Pseudo-inverse.

        ``local_only=True`` (deepinv's default, approximate): ``(1/N) Σ_i A_i^† y_i``,
        each with the operator's own ``A_dagger`` (``solver``/``max_iter``/``tol`` are
        forwarded where the operator accepts them). ``local_only=False``: the exact
        least-squares solution of the stacked system, by deepinv's solver driving the
        distributed ``A``/``A_adjoint`` (one round of tasks per solver iteration).
        """
        if not local_only:
            return LinearPhysics.A_dagger(self, y, solver=solver, max_iter=max_iter, tol=tol, verbose=verbose, **kwargs)
        opts = {k: v for k, v in {"solver": solver, "max_iter": max_iter, "tol": tol}.items() if v is not None}
        futs = self.stack.submit(operator_tasks.dagger_op, {**opts, **kwargs}, per_op=[self.place_y(y)])
        return self.stack.finish(futs, gather, "mean", "A_dagger(y): operator")

    def compute_sqnorm(
        self,
        x0: torch.Tensor,
        *,
        max_iter: int = 50,
        tol: float = 1e-3,
        verbose: bool = True,
        local_only: bool = True,
        gather: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Squared spectral norm ``‖A‖²``.

        ``local_only=True``: ``Σ_i ‖A_i‖²``, an upper bound (``AᵀA = Σ_i A_iᵀA_i``), each
        term by the operator's power method on its worker. ``local_only=False``: the
        power method on the distributed ``AᵀA`` (exact). With ``reduction="mean"`` both
        are of the averaged operator ``(1/N) Σ_i A_iᵀA_i``, as deepinv's stack computes it.
        """
        if not local_only:
            return LinearPhysics.compute_sqnorm(self, x0, max_iter=max_iter, tol=tol, verbose=verbose, **kwargs)
        futs = self.stack.submit(operator_tasks.sqnorm_op, max_iter, tol, per_op=[[self.place_x(x0, "x0")] * self.num_operators])
        values = self.stack.gather_values(futs, "compute_sqnorm: operator")
        total = float(np.sum(np.asarray(values, dtype=np.float64)))
        if self.reduction == "mean":  # ‖(1/N) Σ A_iᵀA_i‖ ≤ (1/N) Σ ‖A_i‖²
            total /= self.num_operators
        total = torch.tensor(total, device=self.ctx.device)
        if verbose:
            print(f"Computed local norm upper bound: ||A||_2^2 <= {total.item():.4f}")
        return total



DistributedStackedPhysics = DistributedPhysics
DistributedStackedLinearPhysics = DistributedLinearPhysics
