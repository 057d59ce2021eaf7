"""The user guide's bundle API: ``FactoryConfig``, ``TilingConfig``, ``make_distrib_bundle``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from deepinv.optim import L2
from deepinv.utils import TensorList

from daskrecon.engine.signal import DistributedSignal
from daskrecon.frontend.context import DistributedContext
from daskrecon.frontend.distribute import distribute
from daskrecon.frontend.fidelity import DistributedDataFidelity
from daskrecon.frontend.measurements import DistributedMeasurements
from daskrecon.frontend.physics import DistributedPhysics
from daskrecon.frontend.processing import DistributedPrior

__all__ = ["DistributedBundle", "FactoryConfig", "TilingConfig", "make_distrib_bundle"]


@dataclass
class FactoryConfig:
    """What defines the problem.

    Parameters
    ----------
    physics : StackedPhysics, list of Physics, or factory ``f(i, device, shared)``
    measurements : TensorList, list of tensors, or factory ``f(i, device, shared)`` (run on the workers)
    num_operators : int, optional
        Required when both are factories.
    data_fidelity : DataFidelity or list of them, optional
        Default ``L2()``.
    """

    physics: Any
    measurements: Any
    num_operators: int | None = None
    data_fidelity: Any = None


@dataclass
class TilingConfig:
    """How the prior is applied tile by tile.

    ``receptive_field_size`` is the overlap (context per side, pixels). The guide's boolean
    ``overlap`` had no effect in deepinv and has none here; an int overrides
    ``receptive_field_size``.
    """

    patch_size: int = 256
    receptive_field_size: int = 64
    overlap: bool | int = False
    strategy: str = "smart_tiling"
    max_batch_size: int | None = None


class _BoundFidelity:
    """A data fidelity that knows its physics and measurements: ``grad(signal)``, ``fn(signal)``."""

    def __init__(self, fidelity: DistributedDataFidelity, physics: DistributedPhysics,
                 measurements: DistributedMeasurements) -> None:
        self.fidelity, self.physics, self.measurements = fidelity, physics, measurements

    @staticmethod
    def _x(signal: Any) -> torch.Tensor:
        return signal.data if isinstance(signal, DistributedSignal) else signal

    def grad(self, signal: Any) -> torch.Tensor:
        """``Σ_i ∇_x d_i(A_i x, y_i)`` at the signal's value."""
        return self.fidelity.grad(self._x(signal), self.measurements, self.physics)

    def fn(self, signal: Any) -> torch.Tensor:
        """``Σ_i d_i(A_i x, y_i)``."""
        return self.fidelity.fn(self._x(signal), self.measurements, self.physics)

    __call__ = fn


@dataclass
class DistributedBundle:
    """Everything a distributed reconstruction needs, built by :func:`make_distrib_bundle`."""

    physics: DistributedPhysics
    measurements: DistributedMeasurements
    data_fidelity: _BoundFidelity
    signal: DistributedSignal
    prior: DistributedPrior | None = None


def make_distrib_bundle(
    ctx: DistributedContext,
    *,
    factory_config: FactoryConfig,
    signal_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    reduction: str = "sum",
    prior: Any = None,
    tiling: TilingConfig | None = None,
    store: str | None = None,
) -> DistributedBundle:
    """Build physics, measurements, data fidelity, signal and prior in one call.

    ``reduction="sum"`` follows the guide's formula ``∇f = Σ_i ∇f_i`` (the older
    implementation defaulted to ``"mean"``, dividing the gradient by ``N``).
    """
    fc = factory_config
    n = fc.num_operators
    physics_kw = {"num_operators": n} if callable(fc.physics) and not isinstance(fc.physics, torch.nn.Module) else {}
    physics = distribute(fc.physics, ctx, **physics_kw)
    if not isinstance(physics, DistributedPhysics):
        raise TypeError("factory_config.physics must describe physics operators")
    if isinstance(fc.measurements, (TensorList, list, tuple)):
        items = [fc.measurements[i] for i in range(len(fc.measurements))]
        measurements = DistributedMeasurements(ctx, items, owners=physics.owners)
    elif callable(fc.measurements):
        measurements = DistributedMeasurements(ctx, factory=fc.measurements, num_items=physics.num_operators,
                                               owners=physics.owners)
    else:
        raise TypeError("factory_config.measurements must be a TensorList, a list of tensors or a factory")
    if len(measurements) != physics.num_operators:
        raise ValueError(f"{len(measurements)} measurements for {physics.num_operators} operators")
    fidelity = DistributedDataFidelity(ctx, fc.data_fidelity if fc.data_fidelity is not None else L2(),
                                       reduction=reduction)
    signal = DistributedSignal(ctx, signal_shape, dtype=dtype, store=store)
    dprior = None
    if prior is not None:
        t = tiling or TilingConfig()
        overlap = t.overlap if isinstance(t.overlap, int) and not isinstance(t.overlap, bool) else t.receptive_field_size
        dprior = DistributedPrior(ctx, prior, patch_size=t.patch_size, overlap=overlap, strategy=t.strategy,
                                  max_batch_size=t.max_batch_size)
    return DistributedBundle(physics, measurements, _BoundFidelity(fidelity, physics, measurements), signal, dprior)
