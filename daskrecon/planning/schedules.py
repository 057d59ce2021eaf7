"""Per-iteration parameters: one number for every iteration, or one number per iteration.

deepinv's optimisers take each entry of ``params_algo`` as a number or as a list indexed by the
iteration (``value[k]`` when the list has more than one entry, else ``value[0]``); DPIR's
decreasing denoiser σ with a step size that follows it is the common case. daskrecon's
``step_size`` and ``sigma_denoiser`` follow the same rule. A schedule is kept as a tuple of
floats; these functions are pure: they check, index and describe one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["Schedule", "as_schedule", "check_covers", "describe", "value_at"]

#: A parameter's values: one for every iteration (length 1) or one per iteration.
Schedule = tuple[float, ...]


def as_schedule(value: Any, name: str, *, positive: bool = True) -> Schedule:
    """``value`` (a number, or a sequence, 1-D tensor or array of numbers) as a schedule.

    Parameters
    ----------
    value : float or sequence of float
        One number for every iteration, or one per iteration.
    name : str
        The parameter's name, for the error.
    positive : bool
        Whether every value must be ``> 0`` (else ``>= 0``).

    Returns
    -------
    tuple of float

    Raises
    ------
    ValueError
        An empty schedule, a value that is not a finite number, or not positive (non-negative).
    TypeError
        ``value`` is neither a number nor a sequence of numbers.
    """
    if hasattr(value, "tolist") and not isinstance(value, numbers.Number):  # a tensor or an array
        value = value.tolist()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = [value]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
        if not values:
            raise ValueError(f"{name} is an empty schedule: give a number or one value per iteration")
    else:
        raise TypeError(f"{name} must be a number or a sequence of numbers (one per iteration), got {value!r}")
    out = []
    for k, v in enumerate(values):
        where = name if len(values) == 1 else f"{name}[{k}]"
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise TypeError(f"{where} must be a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v) or not (v > 0 if positive else v >= 0):
            raise ValueError(f"{where} must be {'> 0' if positive else '>= 0'} and finite, got {v!r}")
        out.append(v)
    return tuple(out)


def value_at(schedule: Schedule, k: int) -> float:
    """The value at iteration ``k`` (from 0): ``schedule[k]``, or the one value of a constant."""
    return schedule[k] if len(schedule) > 1 else schedule[0]


def check_covers(schedule: Schedule, n_iter: int, name: str) -> None:
    """Raise ``ValueError`` if a per-iteration ``schedule`` has fewer values than ``n_iter`` iterations."""
    if len(schedule) > 1 and len(schedule) < n_iter:
        raise ValueError(f"{name} has {len(schedule)} values (one per iteration) for n_iter={n_iter} iterations: "
                         f"give at least {n_iter}, or one number for all")


def describe(schedule: Schedule) -> str | list[str]:
    """What a checkpoint records: ``repr`` of the value of a constant, the list of ``repr`` of a schedule."""
    return repr(schedule[0]) if len(schedule) == 1 else [repr(v) for v in schedule]
