"""deepinv 0.5's ``deepinv.distributed.framework`` names, for scripts that import from there.

``from deepinv.distributed.framework import DistributedStackedLinearPhysics`` becomes
``from daskrecon.framework import DistributedStackedLinearPhysics``.
"""

from __future__ import annotations

from daskrecon.autograd import DistributedReplicatedParameters
from daskrecon.context import DistributedContext
from daskrecon.fidelity import DistributedDataFidelity
from daskrecon.physics import DistributedStackedLinearPhysics, DistributedStackedPhysics
from daskrecon.processing import DistributedProcessing

__all__ = [
    "DistributedContext",
    "DistributedDataFidelity",
    "DistributedProcessing",
    "DistributedReplicatedParameters",
    "DistributedStackedLinearPhysics",
    "DistributedStackedPhysics",
]
