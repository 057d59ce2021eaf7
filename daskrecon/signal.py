"""`DistributedSignal`: the iterate of a reconstruction, optionally committed to Zarr at every update."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from daskrecon.checkpoint import Checkpoint
from daskrecon.context import DistributedContext
from daskrecon.errors import ShapeError

__all__ = ["DistributedSignal"]


class DistributedSignal:
    """The signal being reconstructed (the user guide's ``DistributedSignal``).

    Parameters
    ----------
    ctx : DistributedContext
    shape : sequence of int
        ``(B, C, *spatial)``.
    dtype : torch.dtype
    init : torch.Tensor, optional
        Initial value (default zeros).
    store : str, optional
        A local directory: every :meth:`update_` is committed there crash-safely
        (double-buffered Zarr array + atomic commit file, :mod:`daskrecon.checkpoint`),
        so the last complete state survives a crash; :meth:`restore` reads it back.

    Notes
    -----
    The driver holds the current value as a tensor (the iterate must fit the driver);
    every distributed operation takes it from :attr:`data`. ``iteration`` counts updates.
    """

    def __init__(self, ctx: DistributedContext, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 init: torch.Tensor | None = None, store: str | None = None) -> None:
        self.ctx = ctx
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._store = Checkpoint(store) if store else None
        self._data = torch.zeros(self.shape, dtype=dtype, device=ctx.device)
        self.iteration = 0
        if init is not None:
            self.update_(init)
            self.iteration = 0

    @property
    def data(self) -> torch.Tensor:
        """The current value."""
        return self._data

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        self.update_(value)

    tensor = data

    def update_(self, value: Any) -> DistributedSignal:
        """Replace the value (a tensor of the signal's shape) and commit it if a store is set."""
        value = getattr(value, "data", value) if isinstance(value, DistributedSignal) else value
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"update_ takes a torch.Tensor (or a DistributedSignal), got {type(value).__name__}")
        if value.shape != self.shape:
            raise ShapeError(f"update_ got shape {tuple(value.shape)} for a signal of shape {tuple(self.shape)}")
        self._data = value.detach().to(device=self.ctx.device, dtype=self.dtype).clone()
        self.iteration += 1
        if self._store is not None:
            self._store.save(self.iteration, self._data.cpu().numpy(), {"shape": list(self.shape)})
        return self

    copy_ = update_

    def restore(self) -> DistributedSignal:
        """Load the last committed value from the store."""
        if self._store is None:
            raise ValueError("this signal has no store to restore from")
        saved = self._store.load()
        self._data = torch.from_numpy(saved.x).to(device=self.ctx.device, dtype=self.dtype)
        self.iteration = saved.iteration
        return self

    def clone(self) -> torch.Tensor:
        return self._data.clone()

    def __repr__(self) -> str:
        return f"DistributedSignal(shape={tuple(self.shape)}, iteration={self.iteration})"
