"""`DistributedDataFidelity`: ``f(x) = Σ_i d_i(A_i x, y_i)`` and its gradient, one task per operator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np
import torch
from deepinv.optim.data_fidelity import L1, DataFidelity, StackedPhysicsDataFidelity
from deepinv.optim.potential import Potential
from deepinv.utils import TensorList
from distributed import Future

from daskrecon.engine import iteration as graph
from daskrecon.engine.problem import plan_terms
from daskrecon.errors import MeasurementError
from daskrecon.frontend.autograd import fidelity_fn, fidelity_grad, needs_grad
from daskrecon.frontend.autograd import measurement_tensors as _measurements
from daskrecon.frontend.context import DistributedContext, one_context
from daskrecon.frontend.physics import DistributedPhysics
from daskrecon.planning.reduction import REDUCTIONS
from daskrecon.runtime.arrays import as_dask, gather_tensors
from daskrecon.runtime.placement import ObjectSet
from daskrecon.runtime.storage import seen_inputs
from daskrecon.tasks import fidelity as fidelity_tasks

__all__ = ["DistributedDataFidelity"]


FidelityFactory = Callable[[int, torch.device, "dict | None"], DataFidelity]


class DistributedDataFidelity(torch.nn.Module):
    """Data fidelity of a distributed stack: ``Σ_i d_i(A_i x, y_i)``.

    Parameters
    ----------
    ctx : DistributedContext
    data_fidelity : DataFidelity, list of DataFidelity, StackedPhysicsDataFidelity or callable
        One fidelity shared by every operator (``L2()``), one per operator (a list or a
        ``StackedPhysicsDataFidelity``), or a factory ``f(i, device, factory_kwargs)``
        run on the worker that owns operator ``i``.
    num_operators : int, optional
        Required with a factory; otherwise taken from the physics at the first call.
    factory_kwargs : dict, optional
        Third argument of the factory.
    reduction : {"sum", "mean"}
        ``"mean"`` divides by the number of operators.

    Attributes
    ----------
    reduction_mode : str
        deepinv 0.5's name of ``reduction``.
    single_fidelity : DataFidelity or None
        The fidelity shared by every operator, when one was given.
    local_data_fidelities : list of DataFidelity
        Per-operator fidelities given as a list (``[]`` otherwise); the driver is the only
        rank, so "local" is all of them.

    Notes
    -----
    :meth:`grad` runs ``(∂A_i/∂x)ᵀ ∇d_i(A_i x, y_i)`` as one task next to operator
    ``i`` and its measurement, and sums the results on the workers along a tree fixed by
    operator index: the gradient is bitwise the same on any number of workers. For
    ``L2`` this costs one ``A_i`` and one ``A_iᵀ`` per operator; ``A(x)`` is never
    gathered to the driver.

    Examples
    --------
    >>> g = dr.distribute(L2(), ctx).grad(x, y, dphys)     # doctest: +SKIP
    """

    def __init__(
        self,
        ctx: DistributedContext,
        data_fidelity: DataFidelity | Sequence[DataFidelity] | FidelityFactory,
        num_operators: int | None = None,
        *,
        factory_kwargs: dict | None = None,
        reduction: str = "sum",
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(data_fidelity, StackedPhysicsDataFidelity):
            data_fidelity = list(data_fidelity.data_fidelity_list)
        self._given = data_fidelity
        if isinstance(data_fidelity, DataFidelity):
            self._source: Callable[[int], Any] = lambda i: data_fidelity
        elif isinstance(data_fidelity, (list, tuple)):
            if not all(isinstance(f, DataFidelity) for f in data_fidelity):
                raise TypeError("a list of data fidelities must hold deepinv DataFidelity objects only")
            if num_operators is not None and num_operators != len(data_fidelity):
                raise ValueError(f"num_operators={num_operators} but {len(data_fidelity)} data fidelities were given")
            num_operators = len(data_fidelity)
            self._source = lambda i: data_fidelity[i]
        elif callable(data_fidelity):
            if not isinstance(num_operators, int) or num_operators < 1:
                raise ValueError("a data-fidelity factory needs num_operators (a positive int)")
            self._source = lambda i: data_fidelity
        else:
            raise TypeError(
                "data_fidelity must be a DataFidelity, a list of them, a StackedPhysicsDataFidelity "
                f"or a factory, got {type(data_fidelity).__name__}"
            )
        self.ctx = ctx
        self.num_operators = num_operators
        self.factory_kwargs = factory_kwargs
        self.reduction = reduction
        self._placed: tuple[DistributedPhysics, ObjectSet] | None = None

    @property
    def reduction_mode(self) -> str:
        return self.reduction

    @property
    def single_fidelity(self) -> DataFidelity | None:
        return self._given if isinstance(self._given, DataFidelity) else None

    @property
    def local_data_fidelities(self) -> list[DataFidelity]:
        return list(self._given) if isinstance(self._given, (list, tuple)) else []

    def source(self, i: int) -> Any:
        """The data fidelity of operator ``i`` as given (a factory for factories), on the driver."""
        return self._source(i)

    # ------------------------------------------------------------------ placement
    def _check_physics(self, physics: Any) -> DistributedPhysics:
        if not isinstance(physics, DistributedPhysics):
            raise TypeError(
                "physics must be a daskrecon DistributedPhysics; distribute it first: "
                f"dphys = dr.distribute(physics, ctx) (got {type(physics).__name__})"
            )
        if self.num_operators is not None and physics.num_operators != self.num_operators:
            raise ValueError(
                f"this data fidelity has {self.num_operators} operators but physics has {physics.num_operators}"
            )
        one_context(data_fidelity=self.ctx, physics=physics.ctx)
        return physics

    def objects_for(self, physics: DistributedPhysics) -> ObjectSet:
        """The fidelities, built on the workers holding the operators, reused while the physics is."""
        if self._placed is not None and self._placed[0] is physics:
            return self._placed[1]
        given, n = self._given, physics.num_operators
        if isinstance(given, DataFidelity):
            objects = ObjectSet(self.ctx, given, n, shared=True)
        elif isinstance(given, (list, tuple)):
            objects = ObjectSet(self.ctx, list(given), n)
        else:
            objects = ObjectSet(self.ctx, given, n, factory_kwargs=self.factory_kwargs)
        physics.placement.register(objects)
        self._placed = (physics, objects)
        return objects

    def _map(self, fn: Callable, x: Any, y: Any, physics: DistributedPhysics, kwargs: dict,
             shared: tuple = ()) -> list[Future]:
        """One task ``fn(A_i, d_i, x, y_i, i, kwargs, *shared)`` per operator, on its worker."""
        n = physics.num_operators
        return physics.placement.map(
            fn, objects=[physics.objects, self.objects_for(physics)],
            per_op=[[physics.place_x(x)] * n, physics.place_y(y), list(range(n)), [kwargs] * n], shared=shared,
        )

    def _run(self, fn: Callable, x: Any, y: Any, physics: Any, kwargs: dict) -> tuple[Future, dict]:
        """The tree sum of ``fn(A_i, d_i, x, y_i, i, kwargs)`` over operators, and labels of its tasks."""
        physics = self._check_physics(physics)
        futs = self._map(fn, x, y, physics, kwargs)
        return physics.placement.reduce(futs), physics.placement.labels(futs)

    def _gather(self, total: Future, labels: dict, what: str) -> torch.Tensor:
        return gather_tensors(self.ctx.client, [total], self.ctx.device, what, labels=labels,
                              stall_timeout=self.ctx.stall_timeout)[0]

    def _scale(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t / n if self.reduction == "mean" else t

    # ------------------------------------------------------------------ public
    def fn(self, x: torch.Tensor, y: Any, physics: DistributedPhysics, gather: bool = True, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``Σ_i d_i(A_i x, y_i)`` per batch element, shape ``(B,)``.

        Parameters
        ----------
        x : (B, C, ...) torch.Tensor
        y : TensorList or DistributedMeasurements
            One measurement per operator, in operator order.
        physics : DistributedPhysics
        gather : bool
            Kept for deepinv compatibility; the driver always receives the full sum.
        """
        if isinstance(x, da.Array):
            return self._chunked("fn", x, y, physics, kwargs)
        if needs_grad(x, *_measurements(y)):
            return fidelity_fn(self, x, y, physics, **kwargs)
        total, labels = self._run(fidelity_tasks.fidelity_fn_op, x, y, physics, kwargs)
        return self._scale(self._gather(total, labels, "data fidelity fn"), physics.num_operators)

    __call__ = fn

    def grad(self, x: torch.Tensor, y: Any, physics: DistributedPhysics, gather: bool = True, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``Σ_i (∂A_i/∂x)ᵀ ∇d_i(A_i x, y_i)``, shape of ``x``."""
        if isinstance(x, da.Array):
            return self._chunked("grad", x, y, physics, kwargs)
        if needs_grad(x, *_measurements(y)):
            return fidelity_grad(self, x, y, physics, **kwargs)
        total, labels = self._run(fidelity_tasks.fidelity_grad_op, x, y, physics, kwargs)
        return self._scale(self._gather(total, labels, "data fidelity grad"), physics.num_operators)

    def hessian_vector(self, x: torch.Tensor, y: Any, physics: DistributedPhysics, v: torch.Tensor,
                       **kwargs: Any) -> torch.Tensor:
        """``∇²f(x) v = Σ_i ∇²_x d_i(A_i x, y_i) v``: per operator by autograd on its worker, summed along the tree.

        The backward of :meth:`grad` (for ``L2``: ``AᵀA v / σ²``); also what a Newton-type
        or Gauss-Newton solver needs.
        """
        physics = self._check_physics(physics)
        futs = self._map(fidelity_tasks.fidelity_hvp_op, x, y, physics, kwargs, shared=(physics.place_x(v, "v"),))
        total = self._gather(physics.placement.reduce(futs), physics.placement.labels(futs), "data fidelity "
                             "Hessian-vector product")
        return self._scale(total, physics.num_operators)

    def measurement_vjp(self, kind: str, x: torch.Tensor, y: Any, physics: DistributedPhysics, g: torch.Tensor,
                        **kwargs: Any) -> list[torch.Tensor]:
        """The vector-Jacobian products of :meth:`fn` (``kind="fn"``) or :meth:`grad` (``kind="grad"``)
        with respect to each measurement ``y_i``, per operator on its worker.

        The backward of ``fn`` / ``grad`` in ``y`` (for ``L2``: ``g·(y_i − A_i x)/σ²`` and
        ``−A_i g/σ²``); one ``y_i``-shaped tensor per operator, in operator order.
        """
        if kind not in ("fn", "grad"):
            raise ValueError(f"kind must be 'fn' or 'grad', got {kind!r}")
        physics = self._check_physics(physics)
        futs = self._map(fidelity_tasks.fidelity_y_vjp_op, x, y, physics, kwargs,
                         shared=(kind, physics.place_x(g, "g")))
        outs = gather_tensors(self.ctx.client, futs, self.ctx.device, "data fidelity gradient with respect to y",
                              labels=physics.placement.labels(futs), stall_timeout=self.ctx.stall_timeout)
        return [self._scale(t, physics.num_operators) for t in outs]

    def _chunked(self, method: str, x: da.Array, y: Any, physics: Any, kwargs: dict) -> da.Array:
        """``fn`` / ``grad`` on a dask array, lazily, as one graph (:mod:`daskrecon.engine.iteration`): chunk by
        chunk for chunk-wise operators with pixel-wise distances, whole on their worker for the others."""
        physics = self._check_physics(physics)
        n = physics.num_operators
        if kwargs:
            raise TypeError(f"fidelity options {sorted(kwargs)} apply to tensors only; pass x as a tensor")
        ys = [y[i] for i in range(len(y))] if hasattr(y, "__len__") and not isinstance(y, torch.Tensor) else [y]
        if len(ys) != n:
            raise MeasurementError(f"y has {len(ys)} entries but the physics has {n} operators")
        ys = [as_dask(v, f"y[{i}]") for i, v in enumerate(ys)]
        seen = seen_inputs(physics.ctx, {"x": x, **{f"y[{i}]": v for i, v in enumerate(ys)}})  # else zeros
        x, ys = seen.pop("x"), list(seen.values())
        problem = plan_terms(physics, self, ys, x)
        if method == "grad":
            grad, _ = graph.gradient(problem, x)
            return grad * np.asarray(problem.scale, dtype=grad.dtype) if problem.scale != 1.0 else grad
        return graph.batch_values(problem, x) * problem.scale

    def prox(self, x: torch.Tensor, y: Any, physics: DistributedPhysics, *args: Any, gamma: float = 1.0, **kwargs: Any) -> torch.Tensor:
        """Proximal operator of a single shared fidelity on the whole stack.

        Delegates to the fidelity's own ``prox`` with the distributed physics as a
        ``LinearPhysics`` (for ``L2``: ``physics.prox_l2``, a conjugate gradient whose
        every iteration is one round of per-operator tasks).
        """
        physics = self._check_physics(physics)
        shared = self.source(0)
        if not isinstance(shared, DataFidelity) or any(self.source(i) is not shared for i in range(physics.num_operators)):
            raise NotImplementedError("prox is defined for a single data fidelity shared by all operators")
        physics.require_linear("prox")
        if self.reduction == "mean":
            gamma = gamma / physics.num_operators
        if type(shared).prox is L1.prox:
            return _l1_prox(shared, x, y, physics, gamma=gamma, **kwargs)
        if type(shared).prox in (DataFidelity.prox, Potential.prox):
            # no closed form (PoissonLikelihood...): deepinv's gradient descent on γ f(u) + ½‖u − x‖², as its
            # StackedPhysicsDataFidelity runs it, with this stack's gradient (the shared fidelity's own grad
            # would apply its distance to the list of measurements at once, and fail)
            mean = self.reduction == "mean"
            return Potential.prox(self, x, y, physics, *args, gamma=gamma * physics.num_operators if mean else gamma,
                                  **kwargs)
        return shared.prox(x, y, physics, *args, gamma=gamma, **kwargs)

    def __repr__(self) -> str:
        return f"DistributedDataFidelity(num_operators={self.num_operators}, reduction={self.reduction!r})"


def _l1_prox(fidelity: L1, x: torch.Tensor, y: Any, physics: DistributedPhysics, *, gamma: float,
             stepsize: float | None = None, crit_conv: float = 1e-5, max_iter: int = 100) -> torch.Tensor:
    """``argmin_u γ Σ_i ‖A_i u − y_i‖₁ + ½‖u − x‖²`` by deepinv's dual forward-backward, on the stack.

    deepinv's ``L1.prox`` starts its dual variable from ``x``, which lives in the measurement space only for
    one square operator (on a stack it fails: ``A_adjoint`` of an image); here it starts from zero
    measurements, one per operator, and each proximal step of the ℓ1 distance is taken entry by entry.
    Each iteration is one ``A_adjoint`` and one ``A`` on the workers.
    """
    ys = [y[i] for i in range(len(y))] if isinstance(y, (TensorList, list, tuple)) else [y]
    step = 1.0 / float(physics.compute_sqnorm(x)) if stepsize is None else stepsize
    u = [torch.zeros_like(v) for v in ys]
    for it in range(max_iter):
        at = physics.A(x - physics.A_adjoint(TensorList(u)))
        u_ = [ui + step * at[i] for i, ui in enumerate(u)]
        new = [ui - step * fidelity.d.prox(ui / step, yi, gamma=gamma / step) for ui, yi in zip(u_, ys)]
        change = sum(float((a - b).pow(2).sum()) for a, b in zip(new, u)) ** 0.5
        size = sum(float(a.pow(2).sum()) for a in new) ** 0.5
        u = new
        if change / (size + 1e-12) < crit_conv and it > 2:
            break
    return x - physics.A_adjoint(TensorList(u))
