"""`OperatorView`: operator ``i`` of a distributed stack as a deepinv ``LinearPhysics``.

``dphys[i]`` (and ``dphys.physics_list``) hand deepinv code that walks a stack operator by
operator — deepinv 0.5's ``OSEM`` and ``BSREM`` visit ``physics[l]`` subset by subset,
``StackedPhysics([...])`` flattens ``physics_list`` — an object that runs that one operator where
it lives: ``A`` and ``A_adjoint`` are one task on the worker holding ``A_i``; the operator never
comes to the driver.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import torch
from deepinv.physics import LinearPhysics
from deepinv.utils import TensorList

from daskrecon.frontend.autograd import needs_grad
from daskrecon.runtime.arrays import as_numpy, gather_tensors, place
from daskrecon.tasks import operators as operator_tasks

__all__ = ["OperatorView"]


class OperatorView(LinearPhysics):
    """Operator ``i`` of a :class:`~daskrecon.DistributedLinearPhysics`, run on its worker.

    Made by indexing the stack (``dphys[i]``), not directly. ``A(x)`` and ``A_adjoint(y)`` take
    and return tensors on the driver (``y`` the measurement of this operator alone), each one
    task on the worker that holds ``A_i``, bit for bit the operator's own computation;
    ``forward(x)`` adds the operator's noise, seeded from the driver's RNG. The other
    ``LinearPhysics`` methods (``A_adjoint_A``, ``A_dagger``, ``compute_sqnorm``, ...) are
    deepinv's, built on these two.

    Views do not differentiate through the workers (their inputs must not require grad) and do
    not take dask arrays: for either, call the stack's own methods.

    Parameters
    ----------
    stack : DistributedLinearPhysics
    index : int
        ``i``, in ``0 … N − 1``.
    """

    def __init__(self, stack: Any, index: int) -> None:
        super().__init__()
        self.__dict__["stack"] = stack  # not a submodule: the stack is not part of this operator's state
        self.index = index

    def _run(self, fn: Any, value: torch.Tensor, name: str, shared: tuple, owned: bool) -> torch.Tensor:
        stack, i = self.stack, self.index
        if isinstance(value, (da.Array, TensorList, list, tuple)) or not isinstance(value, torch.Tensor):
            raise TypeError(f"operator {i} of the stack takes a torch.Tensor {name}, got {type(value).__name__}; "
                            "for dask arrays or lists of measurements call the stack itself")
        if needs_grad(value):
            raise TypeError(f"operator {i} of the stack runs without autograd ({name} requires grad): "
                            "call the stack's methods, whose backward runs on the workers")
        client = stack.ctx.client
        owner = stack.owners[i]
        fut = place(client, as_numpy(value, name), owner if owned else None)
        futs = stack.placement.map(fn, objects=[stack.objects], per_op=[{i: fut}], shared=shared, indices=[i])
        return gather_tensors(client, futs, stack.ctx.device, f"{fn.__name__} of operator", labels={futs[0].key: f"operator {i}"},
                              stall_timeout=stack.ctx.stall_timeout)[0]

    def A(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``A_i x``, on the worker holding ``A_i``."""
        return self._run(operator_tasks.forward_op, x, "x", (kwargs, None, False), owned=False)

    def A_adjoint(self, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``A_iᵀ y``, on the worker holding ``A_i``."""
        return self._run(operator_tasks.adjoint_op, y, "y", (kwargs, False), owned=True)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Noisy ``A_i x`` (the operator's noise model), seeded from the driver's RNG."""
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return self._run(operator_tasks.forward_op, x, "x", (kwargs, seed, True), owned=False)

    def update_parameters(self, **kwargs: Any) -> None:
        """deepinv's ``update_parameters`` on this operator, where it lives (and on the driver's copy)."""
        self.stack.update_operators("update_parameters", kwargs, [self.index])

    def update(self, **kwargs: Any) -> None:
        """deepinv's ``update`` (parameters and noise model) on this operator."""
        self.stack.update_operators("update", kwargs, [self.index])

    def set_noise_model(self, noise_model: Any, **kwargs: Any) -> None:
        """This operator's noise model, where it lives."""
        self.stack.update_operators("set_noise_model", {"noise_model": noise_model}, [self.index])

    def extra_repr(self) -> str:
        return f"operator {self.index} of {len(self.stack)}, on {self.stack.owners[self.index]}"
