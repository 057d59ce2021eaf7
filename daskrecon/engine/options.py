"""The options of a reconstruction, with their one set of defaults.

:func:`daskrecon.reconstruct` takes them as keywords and the batch config
(``daskrecon reconstruct run.toml``) as keys; both build one :class:`ReconstructOptions`,
checked once, and hand it on whole: the step rule is built from it
(:func:`daskrecon.engine.algorithms.step_rule`) and the loop reads it
(:func:`daskrecon.engine.loop.run`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from daskrecon.engine.algorithms import ALGORITHMS, StepRule
from daskrecon.engine.linsolve import PROX_SOLVERS
from daskrecon.engine.problem import STORAGES
from daskrecon.planning.precision import check_precision
from daskrecon.planning.schedules import as_schedule, check_covers
from daskrecon.runtime.defaults import default

__all__ = ["CONFIGURED", "SUBSET_ALGORITHMS", "ReconstructOptions"]

#: Options whose default is configured (``daskrecon.reconstruct.<key>`` in ``dask.config``): option -> key.
CONFIGURED = {"algorithm": "algorithm", "n_iter": "iterations", "sigma_denoiser": "sigma-denoiser",
              "red_weight": "red-weight", "storage": "storage", "checkpoint_every": "checkpoint-every",
              "progress": "progress", "cg_max_iter": "cg-max-iter", "cg_tol": "cg-tol", "prox_solver": "prox-solver"}

#: Algorithms that visit one operator subset per iteration (they need ``n_subsets``).
SUBSET_ALGORITHMS = ("os-pnp", "svrg", "osem", "bsrem")


@dataclass(frozen=True)
class ReconstructOptions:
    """What a reconstruction runs and how (the parameters of :func:`daskrecon.reconstruct`, documented there).

    Checked when made: a bad value raises ``ValueError`` naming it, before any work. An option
    left ``None`` that has a configured default (:data:`CONFIGURED`: ``daskrecon.reconstruct.*``
    in ``dask.config``) takes it then.
    """

    algorithm: str | StepRule | None = None
    n_iter: int | None = None
    step_size: float | tuple[float, ...] | None = None
    sigma_denoiser: float | tuple[float, ...] | None = None
    red_weight: float | None = None
    n_subsets: int | None = None
    seed: int | None = None
    cg_max_iter: int | None = None
    cg_tol: float | None = None
    prox_solver: str | None = None
    storage: str | None = None
    chunks: tuple[int, ...] | None = None
    checkpoint: Any = None
    scratch: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool | None = None
    tol: float | None = None
    max_time: float | None = None
    precision: str | None = None
    precision_tol: float | None = None

    def __post_init__(self) -> None:
        for name, key in CONFIGURED.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default(f"reconstruct.{key}"))
        algorithm = self.algorithm
        if isinstance(algorithm, StepRule):
            if self.step_size is not None:
                raise ValueError("a StepRule carries its own step size: pass step_size to it, not to reconstruct")
        elif algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)} or a StepRule, got {algorithm!r}")
        elif algorithm in SUBSET_ALGORITHMS and self.n_subsets is None:
            raise ValueError(f"algorithm {algorithm!r} needs n_subsets (how many operator subsets to cycle through)")
        elif algorithm not in SUBSET_ALGORITHMS and self.n_subsets is not None:
            raise ValueError(f"n_subsets applies to {', '.join(map(repr, SUBSET_ALGORITHMS))}, not to {algorithm!r}")
        if not isinstance(self.n_iter, int) or self.n_iter < 0:
            raise ValueError(f"n_iter must be a non-negative int, got {self.n_iter!r}")
        for name in ("step_size", "sigma_denoiser"):  # a number, or one value per iteration
            value = getattr(self, name)
            if value is not None and not isinstance(value, (int, float)):
                schedule = as_schedule(value, name, positive=name == "step_size")
                check_covers(schedule, self.n_iter, name)
                object.__setattr__(self, name, schedule if len(schedule) > 1 else schedule[0])
        red_weight = self.red_weight
        if isinstance(red_weight, bool) or not isinstance(red_weight, (int, float)) or not 0 <= red_weight < math.inf:
            raise ValueError(f"red_weight must be a number >= 0 (the prior's weight), got {red_weight!r}")
        if self.resume and self.checkpoint is None:  # nothing to continue, ever: the run would start over silently
            raise ValueError("resume=True continues a checkpoint: pass checkpoint= the folder of the run to continue")
        if self.resume and self.overwrite:
            raise ValueError("resume=True continues the checkpoint and overwrite=True starts over: pass one of them")
        if not isinstance(self.progress, bool):  # a configured "no" would be truthy
            raise ValueError(f"progress must be True or False, got {self.progress!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive int, got {self.checkpoint_every!r}")
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")
        if self.max_time is not None and not self.max_time > 0:
            raise ValueError(f"max_time must be > 0 seconds, got {self.max_time!r}")
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")
        if self.precision is not None or self.precision_tol is not None:
            check_precision(self.precision or "fp32", self.precision_tol)
        if self.prox_solver not in PROX_SOLVERS:
            raise ValueError(f"prox_solver must be one of {PROX_SOLVERS}, got {self.prox_solver!r}")

    def replace(self, **changes: Any) -> ReconstructOptions:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of option ``name`` (now: the configured one where there is one)."""
        if name in CONFIGURED:
            return default(f"reconstruct.{CONFIGURED[name]}")
        return cls.__dataclass_fields__[name].default
