"""Algorithms as step rules on the engine's loop (:mod:`daskrecon.engine.loop`).

A step rule names its state (the arrays the loop keeps, in cluster memory or Zarr, and
checkpoints together), builds the initial state, and builds one iteration as a lazy graph:
the new state, the data-fidelity value at the start of the iteration, and the iteration's
metrics. The loop does everything else once: submission, progress, spans, history,
callbacks, checkpoints and resume. A new algorithm is one subclass.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, ClassVar

import dask.array as da
import numpy as np
from dask.delayed import Delayed, delayed

from daskrecon.engine import iteration as graph
from daskrecon.engine import linsolve
from daskrecon.engine.problem import Problem
from daskrecon.planning.chunking import zarr_aligned
from daskrecon.planning.schedules import as_schedule, describe, value_at
from daskrecon.planning.subsets import epoch_order, partition, subset_at
from daskrecon.runtime import graphs
from daskrecon.runtime.arrays import persist_fresh
from daskrecon.runtime.halos import read_array
from daskrecon.runtime.waiting import compute
from daskrecon.tasks import fidelity as fidelity_tasks
from daskrecon.tasks import iteration as iteration_tasks
from daskrecon.tasks import poisson as poisson_tasks

__all__ = ["ADMM", "ALGORITHMS", "BSREM", "FISTA", "FISTARED", "HQS", "MLEM", "OSEM", "RED", "SIRT", "SVRG", "OSPnP", "PnP", "StepRule",
           "step_rule"]


class StepRule:
    """One algorithm: its state, its start, its iteration (see the module docstring).

    Parameters
    ----------
    step_size : float or sequence of float
        ``τ``: one for every iteration, or one per iteration (deepinv's ``params_algo`` lists:
        ``step_size[k]`` at iteration ``k``; :mod:`daskrecon.planning.schedules`).
    """

    name: ClassVar[str] = ""
    #: Arrays of the state, ``"x"`` (the iterate) first.
    state: ClassVar[tuple[str, ...]] = ("x",)
    #: State arrays that :meth:`step` passes on unchanged (sensitivities, column sums): the loop
    #: writes them into both checkpoint slots (a run's first two commits), then never again.
    constant: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`step` only builds a graph (computes nothing, keeps no driver state that a
    #: later step reads): the loop may then submit iteration k + 1 before iteration k's metrics
    #: are back (:mod:`daskrecon.engine.loop`).
    pipelined: ClassVar[bool] = False
    #: Whether the rule takes a step size (else none is computed for it).
    uses_step_size: ClassVar[bool] = True
    #: Whether the rule runs without a denoiser (its prior is optional).
    prior_optional: ClassVar[bool] = False

    def __init__(self, step_size: float | Sequence[float]) -> None:
        self.step_sizes = as_schedule(step_size, "step_size")
        self.step_size = self.step_sizes[0]

    def at(self, k: int) -> StepRule:
        """Set :attr:`step_size` to iteration ``k``'s (from 0; a schedule's ``k``-th value); returns ``self``."""
        self.step_size = value_at(self.step_sizes, k)
        return self

    def settings(self) -> dict:
        """What defines the algorithm, for the checkpoint's problem record."""
        return {"algorithm": self.name, "step_size": describe(self.step_sizes)}

    def check(self, problem: Problem) -> None:
        """Raise if the algorithm cannot run on ``problem`` (before anything is computed)."""

    def prepare(self, problem: Problem, workspace: linsolve.Workspace) -> None:
        """Called by the loop before the first iteration: the workspace for solvers inside a step."""
        self.workspace = workspace

    def report(self) -> dict:
        """Extra entries for the history row of the iteration just built (e.g. inner solver iterations)."""
        return {}

    def reduced_axes(self, problem: Problem) -> dict[str, tuple[int, ...]]:
        """State arrays kept with length 1 along some axes (constant along them, broadcast by :meth:`step`).

        ``{name: axes}``; the others have ``x``'s shape. A sensitivity ``Σ A_iᵀ1`` of slicewise operators
        is one slice repeated along the depth: kept (and checkpointed) as that slice.
        """
        return {}

    def initial(self, problem: Problem) -> da.Array | None:
        """The default ``x0`` when none is given; ``None``: the engine's ``Aᵀy / N``."""
        return None

    def start(self, problem: Problem, x0: da.Array) -> dict[str, da.Array]:
        """The initial state from ``x0``."""
        return {"x": x0}

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        """Iteration ``iteration + 1``, lazily: ``(new state, f at the start, metrics of x → x_new)``.

        ``iteration`` counts the iterations done before this one (0 for the first; a resumed
        run continues the count), for rules whose coefficients depend on it.
        """
        raise NotImplementedError


class PnP(StepRule):
    """Plug-and-play proximal gradient: ``x ← D_σ(x − τ ∇f(x))``."""

    name = "pnp"
    pipelined = True

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x = state["x"]
        tag = graphs.token("pnp")
        grad, value = graph.gradient(problem, x)
        z = da.map_blocks(iteration_tasks.pnp_step_block, x, grad, self.step_size, problem.scale, dtype=x.dtype,
                          name=f"step-{tag}")
        new = graph.denoise(problem, z, f"denoise-{tag}")
        return {"x": new}, value, graph.metrics(problem, new, x, f"metrics-{tag}")


class RED(StepRule):
    """Regularization by denoising: ``x ← x − τ (∇f(x) + λ (x − D_σ(x)))``.

    Parameters
    ----------
    step_size : float
    red_weight : float
        ``λ``.
    """

    name = "red"
    pipelined = True

    def __init__(self, step_size: float, red_weight: float = 1.0) -> None:
        super().__init__(step_size)
        self.red_weight = float(red_weight)

    def settings(self) -> dict:
        return {**super().settings(), "red_weight": repr(self.red_weight)}

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x = state["x"]
        tag = graphs.token("red")
        grad, value = graph.gradient(problem, x)
        d = graph.denoise(problem, x, f"denoise-{tag}")
        new = da.map_blocks(iteration_tasks.red_step_block, x, grad, d, self.step_size, problem.scale,
                            self.red_weight, dtype=x.dtype, name=f"step-{tag}")
        return {"x": new}, value, graph.metrics(problem, new, x, f"metrics-{tag}")


class FISTA(StepRule):
    """Accelerated proximal gradient with a plug-and-play prior (deepinv's ``FISTA`` iteration).

    ``u = z − τ ∇f(z)``, ``x' = D_σ(u)``, ``z' = x' + α_k (x' − x)`` with
    ``α_k = (k + a − 1) / (k + a)``, ``k`` the iterations done before this one. The state is
    ``x`` and the extrapolated point ``z`` (both checkpointed: a resumed run continues the
    momentum exactly); the data-fidelity value reported is ``f(z)``, the one the gradient
    pass computes.

    Parameters
    ----------
    step_size : float
    a : float
        Momentum parameter, ``> 2`` (deepinv's default 3).
    """

    name = "fista"
    state = ("x", "z")
    pipelined = True

    def __init__(self, step_size: float, a: float = 3.0) -> None:
        super().__init__(step_size)
        if not a > 2:
            raise ValueError(f"FISTA's momentum parameter a must be > 2, got {a!r}")
        self.a = float(a)

    def settings(self) -> dict:
        return {**super().settings(), "a": repr(self.a)}

    def start(self, problem: Problem, x0: da.Array) -> dict[str, da.Array]:
        return {"x": x0, "z": x0}

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x, z = state["x"], state["z"]
        tag = graphs.token(self.name)
        grad, value = graph.gradient(problem, z)
        new = self._point(problem, z, grad, tag)
        alpha = (iteration + self.a - 1) / (iteration + self.a)
        z_new = da.map_blocks(iteration_tasks.momentum_block, new, x, alpha, dtype=new.dtype, name=f"momentum-{tag}")
        return {"x": new, "z": z_new}, value, graph.metrics(problem, new, x, f"metrics-{tag}")

    def _point(self, problem: Problem, z: da.Array, grad: da.Array, tag: str) -> da.Array:
        """The new iterate from the extrapolated point: ``D_σ(z − τ∇f(z))``."""
        u = da.map_blocks(iteration_tasks.pnp_step_block, z, grad, self.step_size, problem.scale, dtype=z.dtype,
                          name=f"step-{tag}")
        return graph.denoise(problem, u, f"denoise-{tag}")


class FISTARED(FISTA):
    """Accelerated gradient descent on ``f + λ·RED`` (FISTA's momentum with a RED prior).

    ``x' = z − τ (∇f(z) + λ (z − D_σ(z)))``, ``z' = x' + α_k (x' − x)``: the RED gradient step of
    :class:`RED` taken at the extrapolated point. State ``x`` and ``z``, as :class:`FISTA`.

    Parameters
    ----------
    step_size : float
    red_weight : float
        ``λ``.
    a : float
        Momentum parameter, ``> 2``.
    """

    name = "fista-red"

    def __init__(self, step_size: float, red_weight: float = 1.0, a: float = 3.0) -> None:
        super().__init__(step_size, a)
        self.red_weight = float(red_weight)

    def settings(self) -> dict:
        return {**super().settings(), "red_weight": repr(self.red_weight)}

    def _point(self, problem: Problem, z: da.Array, grad: da.Array, tag: str) -> da.Array:
        """RED's gradient step at the extrapolated point: ``z − τ (∇f(z) + λ (z − D_σ(z)))``."""
        d = graph.denoise(problem, z, f"denoise-{tag}")
        return da.map_blocks(iteration_tasks.red_step_block, z, grad, d, self.step_size, problem.scale,
                             self.red_weight, dtype=z.dtype, name=f"step-{tag}")


class _ProxSplitting(StepRule):
    """Shared by HQS and ADMM: the data term's prox by conjugate gradient on the cluster."""

    def __init__(self, step_size: float, cg_max_iter: int = 50, cg_tol: float = 1e-5,
                 prox_solver: str = "auto") -> None:
        super().__init__(step_size)
        if prox_solver not in linsolve.PROX_SOLVERS:
            raise ValueError(f"prox_solver must be one of {linsolve.PROX_SOLVERS}, got {prox_solver!r}")
        self.prox_solver = prox_solver
        if not isinstance(cg_max_iter, int) or cg_max_iter < 1:
            raise ValueError(f"cg_max_iter must be a positive int, got {cg_max_iter!r}")
        if not 0 <= cg_tol < 1:
            raise ValueError(f"cg_tol must be in [0, 1), got {cg_tol!r}")
        self.cg_max_iter, self.cg_tol = cg_max_iter, float(cg_tol)
        self._info: linsolve.CGInfo | None = None

    def settings(self) -> dict:
        return {**super().settings(), "cg_max_iter": self.cg_max_iter, "cg_tol": repr(self.cg_tol),
                "prox_solver": self.prox_solver}

    def check(self, problem: Problem) -> None:
        linsolve.check_quadratic(problem, self.name)

    def report(self) -> dict:
        if self._info is None:
            return {}
        return {"cg_iterations": self._info.iterations, "cg_residual": self._info.relative_residual}

    def _prox(self, problem: Problem, v: da.Array, tag: str) -> tuple[da.Array, Delayed]:
        u, f_v, self._info = linsolve.prox_data(problem, v, self.step_size, self.workspace,
                                                max_iter=self.cg_max_iter, tol=self.cg_tol, solver=self.prox_solver)
        return u, delayed(float, pure=True)(f_v, dask_key_name=f"value-{tag}")


class HQS(_ProxSplitting):
    """Half-quadratic splitting (deepinv's ``HQS``): ``u = prox_{γf}(x)``, ``x' = D_σ(u)``.

    The data term's prox solves ``(I + γ Σ_i A_iᵀA_i / σ_i²) u = x + γ Σ_i A_iᵀy_i / σ_i²``
    (:func:`daskrecon.engine.linsolve.prox_data`): in closed form by one FFT when every operator is a
    circular convolution, subsampled or not, and the image's FFT fits a worker (``prox_solver="auto"``), else by
    conjugate gradient on the cluster: per-operator tasks next to their operators, the
    fixed-index tree, vectors in cluster memory or scratch Zarr. Needs an L2 data fidelity.
    The value reported is ``f(x)``.

    Parameters
    ----------
    step_size : float
        ``γ``.
    cg_max_iter, cg_tol : int, float
        Conjugate gradient: at most ``cg_max_iter`` iterations, until ``‖r‖ ≤ cg_tol ‖r₀‖``.
    prox_solver : {"auto", "cg", "fourier"}
        ``"fourier"`` requires circular convolutions (subsampled or not); ``"cg"`` always iterates.
    """

    name = "hqs"

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x = state["x"]
        tag = graphs.token("hqs")
        u, value = self._prox(problem, x, tag)
        new = graph.denoise(problem, u, f"denoise-{tag}")
        return {"x": new}, value, graph.metrics(problem, new, x, f"metrics-{tag}")


class ADMM(_ProxSplitting):
    """ADMM (deepinv's ``ADMM``, ``g_first=False``) with a plug-and-play prior.

    ``u = prox_{γf}(x − z)``, ``x' = D_σ(u + z)``, ``z' = z + β (u − x')``; the state is
    ``x`` and the scaled dual ``z`` (zeros at the start), both checkpointed. The data
    term's prox is the conjugate gradient of :class:`HQS`. The value reported is
    ``f(x − z)``, at the prox's input.

    Parameters
    ----------
    step_size : float
        ``γ``.
    beta : float
        Relaxation ``β > 0`` (deepinv's default 1).
    cg_max_iter, cg_tol : int, float
    """

    name = "admm"
    state = ("x", "z")

    def __init__(self, step_size: float, beta: float = 1.0, cg_max_iter: int = 50, cg_tol: float = 1e-5,
                 prox_solver: str = "auto") -> None:
        super().__init__(step_size, cg_max_iter, cg_tol, prox_solver)
        if not beta > 0:
            raise ValueError(f"ADMM's relaxation beta must be > 0, got {beta!r}")
        self.beta = float(beta)

    def settings(self) -> dict:
        return {**super().settings(), "beta": repr(self.beta)}

    def start(self, problem: Problem, x0: da.Array) -> dict[str, da.Array]:
        return {"x": x0, "z": da.zeros_like(x0)}

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x, z = state["x"], state["z"]
        tag = graphs.token("admm")
        v = da.map_blocks(iteration_tasks.axpy_block, x, z, -1.0, dtype=x.dtype, name=f"prox-point-{tag}")
        u, value = self._prox(problem, v, tag)
        p = da.map_blocks(iteration_tasks.axpy_block, u, z, 1.0, dtype=x.dtype, name=f"prior-point-{tag}")
        new = graph.denoise(problem, p, f"denoise-{tag}")
        z_new = da.map_blocks(iteration_tasks.dual_block, z, u, new, self.beta, dtype=x.dtype, name=f"dual-{tag}")
        return {"x": new, "z": z_new}, value, graph.metrics(problem, new, x, f"metrics-{tag}")


class _Stochastic(StepRule):
    """Shared by the subset methods: the partition and the seeded schedule (:mod:`daskrecon.planning.subsets`)."""

    def __init__(self, step_size: float, n_subsets: int, seed: int = 0) -> None:
        super().__init__(step_size)
        if not isinstance(n_subsets, int) or n_subsets < 1:
            raise ValueError(f"n_subsets must be a positive int, got {n_subsets!r}")
        self.n_subsets, self.seed = n_subsets, int(seed)
        self._subset: int | None = None

    def settings(self) -> dict:
        return {**super().settings(), "n_subsets": self.n_subsets, "seed": self.seed}

    def check(self, problem: Problem) -> None:
        partition(problem.num_operators, self.n_subsets)  # raises for more subsets than operators

    def report(self) -> dict:
        return {} if self._subset is None else {"subset": self._subset}

    def _subset_gradient(self, problem: Problem, x: da.Array, j: int) -> tuple[da.Array, Delayed, float]:
        members = partition(problem.num_operators, self.n_subsets)[j]
        g, value = graph.gradient(problem, x, members, kind=f"subset-{j}-gradient")
        return g, value, problem.num_operators / len(members)


class OSPnP(_Stochastic):
    """Ordered-subsets PnP: ``x ← D_σ(x − τ (N/|S_k|) ∇f_{S_k}(x))``, one operator subset per iteration.

    ``N`` operators in ``n_subsets`` interleaved subsets; each epoch visits every subset once,
    in an order drawn from ``(seed, epoch)`` (:func:`daskrecon.planning.subsets.subset_at`). An
    iteration costs ``1/n_subsets`` of a full gradient. The value reported is the subset's
    estimate ``(N/|S_k|) f_{S_k}(x)``; the history row names the subset.

    Parameters
    ----------
    step_size : float
    n_subsets : int
    seed : int
        The context's seed by default (:func:`daskrecon.reconstruct`).
    """

    name = "os-pnp"

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x = state["x"]
        tag = graphs.token("os-pnp")
        self._subset = j = subset_at(self.seed, iteration, self.n_subsets)
        g, value, weight = self._subset_gradient(problem, x, j)
        z = da.map_blocks(iteration_tasks.pnp_step_block, x, g, self.step_size, problem.scale * weight,
                          dtype=x.dtype, name=f"step-{tag}")
        new = graph.denoise(problem, z, f"denoise-{tag}")
        value = delayed(operator.mul, pure=True)(value, weight, dask_key_name=f"value-estimate-{tag}")
        return {"x": new}, value, graph.metrics(problem, new, x, f"metrics-{tag}")


class SVRG(_Stochastic):
    """Stochastic variance-reduced PnP over operator subsets (SVRG with a plug-and-play prox).

    An epoch is ``n_subsets + 1`` iterations: a full gradient at ``x``, which becomes the
    anchor ``x̃`` and its gradient ``μ``, then every subset once, in an order drawn from
    ``(seed, epoch)``, with the variance-reduced gradient ``w (∇f_S(x) − ∇f_S(x̃)) + μ``
    (``w = N/|S|``; two subset gradients per iteration).
    Then ``x ← D_σ(x − τ g)``. The state — ``x``, the anchor and ``μ`` — is checkpointed
    whole: a resume continues the epoch exactly.

    Parameters
    ----------
    step_size : float
    n_subsets : int
    seed : int
    """

    name = "svrg"
    state = ("x", "anchor", "mean_gradient")

    def start(self, problem: Problem, x0: da.Array) -> dict[str, da.Array]:
        return {"x": x0, "anchor": x0, "mean_gradient": da.zeros_like(x0)}

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x, anchor, mu = state["x"], state["anchor"], state["mean_gradient"]
        tag = graphs.token("svrg")
        m = self.n_subsets
        epoch, pos = divmod(iteration, m + 1)
        if pos == 0:  # an epoch starts: full gradient, new anchor
            self._subset = None
            g, value = graph.gradient(problem, x)
            z = da.map_blocks(iteration_tasks.pnp_step_block, x, g, self.step_size, problem.scale, dtype=x.dtype,
                              name=f"step-{tag}")
            anchor, mu = x, g
        else:
            self._subset = j = epoch_order(self.seed, epoch, m)[pos - 1]  # every subset once per epoch
            gx, value, weight = self._subset_gradient(problem, x, j)
            ga, _ = graph.gradient(problem, anchor, partition(problem.num_operators, m)[j],
                                   kind=f"subset-{j}-anchor-gradient")
            z = da.map_blocks(iteration_tasks.svrg_step_block, x, gx, ga, mu, self.step_size, problem.scale, weight,
                              dtype=x.dtype, name=f"step-{tag}")
            value = delayed(operator.mul, pure=True)(value, weight, dask_key_name=f"value-estimate-{tag}")
        new = graph.denoise(problem, z, f"denoise-{tag}")
        return ({"x": new, "anchor": anchor, "mean_gradient": mu}, value,
                graph.metrics(problem, new, x, f"metrics-{tag}"))


class _Variants(StepRule):
    """Shared by MLEM, OSEM and SIRT: the problem with other pixel-wise terms in its gradient pass.

    A variant replaces the fidelity (placed with the operators once, for whole-image operators)
    and the chunk-wise operators' distances; it is rebuilt when the loop hands another version
    of the problem (its inputs staged, its stager set).
    """

    def __init__(self, step_size: float) -> None:
        super().__init__(step_size)
        self._fidelities: dict[str, Any] = {}
        self._variants: dict[str, tuple[Problem, Problem]] = {}

    def check(self, problem: Problem) -> None:
        bad = [i for i, linear in enumerate(problem.physics.linear) if not linear]
        if bad:
            raise TypeError(f"{self.name} back-projects with A_iᵀ: operators {bad} are not linear")

    def _variant(self, problem: Problem, name: str, fidelity: Any, distance: Any) -> Problem:
        import dataclasses

        if name not in self._fidelities:  # the front's DistributedDataFidelity (no import up the layers)
            self._fidelities[name] = type(problem.fidelity)(problem.ctx, fidelity)
        cached = self._variants.get(name)
        if cached is None or cached[0] is not problem:
            cached = (problem, dataclasses.replace(problem, fidelity=self._fidelities[name],
                                                   distances=[distance] * problem.num_operators))
            self._variants[name] = cached
        return cached[1]

    def _sensitivity(self, problem: Problem, x0: da.Array, members: list[int] | None, name: str) -> da.Array:
        """``Σ_{i ∈ members} A_iᵀ1`` (all operators for ``None``), chunked like ``x0``.

        Along the axes where every member is the same (:meth:`Problem.invariant_axes`) it is
        computed and kept with length 1: one slice of a CT volume's sensitivity, not the volume
        (out of core, one array fewer read per iteration).
        """
        ones = self._variant(problem, "ones", poisson_tasks.OnesFidelity(), poisson_tasks.Ones())
        axes = problem.invariant_axes(members)
        if axes:  # the data never enter A_iᵀ1: y is not read
            shape, chunks = problem.reduced(axes)
            s, _ = graph.gradient(ones, da.ones(shape, chunks=chunks, dtype=x0.dtype), members, measured=False,
                                  kind=name)
            return s
        s, _ = graph.gradient(ones, x0, members, kind=name)
        return s


class MLEM(_Variants):
    """Maximum-likelihood expectation maximization (deepinv's ``MLEM``; Richardson–Lucy for blurs).

    ``x ← x ⊙ Σ_i A_iᵀ(y_i / max(A_i x, ε)) / max(s, ε)`` with the sensitivity ``s = Σ_i A_iᵀ1``
    — the multiplicative update that decreases the Poisson negative log-likelihood and keeps a
    positive start positive. Both sums are the engine's gradient pass with pixel-wise terms in
    place of the fidelity's (:mod:`daskrecon.tasks.poisson`): chunk by chunk for chunk-wise
    operators, whole on their workers otherwise, along the fixed-index tree — bitwise the same
    on any number of workers, in memory or out of core. ``s`` is computed once, at the start,
    and kept in the state (checkpointed: a resume does not recompute it; :attr:`constant`: written into
    the two checkpoint slots once). The start is ones
    (deepinv's); the value reported is the Poisson NLL ``Σ_i Σ (A_i x − y_i log A_i x)`` at the
    start of the iteration.

    With a denoiser, the one-step-late MAP-EM of deepinv's ``MLEM(prior=RED(denoiser))``:
    ``u = x ⊙ Σ_i A_iᵀ(y_i / A_i x)``, ``x ← u / max(s + λ (u − D_σ(u)), ε)``, ``λ`` the
    ``red_weight``.

    Parameters
    ----------
    eps : float
        ``ε``, the floor of the denominators (deepinv's default 1e-6).
    red_weight : float
        ``λ`` of the prior term (used with a denoiser).
    """

    name = "mlem"
    state = ("x", "sensitivity")
    constant = ("sensitivity",)
    pipelined = True
    uses_step_size = False
    prior_optional = True

    def __init__(self, eps: float = 1e-6, red_weight: float = 1.0) -> None:
        super().__init__(1.0)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps, self.red_weight = float(eps), float(red_weight)

    def settings(self) -> dict:
        return {"algorithm": self.name, "eps": repr(self.eps), "red_weight": repr(self.red_weight)}

    def initial(self, problem: Problem) -> da.Array:
        return da.ones(problem.shape, chunks=problem.chunks, dtype=problem.dtype)

    def reduced_axes(self, problem: Problem) -> dict[str, tuple[int, ...]]:
        axes = problem.invariant_axes()
        return {"sensitivity": axes} if axes else {}

    def start(self, problem: Problem, x0: da.Array) -> dict[str, da.Array]:
        return {"x": x0, "sensitivity": self._sensitivity(problem, x0, None, "sensitivity")}

    def _update(self, problem: Problem, x: da.Array, s: da.Array, members: list[int] | None, weight: float,
                tag: str) -> tuple[da.Array, Delayed]:
        ratio = self._variant(problem, "ratio", poisson_tasks.RatioFidelity(self.eps), poisson_tasks.Ratio(self.eps))
        back, value = graph.gradient(ratio, x, members, kind=f"back-projected-ratio-{tag}")
        if problem.denoiser is None:
            new = da.map_blocks(poisson_tasks.em_block, x, back, s, self.eps, dtype=x.dtype, name=f"em-{tag}")
            return new, value
        u = da.map_blocks(poisson_tasks.em_numerator_block, x, back, dtype=x.dtype, name=f"em-numerator-{tag}")
        d = graph.denoise(problem, u, f"denoise-{tag}")
        prior = da.map_blocks(poisson_tasks.red_term_block, u, d, dtype=x.dtype, name=f"red-term-{tag}")
        new = da.map_blocks(poisson_tasks.em_block, x, back, s, self.eps, prior, weight, dtype=x.dtype,
                            name=f"em-{tag}")
        return new, value

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x, s = state["x"], state["sensitivity"]
        tag = graphs.token("mlem")
        new, value = self._update(problem, x, s, None, self.red_weight, tag)
        return {"x": new, "sensitivity": s}, value, graph.metrics(problem, new, x, f"metrics-{tag}")


class OSEM(MLEM):
    """Ordered-subsets EM (deepinv's ``OSEM``): :class:`MLEM`'s update on one operator subset per iteration.

    ``N`` operators in ``n_subsets`` interleaved subsets (:func:`daskrecon.planning.subsets.partition`:
    with operators in acquisition order — angles, frames — each subset spans the acquisition);
    iteration ``k`` updates with subset ``S = S_{j(k)}``:
    ``x ← x ⊙ Σ_{i∈S} A_iᵀ(y_i / A_i x) / max(s_S, ε)``, each epoch visiting every subset once in
    an order drawn from ``(seed, epoch)`` (the engine's schedule,
    :func:`daskrecon.planning.subsets.subset_at`; deepinv's one iteration is an epoch in the order
    0, 1, …). The subset sensitivities ``s_S = Σ_{i∈S} A_iᵀ1`` are computed once and kept in the
    state. With a denoiser, the one-step-late prior term of :class:`MLEM` with weight
    ``λ / n_subsets`` (deepinv's: one epoch applies the whole weight). The value reported is the
    subset's NLL times ``N/|S|``.

    Parameters
    ----------
    n_subsets : int
    seed : int
    eps : float
    red_weight : float
    """

    name = "osem"

    def __init__(self, n_subsets: int, seed: int = 0, eps: float = 1e-6, red_weight: float = 1.0) -> None:
        super().__init__(eps, red_weight)
        if not isinstance(n_subsets, int) or n_subsets < 1:
            raise ValueError(f"n_subsets must be a positive int, got {n_subsets!r}")
        self.n_subsets, self.seed = n_subsets, int(seed)
        self.state = ("x", *(f"sensitivity_{j}" for j in range(n_subsets)))
        self.constant = self.state[1:]
        self._subset: int | None = None

    def settings(self) -> dict:
        return {**super().settings(), "n_subsets": self.n_subsets, "seed": self.seed}

    def check(self, problem: Problem) -> None:
        super().check(problem)
        partition(problem.num_operators, self.n_subsets)  # raises for more subsets than operators

    def report(self) -> dict:
        return {} if self._subset is None else {"subset": self._subset}

    def reduced_axes(self, problem: Problem) -> dict[str, tuple[int, ...]]:
        return _subset_sensitivity_axes(problem, self.n_subsets)

    def start(self, problem: Problem, x0: da.Array) -> dict[str, da.Array]:
        subsets = partition(problem.num_operators, self.n_subsets)
        return {"x": x0, **{f"sensitivity_{j}": self._sensitivity(problem, x0, members, f"sensitivity_{j}")
                            for j, members in enumerate(subsets)}}

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x = state["x"]
        tag = graphs.token("osem")
        self._subset = j = subset_at(self.seed, iteration, self.n_subsets)
        members = partition(problem.num_operators, self.n_subsets)[j]
        new, value = self._update(problem, x, state[f"sensitivity_{j}"], members,
                                  1.0 / self.n_subsets * self.red_weight, tag)
        weight = problem.num_operators / len(members)
        value = delayed(operator.mul, pure=True)(value, weight, dask_key_name=f"value-estimate-{tag}")
        return {**state, "x": new}, value, graph.metrics(problem, new, x, f"metrics-{tag}")


class SIRT(_Variants):
    """Simultaneous iterative reconstruction technique (deepinv's ``SIRT``), the CT workhorse.

    ``x ← x + τ V Σ_i A_iᵀ W_i (y_i − A_i x)`` with ``W_i = 1 / max(A_i 1, ε)`` (row sums) and
    ``V = 1 / max(Σ_i A_iᵀ1, ε)`` (column sums). The weighted residuals are the engine's gradient
    pass with the row sums dividing each operator's term (:func:`daskrecon.engine.iteration.gradient`'s
    ``row_weights``: made chunk by chunk from ones for chunk-wise operators; computed once per
    operator on its worker for whole-image ones, :class:`daskrecon.tasks.fidelity.SIRTFidelity`).
    The column sums are computed once, at the start, and kept in the state. The start is
    ``Σ_i A_iᵀ y_i`` (deepinv's); the value reported is ``½ Σ_i ‖A_i x − y_i‖²``.

    Parameters
    ----------
    step_size : float
        ``τ``, in (0, 2) for convergence (deepinv's default 1).
    eps : float
        ``ε`` (deepinv's default 1e-8).
    """

    name = "sirt"
    state = ("x", "column_sums")
    constant = ("column_sums",)
    pipelined = True
    uses_step_size = False
    prior_optional = True

    def __init__(self, step_size: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__(step_size)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)
        self._rows: tuple[Problem, dict] | None = None

    def _row_sums(self, problem: Problem, x: da.Array) -> dict | None:
        """Each chunk-wise operator's row sums ``A_i 1``, computed once per run: persisted in cluster memory,
        or out of core written once to ``scratch_sirt/rows_<i>`` in the run's store and read from there.
        One slice of them where the operator is the same on every slice (broadcast by the tasks)."""
        if self._rows is not None and self._rows[0] is problem:
            return self._rows[1]
        forms = {i: form for i, form in enumerate(problem.forms) if form is not None}
        store = getattr(getattr(self, "workspace", None), "store", None)
        if not forms or (problem.storage != "memory" and store is None):
            return None

        def ones(i: int) -> da.Array:  # one slice where the operator is the same on every slice (broadcast)
            shape, chunks = problem.reduced(problem.invariant_axes([i]))
            return da.ones(shape, chunks=chunks, dtype=x.dtype)

        if problem.storage == "memory":
            rows = {i: persist_fresh(problem.ctx.client, form.apply(ones(i)), f"row-sums-{i}")
                    for i, form in forms.items()}
        else:
            rows = {i: _stored_once(problem, store.child("scratch_sirt"), f"rows_{i}", form.apply(ones(i)))
                    for i, form in forms.items()}
        self._rows = (problem, rows)
        return rows

    def settings(self) -> dict:
        return {**super().settings(), "eps": repr(self.eps)}

    def check(self, problem: Problem) -> None:
        super().check(problem)
        if problem.denoiser is not None:
            raise ValueError("sirt takes no prior: pass denoiser=None (for a prior, use 'mlem'/'osem' with a denoiser, "
                             "or 'fista' / 'admm')")

    def initial(self, problem: Problem) -> da.Array:
        return graph.adjoint_sum(problem, scale=1.0)

    def reduced_axes(self, problem: Problem) -> dict[str, tuple[int, ...]]:
        axes = problem.invariant_axes()
        return {"column_sums": axes} if axes else {}

    def start(self, problem: Problem, x0: da.Array) -> dict[str, da.Array]:
        return {"x": x0, "column_sums": self._sensitivity(problem, x0, None, "column-sums")}

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x, c = state["x"], state["column_sums"]
        tag = graphs.token("sirt")
        from deepinv.optim.distance import L2Distance

        weighted = self._variant(problem, "sirt", fidelity_tasks.SIRTFidelity(self.eps), L2Distance())
        g, value = graph.gradient(weighted, x, kind=f"weighted-residual-{tag}", row_weights=self.eps,
                                  row_sums=self._row_sums(problem, x))
        new = da.map_blocks(poisson_tasks.sirt_block, x, g, c, self.step_size, self.eps, dtype=x.dtype,
                            name=f"sirt-{tag}")
        return {"x": new, "column_sums": c}, value, graph.metrics(problem, new, x, f"metrics-{tag}")


class BSREM(MLEM):
    """Block sequential regularized EM (deepinv's ``BSREM``): a relaxed, preconditioned OSEM that converges.

    ``N`` operators in ``n_subsets`` interleaved subsets visited in the fixed order 0, 1, … (deepinv's
    epoch); iteration ``k`` updates with subset ``l = k mod L``:
    ``x ← P₊[x − α · (x / max(s̄, ε)) ⊙ (s_l − Σ_{i∈S_l} A_iᵀ(y_i / max(A_i x, ε)) + (λ/L) ∇R(x))]``
    on the support ``s̄ > t · max s̄`` (``ε`` outside it), with ``s_l = Σ_{i∈S_l} A_iᵀ1``, the average
    sensitivity ``s̄ = Σ_l s_l / L`` and ``P₊`` the clamp at ``ε``. ``∇R``: a distributed prior's
    ``grad`` tile by tile (``dr.distribute(deepinv.optim.RDP(), ctx)``, the relative-difference prior of
    emission tomography, exact under tiling with ``overlap >= 1``), or for a denoiser RED's
    ``x − D_σ(x)``; none without one. ``s_l``, ``s̄`` and the support are computed once, at the start,
    and kept in the state. The start is ones (deepinv's). Poisson gain 1, no background.

    Parameters
    ----------
    n_subsets : int
    step_size : float
        The relaxation ``α`` (deepinv's default 1; constant).
    red_weight : float
        ``λ`` (deepinv's ``lambda_reg``, default 1).
    eps : float
        deepinv's default 1e-6.
    sensitivity_threshold : float
        ``t``, deepinv's default 1e-2.
    """

    name = "bsrem"
    uses_step_size = False

    def __init__(self, n_subsets: int, step_size: float = 1.0, red_weight: float = 1.0, eps: float = 1e-6,
                 sensitivity_threshold: float = 1e-2) -> None:
        super().__init__(eps, red_weight)
        if not isinstance(n_subsets, int) or n_subsets < 1:
            raise ValueError(f"n_subsets must be a positive int, got {n_subsets!r}")
        self.step_sizes = as_schedule(step_size, "step_size (the relaxation)")
        self.n_subsets, self.step_size = n_subsets, self.step_sizes[0]
        self.threshold = float(sensitivity_threshold)
        self.state = ("x", "average", "support", *(f"sensitivity_{j}" for j in range(n_subsets)))
        self.constant = self.state[1:]
        self._subset: int | None = None

    def settings(self) -> dict:
        return {**super().settings(), "n_subsets": self.n_subsets, "relaxation": repr(self.step_size),
                "sensitivity_threshold": repr(self.threshold)}

    def check(self, problem: Problem) -> None:
        super().check(problem)
        partition(problem.num_operators, self.n_subsets)

    def report(self) -> dict:
        return {} if self._subset is None else {"subset": self._subset}

    def reduced_axes(self, problem: Problem) -> dict[str, tuple[int, ...]]:
        reduced = _subset_sensitivity_axes(problem, self.n_subsets)
        axes = problem.invariant_axes()  # the average and its support: along the axes of every subset
        return {**reduced, "average": axes, "support": axes} if axes else reduced

    def start(self, problem: Problem, x0: da.Array) -> dict[str, da.Array]:
        subsets = partition(problem.num_operators, self.n_subsets)
        sens = [self._sensitivity(problem, x0, members, f"sensitivity_{j}") for j, members in enumerate(subsets)]
        total = sens[0]
        for s in sens[1:]:  # in subset order, as deepinv's sum()
            total = total + s
        average = total / np.asarray(self.n_subsets, dtype=x0.dtype)
        peak = average.max(axis=tuple(range(2, x0.ndim)), keepdims=True)
        support = da.map_blocks(poisson_tasks.support_block, average, peak, self.threshold, dtype=x0.dtype,
                                name=f"bsrem-support-{graphs.token('support')}")
        return {"x": x0, "average": average, "support": support,
                **{f"sensitivity_{j}": s for j, s in enumerate(sens)}}

    def step(self, problem: Problem, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        import dataclasses

        x = state["x"]
        tag = graphs.token("bsrem")
        self._subset = j = iteration % self.n_subsets
        members = partition(problem.num_operators, self.n_subsets)[j]
        ratio = self._variant(problem, "ratio", poisson_tasks.RatioFidelity(self.eps), poisson_tasks.Ratio(self.eps))
        back, value = graph.gradient(ratio, x, members, kind=f"back-projected-ratio-{tag}")
        prior = None
        if problem.denoiser is not None:
            if problem.denoise_method == "prox":  # a distributed prior: its own gradient, tile by tile
                sigma = problem.denoise_kwargs.get("sigma_denoiser")
                grad_of = dataclasses.replace(problem, denoise_method="grad", denoise_args=(sigma,), denoise_kwargs={})
                prior = graph.denoise(grad_of, x, f"prior-grad-{tag}")
            else:  # a denoiser: RED's gradient x − D(x)
                d = graph.denoise(problem, x, f"denoise-{tag}")
                prior = da.map_blocks(poisson_tasks.red_term_block, x, d, dtype=x.dtype, name=f"red-term-{tag}")
        weight = self.red_weight / self.n_subsets
        args = (x, back, state[f"sensitivity_{j}"], state["average"], state["support"])
        if prior is None:
            new = da.map_blocks(poisson_tasks.bsrem_block, *args, self.step_size, self.eps, dtype=x.dtype,
                                name=f"bsrem-{tag}")
        else:
            new = da.map_blocks(poisson_tasks.bsrem_block, *args, self.step_size, self.eps, prior, weight,
                                dtype=x.dtype, name=f"bsrem-{tag}")
        value = delayed(operator.mul, pure=True)(value, problem.num_operators / len(members),
                                                 dask_key_name=f"value-estimate-{tag}")
        return {**state, "x": new}, value, graph.metrics(problem, new, x, f"metrics-{tag}")


def _subset_sensitivity_axes(problem: Problem, n_subsets: int) -> dict[str, tuple[int, ...]]:
    """``sensitivity_j`` of each subset that is constant along some axes: those axes."""
    subsets = partition(problem.num_operators, n_subsets)
    reduced = {f"sensitivity_{j}": problem.invariant_axes(members) for j, members in enumerate(subsets)}
    return {name: axes for name, axes in reduced.items() if axes}


def _stored_once(problem: Problem, store: Any, name: str, a: da.Array) -> da.Array:
    """``a`` computed once into the uncompressed array ``name`` of ``store``, then read from it (strict)."""
    import uuid

    a, zchunks = zarr_aligned(a)
    z = store.scratch(name, a.shape, a.dtype, zchunks)
    ctx = problem.ctx
    compute([da.store(a, z, lock=False, compute=False)], client=ctx.client, what=f"{name} (once per run)",
            stall_timeout=ctx.stall_timeout, writes=True)
    return read_array(z, (), a.chunks, name=f"{name}-{uuid.uuid4().hex}", sources=store.sources)


ALGORITHMS: dict[str, type[StepRule]] = {"pnp": PnP, "red": RED, "fista": FISTA, "fista-red": FISTARED, "hqs": HQS,
                                         "admm": ADMM, "os-pnp": OSPnP, "svrg": SVRG, "mlem": MLEM, "osem": OSEM,
                                         "sirt": SIRT, "bsrem": BSREM}


def step_rule(algorithm: str, step_size: float, **options: Any) -> StepRule:
    """The step rule named ``algorithm`` (see :data:`ALGORITHMS`) with its options.

    Options that do not apply to the algorithm are ignored: ``red_weight`` (RED, FISTA-RED),
    ``fista_a`` (FISTA), ``cg_max_iter``/``cg_tol``/``prox_solver`` (HQS, ADMM), ``admm_beta`` (ADMM),
    ``n_subsets``/``seed`` (OS-PnP, SVRG, OSEM; BSREM ``n_subsets`` only), ``eps`` (MLEM, OSEM, BSREM).
    """
    try:
        cls = ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {algorithm!r}") from None
    cg = {k: options[k] for k in ("cg_max_iter", "cg_tol", "prox_solver") if options.get(k) is not None}
    if cls is RED:
        return RED(step_size, options.get("red_weight", 1.0))
    if cls is FISTA:
        return FISTA(step_size, options.get("fista_a", 3.0))
    if cls is FISTARED:
        return FISTARED(step_size, options.get("red_weight", 1.0), options.get("fista_a", 3.0))
    if cls is HQS:
        return HQS(step_size, **cg)
    if cls is ADMM:
        return ADMM(step_size, options.get("admm_beta", 1.0), **cg)
    if cls is SIRT:
        return SIRT(step_size)
    if cls is MLEM:
        return MLEM(options.get("eps") or 1e-6, options.get("red_weight", 1.0))
    if cls is BSREM:
        if options.get("n_subsets") is None:
            raise ValueError("algorithm 'bsrem' needs n_subsets (how many operator subsets)")
        return BSREM(options["n_subsets"], step_size, options.get("red_weight", 1.0), options.get("eps") or 1e-6)
    if cls is OSEM:
        if options.get("n_subsets") is None:
            raise ValueError("algorithm 'osem' needs n_subsets (how many operator subsets)")
        return OSEM(options["n_subsets"], options.get("seed") or 0, options.get("eps") or 1e-6,
                    options.get("red_weight", 1.0))
    if cls in (OSPnP, SVRG):
        if options.get("n_subsets") is None:
            raise ValueError(f"algorithm {algorithm!r} needs n_subsets (how many operator subsets)")
        return cls(step_size, options["n_subsets"], options.get("seed") or 0)
    return cls(step_size)
