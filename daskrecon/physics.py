"""`DistributedPhysics` and `DistributedLinearPhysics`: a stack of operators, one per task.

Operator ``i`` is built once, on the worker that owns it, and stays there as the
result of its build task. Every method submits one task per operator next to it,
then either gathers the per-operator results in operator order or sums them on the
workers along a tree fixed by operator index (:mod:`daskrecon.reduction`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np
import torch
from deepinv.physics import LinearPhysics, Physics
from deepinv.utils import TensorList
from distributed import Future

from daskrecon import _worker
from daskrecon._arrays import as_dask, as_numpy, gather_arrays, gather_one, gather_tensors, place, sum_in_order
from daskrecon.context import DistributedContext
from daskrecon.errors import LinearityError, MeasurementError
from daskrecon.measurements import DistributedMeasurements
from daskrecon.reduction import tree_reduce

__all__ = [
    "DistributedLinearPhysics",
    "DistributedPhysics",
    "DistributedStackedLinearPhysics",
    "DistributedStackedPhysics",
]

GATHER_STRATEGIES = ("naive", "concatenated", "broadcast")
_REDUCE_OPS = ("sum", "mean")

Factory = Callable[[int, torch.device, "dict | None"], Physics]


def _is_chunked(y: Any) -> bool:
    return isinstance(y, (list, tuple)) and len(y) > 0 and all(isinstance(v, da.Array) for v in y)


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
        map (:mod:`daskrecon.operators`: circular blurs by FFT). Default True.

    Notes
    -----
    ``gather=False`` keeps deepinv's single-process return types (a ``list`` rather
    than a ``TensorList`` for per-operator results): the driver is the only rank and
    sees every operator. Non-linear operators support :meth:`A`, :meth:`forward` and
    :meth:`A_vjp` (by autograd on the worker).
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
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)} for {type(self).__name__}")
        super().__init__()
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
        self.owners = ctx.owners(num_operators)
        self._token = uuid.uuid4().hex[:8]
        sources = [factory] * num_operators if callable(factory) and not isinstance(factory, Physics) else list(factory)
        self._sources = sources
        client = ctx.client
        self._operators: list[Future] | None = None
        if all(isinstance(s, Physics) for s in sources):
            self.linear = [isinstance(s, LinearPhysics) for s in sources]
        else:
            described = gather_arrays(client, [client.submit(_worker.describe, op, pure=False) for op in self.operators],
                                      "physics factory")
            self.linear = [d["linear"] for d in described]
        self._y_cache: tuple[Any, tuple, DistributedMeasurements] | None = None
        self._local: list | None = None
        self._check_linearity()

    def _check_linearity(self) -> None:
        """Hook for the linear subclass."""

    @property
    def operators(self) -> list[Future]:
        """One future per operator, built on its owner worker.

        Operators given as objects are sent at their first per-operator call, not at
        construction: an out-of-core run, which uses only their chunk-wise forms, never
        puts a whole operator (an image-sized ``Inpainting`` mask, say) on a worker.
        Factories run at construction (their results say whether they are linear).
        """
        if self._operators is None:
            client = self.ctx.client
            self._operators = [
                client.submit(
                    _worker.build_object, src, i, self.factory_kwargs, self.ctx.device_mode, self.fast_operators,
                    key=f"physics-{self._token}-{i}", workers=[w], allow_other_workers=True, pure=False,
                )
                for i, (src, w) in enumerate(zip(self._sources, self.owners))
            ]
        return self._operators

    # ------------------------------------------------------------------ placement
    def _place_x(self, x: torch.Tensor | Future, name: str = "x") -> Future:
        if isinstance(x, Future):
            return x
        if isinstance(x, TensorList):
            raise TypeError(f"{name} must be a single torch.Tensor (an image), got a TensorList")
        return place(self.ctx.client, as_numpy(x, name))

    def _place_y(self, y: Any, name: str = "y") -> list[Future]:
        """Futures of ``y_1 … y_N`` on their owners; a TensorList is placed once and reused."""
        n = self.num_operators
        if isinstance(y, DistributedMeasurements):
            if len(y) != n:
                raise MeasurementError(f"{name} has {len(y)} measurements but the physics has {n} operators")
            return y.futures
        source = y
        if isinstance(y, TensorList):
            y = [y[i] for i in range(len(y))]
        elif isinstance(y, torch.Tensor):
            if n != 1:
                raise MeasurementError(
                    f"{name} is a single tensor but the physics has {n} operators; "
                    "pass a TensorList with one entry per operator"
                )
            y = [y]
        if not isinstance(y, (list, tuple)):
            raise TypeError(f"{name} must be a TensorList, a list of tensors or DistributedMeasurements, "
                            f"got {type(y).__name__}")
        if len(y) != n:
            raise MeasurementError(
                f"{name} has {len(y)} entries but the physics has {n} operators; "
                f"give one measurement per operator, in operator order"
            )
        if all(isinstance(t, Future) for t in y):
            return list(y)
        key = tuple((id(t), getattr(t, "_version", 0)) for t in y)
        if self._y_cache is not None and self._y_cache[0] is source and self._y_cache[1] == key:
            return self._y_cache[2].futures
        placed = DistributedMeasurements(self.ctx, y, owners=self.owners)
        self._y_cache = (source, key, placed)
        return placed.futures

    def _submit_each(self, fn: Callable, *args: Any, per_op: Sequence[Sequence[Any]] = ()) -> list[Future]:
        """One task ``fn(op_i, *per_op[.][i], *args)`` per operator, next to operator ``i``."""
        client = self.ctx.client
        return [
            client.submit(fn, op, *[p[i] for p in per_op], *args, workers=[w], allow_other_workers=True, pure=False)
            for i, (op, w) in enumerate(zip(self.operators, self.owners))
        ]

    def _finish(self, futures: list[Future], gather: bool, reduce_op: str | None, what: str):
        """Per-operator futures → TensorList / list, or their tree sum (or mean)."""
        if reduce_op is None:
            tensors = gather_tensors(self.ctx.client, futures, self.ctx.device, what)
            return TensorList(tensors) if gather else tensors
        if reduce_op not in _REDUCE_OPS:
            raise ValueError(f"reduce_op must be None, 'sum' or 'mean', got {reduce_op!r}")
        total = gather_one(self.ctx.client, self._reduce(futures), self.ctx.device, what)
        return total / self.num_operators if reduce_op == "mean" else total

    def _reduce(self, futures: list[Future]) -> Future:
        return tree_reduce(self.ctx.client, futures, self.ctx.fan_in)

    def _require_linear(self, method: str) -> None:
        bad = [i for i, lin in enumerate(self.linear) if not lin]
        if bad:
            raise LinearityError(
                f"{method} needs linear operators, but operators {bad} are not LinearPhysics; "
                "use A_vjp (autograd) or a data fidelity gradient instead"
            )

    def _next_seeds(self) -> list[int]:
        # Drawn on the driver so noise depends on the driver's seed, not on the workers.
        base = int(torch.randint(0, 2**62, (1,)).item())
        return [base + i for i in range(self.num_operators)]

    # ------------------------------------------------------------------ forward model
    def A(self, x: torch.Tensor, gather: bool = True, reduce_op: str | None = None, **kwargs: Any):
        """``[A_1 x, …, A_N x]`` in operator order (``reduce_op`` sums or averages them).

        ``x`` may be a (B, C, H, W) dask array: see :meth:`local_forms`.
        """
        if isinstance(x, da.Array):
            return self._chunked("A", x, reduce_op)
        futs = self._submit_each(_worker.forward_op, self._place_x(x), kwargs, None, False)
        return self._finish(futs, gather, reduce_op, f"A(x), x of shape {tuple(x.shape)}: operator")

    def forward(self, x: torch.Tensor, gather: bool = True, reduce_op: str | None = None, **kwargs: Any):
        """Noisy measurements ``[N_1(A_1 x), …]``; noise seeded per operator from the driver's RNG."""
        n = self.num_operators
        futs = self._submit_each(_worker.forward_op, per_op=[[self._place_x(x)] * n, [kwargs] * n,
                                                            self._next_seeds(), [True] * n])
        return self._finish(futs, gather, reduce_op, "forward(x): operator")

    def A_vjp(self, x: torch.Tensor, v: Any, gather: bool = True, reduce_op: str | None = "sum"):
        """``Σ_i (∂A_i/∂x)ᵀ v_i`` (autograd for non-linear operators)."""
        futs = self._submit_each(_worker.vjp_op, per_op=[[self._place_x(x)] * self.num_operators,
                                                        self._place_y(v, "v")])
        return self._finish(futs, gather, reduce_op, "A_vjp: operator")

    # ------------------------------------------------------------------ linear operations
    def A_adjoint(self, y: Any, gather: bool = True, reduce_op: str | None = "sum", **kwargs: Any):
        """``Σ_i A_iᵀ y_i`` (``reduce_op=None``: the per-operator ``A_iᵀ y_i``)."""
        self._require_linear("A_adjoint")
        if _is_chunked(y):
            return self._chunked("A_adjoint", list(y), reduce_op)
        futs = self._submit_each(_worker.adjoint_op, kwargs, per_op=[self._place_y(y)])
        return self._finish(futs, gather, reduce_op, "A_adjoint(y): operator")

    def A_adjoint_A(self, x: torch.Tensor, gather: bool = True, reduce_op: str | None = "sum", **kwargs: Any):
        """``Σ_i A_iᵀ A_i x``."""
        self._require_linear("A_adjoint_A")
        if isinstance(x, da.Array):
            return self._chunked("A_adjoint_A", x, reduce_op)
        futs = self._submit_each(_worker.adjoint_A_op, kwargs, per_op=[[self._place_x(x)] * self.num_operators])
        return self._finish(futs, gather, reduce_op, "A_adjoint_A(x): operator")

    def A_A_adjoint(self, y: Any, gather: bool = True, **kwargs: Any):
        """``[A_1 (Aᵀ y), …, A_N (Aᵀ y)]`` with the full adjoint ``Aᵀ y = Σ_i A_iᵀ y_i``."""
        self._require_linear("A_A_adjoint")
        adj = self._reduce(self._submit_each(_worker.adjoint_op, kwargs, per_op=[self._place_y(y)]))
        futs = self._submit_each(_worker.forward_op, adj, kwargs, None, False)
        return self._finish(futs, gather, None, "A_A_adjoint(y): operator")

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
        self._require_linear("A_dagger")
        if not local_only:
            return LinearPhysics.A_dagger(self, y, solver=solver, max_iter=max_iter, tol=tol, verbose=verbose, **kwargs)
        opts = {k: v for k, v in dict(solver=solver, max_iter=max_iter, tol=tol).items() if v is not None}
        futs = self._submit_each(_worker.dagger_op, {**opts, **kwargs}, per_op=[self._place_y(y)])
        return self._finish(futs, gather, "mean", "A_dagger(y): operator")

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
        power method on the distributed ``AᵀA`` (exact).
        """
        self._require_linear("compute_sqnorm")
        if not local_only:
            return LinearPhysics.compute_sqnorm(self, x0, max_iter=max_iter, tol=tol, verbose=verbose, **kwargs)
        futs = self._submit_each(_worker.sqnorm_op, max_iter, tol, per_op=[[self._place_x(x0, "x0")] * self.num_operators])
        values = gather_arrays(self.ctx.client, futs, "compute_sqnorm: operator")
        total = torch.tensor(float(np.sum(np.asarray(values, dtype=np.float64))), device=self.ctx.device)
        if verbose:
            print(f"Computed local norm upper bound: ||A||_2^2 <= {total.item():.4f}")
        return total

    # ------------------------------------------------------------------ chunk-wise (dask arrays)
    def local_forms(self) -> list:
        """The chunk-wise form of each operator (:func:`daskrecon.local.local_form`), ``None`` where global.

        When every operator is local, :meth:`A`, :meth:`A_adjoint` and :meth:`A_adjoint_A`
        take and return dask arrays lazily, chunk by chunk (``map_overlap``), so an image
        larger than the cluster's memory streams from and to Zarr. Otherwise a dask array
        is assembled and goes through the per-operator tasks.
        """
        if self._local is None:
            from daskrecon.local import local_form

            if all(isinstance(s, Physics) for s in self._sources):
                self._local = [local_form(s) for s in self._sources]
            else:
                client = self.ctx.client
                futs = [client.submit(_worker.local_form_of, op, pure=False) for op in self.operators]
                self._local = gather_arrays(client, futs, "local form of operator")
        return self._local

    @property
    def chunkable(self) -> bool:
        """Whether every operator has a chunk-wise form."""
        return all(f is not None for f in self.local_forms())

    def _chunked(self, method: str, arg: Any, reduce_op: str | None):
        if reduce_op not in (None, *_REDUCE_OPS):
            raise ValueError(f"reduce_op must be None, 'sum' or 'mean', got {reduce_op!r}")
        n = self.num_operators
        if method == "A_adjoint" and len(arg) != n:
            raise MeasurementError(f"y has {len(arg)} entries but the physics has {n} operators")
        if not self.chunkable:
            return self._assembled(method, arg, reduce_op)
        forms = self.local_forms()
        if method == "A":
            out = [f.apply(arg) for f in forms]
        elif method == "A_adjoint":
            out = [f.adjoint(as_dask(v, f"y[{i}]")) for i, (f, v) in enumerate(zip(forms, arg))]
        else:
            out = [f.adjoint(f.apply(arg), arg.chunks) for f in forms]
        if reduce_op is None:
            return out
        total = sum_in_order(out)
        return total / n if reduce_op == "mean" else total

    def _assembled(self, method: str, arg: Any, reduce_op: str | None):
        """A global operator on a dask array: compute it, use the per-operator tasks, wrap the result."""
        if method == "A_adjoint":
            tensors = TensorList([torch.from_numpy(np.asarray(as_dask(v, f"y[{i}]").compute())) for i, v in enumerate(arg)])
            res = self.A_adjoint(tensors, reduce_op=reduce_op)
        else:
            res = getattr(self, method)(torch.from_numpy(np.asarray(arg.compute())), reduce_op=reduce_op)
        if isinstance(res, torch.Tensor):
            return da.from_array(res.cpu().numpy())
        return [da.from_array(t.cpu().numpy()) for t in res]

    # ------------------------------------------------------------------ misc
    def fingerprint(self) -> str:
        """A hash of what defines the operators (their state and factory arguments), stable across processes."""
        from daskrecon.checkpoint import fingerprint

        return fingerprint((self._sources, self.factory_kwargs, self.fast_operators))

    def __len__(self) -> int:
        return self.num_operators

    def extra_repr(self) -> str:
        return f"num_operators={self.num_operators}, workers={len(set(self.owners))}, sharding={self.ctx.sharding!r}"


class DistributedLinearPhysics(DistributedPhysics, LinearPhysics):
    """Linear stack ``A = [A_1; …; A_N]``; usable wherever deepinv expects a ``LinearPhysics``.

    Adds :meth:`A_adjoint`, :meth:`A_adjoint_A`, :meth:`A_A_adjoint`,
    :meth:`A_dagger` and :meth:`compute_sqnorm`; see :class:`DistributedPhysics` for the
    parameters. Every operator must be a ``deepinv.physics.LinearPhysics``.
    """

    def _check_linearity(self) -> None:
        bad = [i for i, lin in enumerate(self.linear) if not lin]
        if bad:
            raise LinearityError(
                f"operators {bad} are not LinearPhysics; a DistributedLinearPhysics needs linear operators "
                "(use DistributedPhysics / distribute(..., type_object='physics') for non-linear ones)"
            )


DistributedStackedPhysics = DistributedPhysics
DistributedStackedLinearPhysics = DistributedLinearPhysics
