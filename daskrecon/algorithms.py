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

__all__ = ["ALGORITHMS", "PnP", "RED", "StepRule", "step_rule"]


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

    def step(self, problem: Any, state: dict[str, da.Array]) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        """One iteration, lazily: ``(new state, f(x) at the start, metrics of x → x_new)``."""
        raise NotImplementedError


class PnP(StepRule):
    """Plug-and-play proximal gradient: ``x ← D_σ(x − τ ∇f(x))``."""

    name = "pnp"

    def step(self, problem: Any, state: dict[str, da.Array]) -> tuple[dict[str, da.Array], Delayed, Delayed]:
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

    def step(self, problem: Any, state: dict[str, da.Array]) -> tuple[dict[str, da.Array], Delayed, Delayed]:
        x = state["x"]
        tag = graph.token("red")
        grad, value = graph.gradient(problem, x)
        d = graph.denoise(problem, x, f"denoise-{tag}")
        new = da.map_blocks(iteration_tasks.red_step_block, x, grad, d, self.step_size, problem.scale,
                            self.red_weight, dtype=x.dtype, name=f"step-{tag}")
        return {"x": new}, value, graph.metrics(problem, new, x, f"metrics-{tag}")


ALGORITHMS: dict[str, type[StepRule]] = {"pnp": PnP, "red": RED}


def step_rule(algorithm: str, step_size: float, **options: Any) -> StepRule:
    """The step rule named ``algorithm`` (see :data:`ALGORITHMS`) with its options."""
    try:
        cls = ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {algorithm!r}") from None
    if cls is RED:
        return RED(step_size, options.get("red_weight", 1.0))
    return cls(step_size)
