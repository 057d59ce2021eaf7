"""Algorithms as step rules on the engine's loop (:mod:`daskrecon.engine`).

A step rule names its state (the arrays the loop keeps, in cluster memory or Zarr, and
checkpoints together), builds the initial state, and builds one iteration as a lazy graph:
the new state, the data-fidelity value at the start of the iteration, and the iteration's
metrics. The loop does everything else once: submission, progress, spans, history,
callbacks, checkpoints and resume. A new algorithm is one subclass.
"""

from __future__ import annotations

from typing import Any, ClassVar

import dask.array as da
from dask.delayed import Delayed

from daskrecon import graph
from daskrecon.tasks import iteration as iteration_tasks

__all__ = ["ALGORITHMS", "FISTA", "RED", "PnP", "StepRule", "step_rule"]


class StepRule:
    """One algorithm: its state, its start, its iteration (see the module docstring).

    Parameters
    ----------
    step_size : float
        ``τ``.
    """

    name: ClassVar[str] = ""
    #: Arrays of the state, ``"x"`` (the iterate) first.
    state: ClassVar[tuple[str, ...]] = ("x",)

    def __init__(self, step_size: float) -> None:
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size!r}")
        self.step_size = float(step_size)

    def settings(self) -> dict:
        """What defines the algorithm, for the checkpoint's problem record."""
        return {"algorithm": self.name, "step_size": repr(self.step_size)}

    def start(self, problem: Any, x0: da.Array) -> dict[str, da.Array]:
        """The initial state from ``x0``."""
        return {"x": x0}

    def step(self, problem: Any, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        """Iteration ``iteration + 1``, lazily: ``(new state, f at the start, metrics of x → x_new)``.

        ``iteration`` counts the iterations done before this one (0 for the first; a resumed
        run continues the count), for rules whose coefficients depend on it.
        """
        raise NotImplementedError


class PnP(StepRule):
    """Plug-and-play proximal gradient: ``x ← D_σ(x − τ ∇f(x))``."""

    name = "pnp"

    def step(self, problem: Any, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x = state["x"]
        tag = graph.token("pnp")
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

    def __init__(self, step_size: float, red_weight: float = 1.0) -> None:
        super().__init__(step_size)
        self.red_weight = float(red_weight)

    def settings(self) -> dict:
        return {**super().settings(), "red_weight": repr(self.red_weight)}

    def step(self, problem: Any, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x = state["x"]
        tag = graph.token("red")
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

    def __init__(self, step_size: float, a: float = 3.0) -> None:
        super().__init__(step_size)
        if not a > 2:
            raise ValueError(f"FISTA's momentum parameter a must be > 2, got {a!r}")
        self.a = float(a)

    def settings(self) -> dict:
        return {**super().settings(), "a": repr(self.a)}

    def start(self, problem: Any, x0: da.Array) -> dict[str, da.Array]:
        return {"x": x0, "z": x0}

    def step(self, problem: Any, state: dict[str, da.Array],
             iteration: int) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x, z = state["x"], state["z"]
        tag = graph.token("fista")
        grad, value = graph.gradient(problem, z)
        u = da.map_blocks(iteration_tasks.pnp_step_block, z, grad, self.step_size, problem.scale, dtype=z.dtype,
                          name=f"step-{tag}")
        new = graph.denoise(problem, u, f"denoise-{tag}")
        alpha = (iteration + self.a - 1) / (iteration + self.a)
        z_new = da.map_blocks(iteration_tasks.momentum_block, new, x, alpha, dtype=new.dtype, name=f"momentum-{tag}")
        return {"x": new, "z": z_new}, value, graph.metrics(problem, new, x, f"metrics-{tag}")


ALGORITHMS: dict[str, type[StepRule]] = {"pnp": PnP, "red": RED, "fista": FISTA}


def step_rule(algorithm: str, step_size: float, **options: Any) -> StepRule:
    """The step rule named ``algorithm`` (see :data:`ALGORITHMS`) with its options."""
    try:
        cls = ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {algorithm!r}") from None
    if cls is RED:
        return RED(step_size, options.get("red_weight", 1.0))
    if cls is FISTA:
        return FISTA(step_size, options.get("fista_a", 3.0))
    return cls(step_size)
