"""deepinv 0.5's ``deepinv.distributed.framework`` names, for scripts that import from there.

``from deepinv.distributed.framework import DistributedStackedLinearPhysics`` becomes
``from daskrecon.framework import DistributedStackedLinearPhysics``.
"""

from __future__ import annotations

from typing import Any

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


class DistributedReplicatedParameters:
    """deepinv 0.5's gradient-synchronised parameters: for training, not supported yet.

    Raises
    ------
    NotImplementedError
        Always: gradients do not flow through daskrecon's distributed operations yet
        (issue #15).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "DistributedReplicatedParameters synchronises parameter gradients for training through distributed "
            "operators, which daskrecon does not support yet (issue #15)"
        )
