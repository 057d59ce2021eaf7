"""deepinv 0.5's ``deepinv.distributed.framework`` names, for scripts that import from there.

``from deepinv.distributed.framework import DistributedStackedLinearPhysics`` becomes
``from daskrecon.frontend.framework import DistributedStackedLinearPhysics``.
"""

from __future__ import annotations

from daskrecon.frontend.autograd import DistributedReplicatedParameters
from daskrecon.frontend.context import DistributedContext
from daskrecon.frontend.fidelity import DistributedDataFidelity
from daskrecon.frontend.physics import DistributedStackedLinearPhysics, DistributedStackedPhysics
from daskrecon.frontend.processing import DistributedProcessing

__all__ = [
    "DistributedContext",
    "DistributedDataFidelity",
    "DistributedProcessing",
    "DistributedReplicatedParameters",
    "DistributedStackedLinearPhysics",
    "DistributedStackedPhysics",
]
