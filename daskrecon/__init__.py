"""daskrecon: DeepInverse imaging inverse problems on Dask clusters.

The package is layered; each subpackage imports only those below it (``tests/test_layers.py``):
``errors`` → ``planning`` (pure geometry and schedules) → ``tasks`` (what runs inside Dask
tasks) → ``runtime`` (the cluster at work, driver side) → ``operators`` (chunk-wise forms) →
``engine`` (reconstructions: plan, step rules, one graph per iteration, state) →
``frontend`` (the deepinv-compatible objects and ``reconstruct``) → ``cli``, ``config``,
``demo``. See ``docs/architecture.md``.
"""

from daskrecon import _moved

_moved.install()  # old flat import paths (daskrecon.staging, daskrecon.local...) keep working

from daskrecon.runtime import defaults as _defaults  # noqa: F401  (registers daskrecon.* in dask.config)

from daskrecon.frontend.bundle import DistributedBundle, FactoryConfig, TilingConfig, make_distrib_bundle
from daskrecon.frontend.context import DistributedContext
from daskrecon.frontend.distribute import distribute, register
from daskrecon.errors import DaskreconError
from daskrecon.frontend.fidelity import DistributedDataFidelity
from daskrecon.frontend.measurements import DistributedMeasurements, MeasurementList
from daskrecon.frontend.omezarr import OMEImage, open_ome_zarr, write_ome_zarr
from daskrecon.frontend.physics import (
    DistributedLinearPhysics,
    DistributedPhysics,
    DistributedStackedLinearPhysics,
    DistributedStackedPhysics,
)
from daskrecon.frontend.processing import DistributedPrior, DistributedProcessing
from daskrecon.planning.receptive import receptive_radius
from daskrecon.planning.reduction import reduction_plan
from daskrecon.engine.signal import DistributedSignal
from daskrecon.frontend.reconstruct import reconstruct
from daskrecon.operators.slicewise import slicewise
from daskrecon.planning import strategies

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
    "MeasurementList",
    "OMEImage",
    "TilingConfig",
    "DistributedStackedLinearPhysics",
    "DistributedStackedPhysics",
    "distribute",
    "make_distrib_bundle",
    "open_ome_zarr",
    "receptive_radius",
    "reconstruct",
    "reduction_plan",
    "register",
    "slicewise",
    "strategies",
    "write_ome_zarr",
]
