"""Inputs of a distributed physics' calls, placed on the workers: the image once, each measurement on its operator's.

A ``TensorList`` of measurements is placed once and reused while it is unchanged (the same
tensors, not modified in place), so a reconstruction that passes ``y`` at every iteration
sends it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from deepinv.utils import TensorList
from distributed import Future

from daskrecon.errors import MeasurementError
from daskrecon.frontend.context import one_context
from daskrecon.frontend.measurements import DistributedMeasurements
from daskrecon.runtime.arrays import as_numpy, place, usable

__all__ = ["OperatorInputs"]


class OperatorInputs:
    """Places a physics' inputs (``physics``: its context, operator count and owners, read at each call)."""

    def __init__(self, physics: Any) -> None:
        self.physics = physics
        self._y_cache: tuple[Any, tuple, DistributedMeasurements] | None = None

    @property
    def placed_measurements(self) -> DistributedMeasurements | None:
        """The measurements placed last (reused while the same, unchanged tensors are passed), if any."""
        return None if self._y_cache is None else self._y_cache[2]

    def place_x(self, x: torch.Tensor | Future, name: str = "x") -> Future:
        if isinstance(x, Future):
            return x
        if isinstance(x, TensorList):
            raise TypeError(f"{name} must be a single torch.Tensor (an image), got a TensorList")
        return place(self.physics.ctx.client, as_numpy(x, name))

    def place_y(self, y: Any, name: str = "y") -> list[Future]:
        """Futures of ``y_1 … y_N`` on their owners; a TensorList is placed once and reused."""
        n = self.physics.num_operators
        if isinstance(y, DistributedMeasurements):
            if len(y) != n:
                raise MeasurementError(f"{name} has {len(y)} measurements but the physics has {n} operators")
            one_context(physics=self.physics.ctx, **{name: y.ctx})
            lost = [i for i, f in enumerate(y.futures) if not usable(f)]
            if lost:
                raise MeasurementError(
                    f"{name}: measurements {lost} are no longer on the cluster (client.restart() cancels every "
                    "future, and data placed without lineage goes with its worker); place them again")
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
        if (self._y_cache is not None and self._y_cache[0] is source and self._y_cache[1] == key
                and all(usable(f) for f in self._y_cache[2].futures)):  # a restart cancels them: place again
            return self._y_cache[2].futures
        placed = DistributedMeasurements(self.physics.ctx, y, owners=self.physics.owners)
        self._y_cache = (source, key, placed)
        return placed.futures

    def place_each(self, tensors: Sequence[torch.Tensor]) -> list[Future]:
        """One tensor per operator, each placed on its operator's worker (not cached, unlike ``y``)."""
        return DistributedMeasurements(self.physics.ctx, [t.detach() for t in tensors], owners=self.physics.owners).futures

