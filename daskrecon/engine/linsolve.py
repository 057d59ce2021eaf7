"""Linear algebra on the cluster: the data term's proximal operator by conjugate gradient, its
Lipschitz constant by the power method.

Both iterate on image-sized vectors that never reach the driver. A vector lives in a
:class:`Workspace`: persisted in cluster memory, or — when the problem streams through
Zarr — double-buffered in a scratch store next to the checkpoint. Every pass is one Dask
graph (:func:`daskrecon.engine.signal.advance`) that writes the new vectors and returns the few
scalars the driver needs (inner products, summed chunk by chunk in a fixed order, so
results are bitwise the same on any number of workers and in either storage).

The normal operator ``H = Σ_i A_iᵀA_i / σ_i²`` is the gradient of the L2 data term with
every measurement set to zero (:func:`daskrecon.engine.iteration.gradient` with ``measured=False``):
the same per-operator tasks, next to their operators, and the same fixed-index tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from dask.delayed import Delayed, delayed
from deepinv.optim.data_fidelity import L2

from daskrecon.engine import iteration as graph
from daskrecon.engine.checkpoint import Checkpoint
from daskrecon.engine.problem import Problem
from daskrecon.engine.signal import DistributedSignal, advance
from daskrecon.errors import DaskreconError
from daskrecon.operators.chunkwise import LocalOperator
from daskrecon.planning.fingerprint import fingerprint
from daskrecon.runtime import graphs
from daskrecon.runtime.memory import MemoryLimitError, check_fits
from daskrecon.tasks import arrays as array_tasks
from daskrecon.tasks import linsolve as linsolve_tasks

__all__ = ["CGInfo", "PROX_SOLVERS", "Workspace", "check_quadratic", "fourier_diagonal", "fourier_period", "inner", "lipschitz",
           "prox_data"]

#: How :func:`prox_data` solves its linear system.
PROX_SOLVERS = ("auto", "cg", "fourier")


class Workspace:
    """Named groups of image-sized vectors kept between the passes of an iterative solver.

    Parameters
    ----------
    problem : Problem
    store : Checkpoint, optional
        With ``streamed``, each group is double-buffered in ``<store>/scratch_<group>``.
    streamed : bool
        Keep the vectors in Zarr (the problem does not fit the cluster) rather than in
        cluster memory.
    """

    def __init__(self, problem: Problem, store: Checkpoint | None = None, streamed: bool = False) -> None:
        if streamed and store is None:
            raise ValueError("a streamed workspace needs a store")
        self.problem, self.store, self.streamed = problem, store, streamed
        self._groups: dict[str, dict[str, DistributedSignal]] = {}
        self._passes = 0

    def group(self, name: str, arrays: tuple[str, ...]) -> dict[str, DistributedSignal]:
        if name not in self._groups:
            p = self.problem
            store = self.store.child(f"scratch_{name}") if self.streamed else None
            self._groups[name] = {a: DistributedSignal(p.ctx, p.shape, p.dtype, store=store, chunks=p.chunks,
                                                       name=a, in_memory=not self.streamed) for a in arrays}
        return self._groups[name]

    def write(self, name: str, values: dict[str, da.Array], also: dict[str, Any]) -> dict[str, Any]:
        """One pass: the group's new values and the scalars ``also``, in one submission."""
        self._passes += 1
        signals = self.group(name, tuple(values))
        return advance(signals, values, iteration=self._passes, also=also, commit=self.streamed)

    def read(self, name: str, array: str) -> da.Array:
        return self._groups[name][array].array


@dataclass
class CGInfo:
    """How a conjugate-gradient solve ended: iterations, relative residual ``‖r‖/‖r₀‖``."""

    iterations: int
    relative_residual: float


def check_quadratic(problem: Problem, algorithm: str) -> None:
    """Raise unless every operator's fidelity is deepinv's ``L2`` (its prox is a linear solve)."""
    for i in range(problem.num_operators):
        fid = problem.fidelity.source(i)
        if not isinstance(fid, L2):
            raise DaskreconError(
                f"algorithm {algorithm!r} takes the data term's proximal operator by conjugate gradient, which needs "
                f"an L2 data fidelity; operator {i} has {type(fid).__name__}. Use algorithm='pnp', 'fista' or 'red' "
                "(they need only its gradient), or an L2 fidelity")


def inner(a: da.Array, b: da.Array, name: str) -> Delayed:
    """``⟨a, b⟩`` in float64: one partial per chunk, summed in chunk order (bitwise reproducible)."""
    pa, pb = a.to_delayed(optimize_graph=False).ravel(), b.to_delayed(optimize_graph=False).ravel()
    parts = [delayed(linsolve_tasks.dot_block, pure=True)(u, v, dask_key_name=f"{name}-{k}")
             for k, (u, v) in enumerate(zip(pa, pb))]
    return delayed(linsolve_tasks.sum_in_order, pure=True)(*parts, dask_key_name=f"{name}-sum")


def _normal(problem: Problem, p: da.Array) -> da.Array:
    """``scale · H p`` with ``H = Σ_i A_iᵀA_i / σ_i²`` (lazy)."""
    h, _ = graph.gradient(problem, p, measured=False, kind="normal")
    return h


def fourier_period(problem: Problem) -> tuple[int, str | None]:
    """``(F, why)``: the normal operator commutes with shifts by ``F`` pixels along every spatial
    axis, and ``why`` it has no closed form (``None`` when it has one).

    Every operator must be a circular convolution, subsampled or not (``Blur`` with circular
    padding, ``BlurFFT``, ``Downsampling`` with circular padding: ``A_i = S_{f_i} K_i``), under
    an L2 fidelity; ``F`` is the least common multiple of the factors ``f_i``, and the image's
    sides must be multiples of it. ``F = 1``: ``H = Σ_i A_iᵀA_i / σ_i²`` is a circular
    convolution, diagonal in Fourier. ``F > 1``: ``H`` couples each frequency with the ``F^d − 1``
    frequencies it aliases with, so it is block diagonal in Fourier with ``F^d × F^d`` blocks
    (the polyphase form of fast super-resolution: Zhao et al., IEEE TIP 2016).
    """
    forms = problem.physics.chunkwise_forms()  # whether or not the planner streams them chunk-wise
    for i, form in enumerate(forms):
        if not isinstance(form, LocalOperator) or form.mask is not None or form.mask_bound is not None \
                or (form.filter is not None and form.padding != "circular") or (form.filter is None and form.factor == 1):
            return 1, f"operator {i} is not a circular convolution (subsampled or not)"
        if not isinstance(problem.fidelity.source(i), L2):
            return 1, f"operator {i}'s fidelity is not L2"
    period = math.lcm(*(form.factor for form in forms))
    sides = tuple(problem.shape[2:])
    if any(n % period for n in sides):
        return period, f"the image's sides {sides} are not multiples of the subsampling period {period}"
    return period, None


def fourier_diagonal(problem: Problem) -> str | None:
    """Why the normal operator has no closed form in Fourier (``None`` when it has): :func:`fourier_period`."""
    return fourier_period(problem)[1]


def _fits_whole(problem: Problem) -> bool:
    """Whether one task can hold the image's FFT: about 10 times the image (complex128 and the
    spectrum); subsampled, the ``F^d`` impulse responses and one channel's ``F^d × F^d`` blocks."""
    image = int(np.prod(problem.shape)) * np.dtype(problem.dtype).itemsize
    blocks = fourier_period(problem)[0] ** (len(problem.shape) - 2)
    need = 10 * image if blocks == 1 else (blocks + 2) * image + 40 * blocks * image // (problem.shape[0] * problem.shape[1])
    try:
        check_fits(problem.ctx.client, need, "the Fourier prox", "")
    except MemoryLimitError:
        return False
    return True


def _fourier_terms(problem: Problem, workspace: Workspace) -> tuple[list[da.Array], da.Array]:
    """``(responses, ∇f(0))``, computed once per workspace in one pass.

    ``responses``: ``H δ_p`` for the impulses ``δ_p`` at the ``F^d`` positions ``p`` of one
    period cell (per-operator tasks, the fixed tree), which determine ``H`` (:func:`fourier_period`);
    for ``F = 1``, the spectrum of ``H`` instead, its eigenvalues. ``∇f(0) = −Σ_i A_iᵀy_i / σ_i²``
    is the constant part of the right-hand side.
    """
    period = fourier_period(problem)[0]
    positions = list(np.ndindex(*(period,) * (len(problem.shape) - 2)))
    names = ["spectrum"] if period == 1 else [f"response_{k}" for k in range(len(positions))]
    if "fourier" not in workspace._groups:
        tag = graphs.token("spectrum")
        zero = da.zeros(problem.shape, chunks=problem.chunks, dtype=problem.dtype)
        values = {}
        for k, (name, at) in enumerate(zip(names, positions)):
            delta = zero.map_blocks(linsolve_tasks.delta_block, at, dtype=problem.dtype, name=f"impulse-{k}-{tag}")
            values[name], _ = graph.gradient(problem, delta, measured=False, kind="impulse-response")
        if period == 1:
            lam = delayed(linsolve_tasks.spectrum_of, pure=True)(graphs.whole(values["spectrum"], f"assemble-{tag}"),
                                                                dask_key_name=f"spectrum-{tag}")
            values["spectrum"] = graphs.as_array(lam, np.asarray, (), problem.shape, problem.dtype, problem.chunks,
                                                f"spectrum-chunks-{tag}")
        values["grad0"], _ = graph.gradient(problem, zero, kind="gradient-at-zero")
        workspace.write("fourier", values, {})
    return [workspace.read("fourier", name) for name in names], workspace.read("fourier", "grad0")


def _prox_fourier(problem: Problem, v: da.Array, gamma: float, workspace: Workspace) -> tuple[da.Array, Any, CGInfo]:
    """``(I + c·H)⁻¹ (v − c ∇f(0))`` in closed form: one FFT of the assembled image, in the caller's graph."""
    c = gamma * problem.scale
    tag = graphs.token("fourier-prox")
    terms, g0 = _fourier_terms(problem, workspace)
    rhs = da.map_blocks(linsolve_tasks.axpy_block, v, g0, -c, dtype=problem.dtype, name=f"prox-rhs-{tag}")
    assembled = [graphs.whole(t, f"assemble-{k}-{tag}") for k, t in enumerate(terms)]
    if len(terms) == 1:
        u = delayed(linsolve_tasks.fourier_solve, pure=True)(graphs.whole(rhs, f"assemble-{tag}"), assembled[0], c,
                                                             dask_key_name=f"fourier-solve-{tag}")
    else:
        u = delayed(linsolve_tasks.polyphase_solve, pure=True)(graphs.whole(rhs, f"assemble-{tag}"), c, *assembled,
                                                               dask_key_name=f"fourier-solve-{tag}")
    out = graphs.as_array(u, np.asarray, (), problem.shape, problem.dtype, problem.chunks, f"prox-{tag}")
    return out, graph.batch_values(problem, v).sum(), CGInfo(0, 0.0)


def prox_data(problem: Problem, v: da.Array, gamma: float, workspace: Workspace, *, max_iter: int = 50,
              tol: float = 1e-5, solver: str = "cg") -> tuple[da.Array, Any, CGInfo]:
    """``u = argmin_u γ f(u) + ½‖u − v‖²`` for the L2 data term ``f``.

    ``solver="fourier"``: when the normal operator is block diagonal in Fourier
    (:func:`fourier_period`: circular blurs, subsampled or not), in closed form — one FFT of the image
    assembled in one task, lazily, inside the caller's graph (its ``f(v)`` is then a
    Delayed). ``"auto"`` takes it when it applies and the image's FFT fits a worker,
    conjugate gradient otherwise. ``"cg"``: conjugate gradient, as follows.

    Solves ``(I + γ·scale·H) u = v − γ ∇f(0)`` from ``u₀ = v`` (deepinv's ``prox_l2``
    starting point), until ``‖r_k‖ ≤ tol·‖r₀‖`` or ``max_iter`` iterations. In cluster memory,
    one graph per iteration (``α`` a task); streamed through Zarr, two: ``p ← r + β p;
    q ← p + γ·scale·H p`` with ``⟨p, q⟩``, then ``u ← u + α p; r ← r − α q`` with ``‖r‖²``.

    Returns
    -------
    u : dask array
        In the workspace (cluster memory or scratch Zarr).
    f_v : float
        ``f(v)`` (unscaled sum over operators), from the first pass.
    info : CGInfo
    """
    if not gamma > 0:
        raise ValueError(f"the prox's gamma must be > 0, got {gamma!r}")
    if solver not in PROX_SOLVERS:
        raise ValueError(f"prox solver must be one of {PROX_SOLVERS}, got {solver!r}")
    if solver != "cg":
        why = fourier_diagonal(problem)
        if solver == "fourier" and why is not None:
            raise ValueError(f"prox_solver='fourier' needs every operator to be a circular convolution (subsampled or "
                             f"not) under an L2 fidelity, but {why}; use prox_solver='cg' (or 'auto')")
        if why is None and (solver == "fourier" or _fits_whole(problem)):
            return _prox_fourier(problem, v, gamma, workspace)
    tag = graphs.token("cg")
    c = gamma * problem.scale
    dt = problem.dtype
    g, value = graph.gradient(problem, v, kind="cg-gradient")
    r0 = da.map_blocks(array_tasks.scale_array, g, -c, dtype=dt, name=f"cg-residual-{tag}")
    out = workspace.write("cg-ur", {"u": v, "r": r0},
                          {"rr": inner(r0, r0, f"cg-rr-{tag}"), "value": value})
    rr0 = rr = float(out["rr"])
    f_v = float(out["value"])
    k, beta = 0, 0.0
    p_old = da.zeros(problem.shape, chunks=problem.chunks, dtype=dt)
    if not workspace.streamed:
        return _cg_in_memory(problem, workspace, c, p_old, rr0, f_v, max_iter, tol)
    stager = problem.stager
    passes = stager.mark() if stager is not None else 0
    while k < max_iter and rr > (tol ** 2) * rr0 and rr > 0:
        if stager is not None:
            stager.rewind(passes)  # each pass is computed before the next is built
        r, u = workspace.read("cg-ur", "r"), workspace.read("cg-ur", "u")
        step = graphs.token("cg-step")
        p = da.map_blocks(linsolve_tasks.axpy_block, r, p_old, beta, dtype=dt, name=f"cg-direction-{step}")
        q = da.map_blocks(linsolve_tasks.axpy_block, p, _normal(problem, p), c, dtype=dt, name=f"cg-apply-{step}")
        pq = float(workspace.write("cg-pq", {"p": p, "q": q}, {"pq": inner(p, q, f"cg-pq-{step}")})["pq"])
        if not pq > 0:
            raise DaskreconError(f"conjugate gradient broke down (⟨p, Mp⟩ = {pq!r}): the data term is not a "
                                 "positive quadratic; check the operators' adjoints")
        alpha = rr / pq
        p, q = workspace.read("cg-pq", "p"), workspace.read("cg-pq", "q")
        u_new = da.map_blocks(linsolve_tasks.axpy_block, u, p, alpha, dtype=dt, name=f"cg-update-{step}")
        r_new = da.map_blocks(linsolve_tasks.axpy_block, r, q, -alpha, dtype=dt, name=f"cg-residual-{step}")
        rr_new = float(workspace.write("cg-ur", {"u": u_new, "r": r_new},
                                       {"rr": inner(r_new, r_new, f"cg-rr-{step}")})["rr"])
        beta, rr, k = rr_new / rr, rr_new, k + 1
        p_old = p
    rel = math.sqrt(rr / rr0) if rr0 > 0 else 0.0
    return workspace.read("cg-ur", "u"), f_v, CGInfo(k, rel)


#: Conjugate-gradient iterations per graph in cluster memory: the driver checks convergence
#: between graphs; iterations after convergence inside a graph take a zero step (no change).
CG_ITERATIONS_PER_GRAPH = 4


def _cg_in_memory(problem: Problem, workspace: Workspace, c: float, p_old: da.Array, rr0: float, f_v: float,
                  max_iter: int, tol: float) -> tuple[da.Array, float, CGInfo]:
    """CG with :data:`CG_ITERATIONS_PER_GRAPH` iterations per graph: ``α``, ``β`` and the
    convergence test stay tasks, the updates read them.

    In cluster memory nothing forces ``q`` to be materialized before ``α`` is known; out of core it
    is (a whole image would wait in memory for the reduction), hence one pass per half-iteration
    there. Both give the same bits: the same float64 scalars, and an iteration after convergence
    takes ``α = 0``.
    """
    dt = problem.dtype
    thr = (tol ** 2) * rr0
    u, r = workspace.read("cg-ur", "u"), workspace.read("cg-ur", "r")
    k, beta, rr = 0, 0.0, rr0
    while k < max_iter and rr > thr and rr > 0:
        step = graphs.token("cg-steps")
        rr_t: Any = rr
        beta_t: Any = beta
        rrs, pqs = [], []
        for j in range(min(CG_ITERATIONS_PER_GRAPH, max_iter - k)):
            tag = f"{step}-{j}"
            p = da.map_blocks(linsolve_tasks.axpy_block, r, p_old, beta_t, dtype=dt, name=f"cg-direction-{tag}")
            q = da.map_blocks(linsolve_tasks.axpy_block, p, _normal(problem, p), c, dtype=dt, name=f"cg-apply-{tag}")
            pq = inner(p, q, f"cg-pq-{tag}")
            alpha = delayed(linsolve_tasks.cg_alpha, pure=True)(rr_t, pq, thr, dask_key_name=f"cg-alpha-{tag}")
            u = da.map_blocks(linsolve_tasks.axpy_block, u, p, alpha, dtype=dt, name=f"cg-update-{tag}")
            r = da.map_blocks(linsolve_tasks.axpy_neg_block, r, q, alpha, dtype=dt, name=f"cg-residual-{tag}")
            rr_new = inner(r, r, f"cg-rr-{tag}")
            beta_t = delayed(linsolve_tasks.cg_beta, pure=True)(rr_new, rr_t, thr, dask_key_name=f"cg-beta-{tag}")
            rr_t, p_old = rr_new, p
            rrs.append(rr_new)
            pqs.append(pq)
        out = workspace.write("cg-urp", {"u": u, "r": r, "p": p_old},
                              {**{f"rr{j}": v for j, v in enumerate(rrs)}, **{f"pq{j}": v for j, v in enumerate(pqs)}})
        for j in range(len(rrs)):
            if rr <= thr:
                break  # converged inside the graph: the rest took zero steps
            if not float(out[f"pq{j}"]) > 0:
                raise DaskreconError(f"conjugate gradient broke down (⟨p, Mp⟩ = {float(out[f'pq{j}'])!r}): the data "
                                     "term is not a positive quadratic; check the operators' adjoints")
            rr_new = float(out[f"rr{j}"])
            beta, rr, k = rr_new / rr, rr_new, k + 1
        u, r, p_old = (workspace.read("cg-urp", n) for n in ("u", "r", "p"))
    rel = math.sqrt(rr / rr0) if rr0 > 0 else 0.0
    return u, f_v, CGInfo(k, rel)


def lipschitz(problem: Problem, workspace: Workspace, *, max_iter: int = 100, tol: float = 1e-4,
              seed: int = 0) -> float:
    """``L = scale · ‖H‖``, the Lipschitz constant of the L2 data term's gradient, by the power method.

    Starts from a seeded random image (the same on any cluster), one graph per iteration;
    stops when the Rayleigh quotient changes by at most ``tol`` (relative). Cached on the
    physics per (shape, chunks, dtype, fidelity): a problem pays for it once.
    """
    physics = problem.physics
    cache = physics.__dict__.setdefault("_lipschitz_cache", {})
    fids = fingerprint([problem.fidelity.source(i) for i in range(problem.num_operators)])
    key = (problem.shape, problem.chunks, str(problem.dtype), fids, problem.scale, max_iter, tol, seed,
           getattr(physics, "operators_version", 0))  # an update of the operators changes L
    if key in cache:
        return cache[key]
    tag = graphs.token("power")
    dt = problem.dtype
    w = da.random.default_rng(seed).random(problem.shape, chunks=problem.chunks, dtype=np.float32).astype(dt)
    out = workspace.write("power", {"w": w}, {"ww": inner(w, w, f"power-ww-{tag}")})
    ww, lam, prev = float(out["ww"]), 0.0, None
    stager = problem.stager
    passes = stager.mark() if stager is not None else 0
    for _ in range(max_iter):
        if stager is not None:
            stager.rewind(passes)  # each pass is computed before the next is built
        step = graphs.token("power-step")
        w = workspace.read("power", "w")
        v = da.map_blocks(array_tasks.scale_array, w, 1.0 / math.sqrt(ww), dtype=dt, name=f"power-normalize-{step}")
        hv = _normal(problem, v)
        out = workspace.write("power", {"w": hv}, {"lam": inner(v, hv, f"power-rayleigh-{step}"),
                                                   "ww": inner(hv, hv, f"power-ww-{step}")})
        lam, ww = float(out["lam"]), float(out["ww"])
        if ww == 0:
            raise DaskreconError("the normal operator Σ AᵢᵀAᵢ maps a random image to zero: every operator is zero")
        if prev is not None and abs(lam - prev) <= tol * abs(lam):
            break
        prev = lam
    cache[key] = lam * problem.scale
    return cache[key]
