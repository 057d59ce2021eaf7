"""daskrecon: DeepInverse imaging inverse problems on Dask clusters."""

from daskrecon.bundle import DistributedBundle, FactoryConfig, TilingConfig, make_distrib_bundle
from daskrecon.context import DistributedContext
from daskrecon.distribute import distribute, register
from daskrecon.errors import DaskreconError
from daskrecon.fidelity import DistributedDataFidelity
from daskrecon.measurements import DistributedMeasurements
from daskrecon.physics import (
    DistributedLinearPhysics,
    DistributedPhysics,
    DistributedStackedLinearPhysics,
    DistributedStackedPhysics,
)
from daskrecon.processing import DistributedPrior, DistributedProcessing
from daskrecon.receptive import receptive_radius
from daskrecon.reduction import reduction_plan
from daskrecon.signal import DistributedSignal
from daskrecon.solvers import reconstruct
from daskrecon import strategies

__version__ = "0.1.0"

__all__ = [
    "DaskreconError",
    "DistributedBundle",
    "DistributedContext",
    "DistributedDataFidelity",
    "DistributedLinearPhysics",
    "DistributedMeasurements",
    "DistributedPhysics",
    "DistributedPrior",
    "DistributedProcessing",
    "DistributedSignal",
    "FactoryConfig",
    "TilingConfig",
    "DistributedStackedLinearPhysics",
    "DistributedStackedPhysics",
    "distribute",
    "make_distrib_bundle",
    "receptive_radius",
    "reconstruct",
    "reduction_plan",
    "register",
    "strategies",
]
