"""
A deepinv.distributed script, unchanged but for its import
==========================================================

deepinv's ``demo_physics_distributed.py`` pattern (stacked blurs, forward, adjoint, checks
against the non-distributed stack), with ``from deepinv.distributed import ...`` replaced by
``from daskrecon import ...``. It runs without torchrun: the context starts a local cluster.
Like deepinv's demos, it opens the context at module level, without an
``if __name__ == "__main__":`` guard.
"""

import torch
from deepinv.physics import Blur, stack
from deepinv.physics.functional.blur import gaussian_blur

from daskrecon import DistributedContext, distribute  # was: from deepinv.distributed import ...

with DistributedContext(seed=42) as ctx:
    clean = torch.rand(1, 3, 128, 128, device=ctx.device)
    ops = [Blur(filter=gaussian_blur(sigma=(s, s)), padding="circular") for s in (1.0, 2.5)]
    ops.append(Blur(filter=gaussian_blur(sigma=(1.5, 3.5), angle=30), padding="circular"))
    stacked_physics = stack(*ops)
    distributed_physics = distribute(stacked_physics, ctx)
    if ctx.rank == 0:
        print(f"Running on {ctx.world_size} process(es); local operators: {len(distributed_physics.local_indexes)}")
    measurements = distributed_physics(clean)
    if ctx.rank == 0:
        reference = stacked_physics(clean)
        diff = max((measurements[i] - reference[i]).abs().max().item() for i in range(len(ops)))
        print(f"forward: {len(measurements)} measurements, max diff {diff:.2e}")
        assert diff < 1e-5
    adjoint = distributed_physics.A_adjoint(measurements)
    if ctx.rank == 0:
        diff = (adjoint - stacked_physics.A_adjoint(measurements)).abs().max().item()
        print(f"adjoint: max diff {diff:.2e}")
        assert diff < 1e-5
    ata = distributed_physics.A_adjoint_A(clean)
    if ctx.rank == 0:
        diff = (ata - stacked_physics.A_adjoint_A(clean)).abs().max().item()
        print(f"A^T A: max diff {diff:.2e}")
        assert diff < 1e-5
