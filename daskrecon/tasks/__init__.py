"""Code that runs inside Dask tasks, on the workers, one module per domain.

Everything here is a module-level function, so a task pickles as a reference to it plus
its (small or array) arguments. Operators and data fidelities live in each worker's
registry (:mod:`~daskrecon.tasks.registry`), models in its model cache
(:mod:`~daskrecon.tasks.denoising`); tasks exchange numpy arrays, which Dask's memory
accounting understands (torch tensors it does not: engineering notes §2.6).

- :mod:`~daskrecon.tasks.arrays`: devices, conversions, sums in a fixed order;
- :mod:`~daskrecon.tasks.registry`: building and finding operators and fidelities;
- :mod:`~daskrecon.tasks.operators`: per-operator ``A``, ``Aᵀ``, VJPs, norms;
- :mod:`~daskrecon.tasks.fidelity`: per-operator gradients and values, pointwise chunk kernels;
- :mod:`~daskrecon.tasks.denoising`: tiles and chunks through the model;
- :mod:`~daskrecon.tasks.local_kernels`: chunk kernels of the local operators;
- :mod:`~daskrecon.tasks.regions`: a chunk and its halo read from Zarr (strictly, for daskrecon's arrays);
- :mod:`~daskrecon.tasks.halos`: a chunk and its halo from its neighbours in memory, one axis at a time;
- :mod:`~daskrecon.tasks.substitutes`: faster equivalents of deepinv operators, built on the workers;
- :mod:`~daskrecon.tasks.storage`: the shared-storage probe;
- :mod:`~daskrecon.tasks.iteration`, :mod:`~daskrecon.tasks.linsolve`, :mod:`~daskrecon.tasks.phantoms`:
  an iteration's steps and metrics, CG and power-method pieces, synthetic test data.

May import: :mod:`daskrecon.errors`, :mod:`daskrecon.planning` — nothing of the driver.
"""

from __future__ import annotations

import torch
from dask.sizeof import sizeof


@sizeof.register(torch.Tensor)
def _sizeof_tensor(t: torch.Tensor) -> int:
    return t.element_size() * t.nelement()


@sizeof.register(torch.nn.Module)
def _sizeof_module(m: torch.nn.Module) -> int:
    tensors = list(m.parameters()) + list(m.buffers())
    return 1000 + sum(t.element_size() * t.nelement() for t in tensors)
