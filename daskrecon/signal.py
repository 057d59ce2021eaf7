"""`DistributedSignal`: the iterate of a reconstruction, as a tensor or as a chunked array in Zarr."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import torch

from daskrecon.checkpoint import Checkpoint
from daskrecon.context import DistributedContext
from daskrecon.errors import ShapeError
from daskrecon.waiting import compute

__all__ = ["DistributedSignal"]

#: ``.data`` of a chunked signal is a tensor up to this size, else a dask array.
FITS_BYTES = 256 * 2**20


class DistributedSignal:
    """The signal being reconstructed (the user guide's ``DistributedSignal``).

    Parameters
    ----------
    ctx : DistributedContext
    shape : sequence of int
        ``(B, C, *spatial)``.
    dtype : torch.dtype
    init : torch.Tensor or dask array, optional
        Initial value (default zeros).
    store : str, optional
        A local directory or an fsspec URL (``s3://…``): every :meth:`update_` is
        committed there crash-safely (double-buffered Zarr array + atomic commit record,
        :mod:`daskrecon.checkpoint`): the stored state is never half old, half new, and
        :meth:`restore` reads the last complete one back.
    chunks : tuple of int, optional
        Makes the signal *chunked*: its value is a dask array with these chunks, written
        chunk by chunk to ``store`` (or persisted in cluster memory when ``store`` is
        None), so it may be larger than the driver's memory. Given a dask ``init``, its
        chunks are used.
    storage_options : dict, optional
        fsspec options for a URL ``store``.
    fits_bytes : int
        A chunked signal's :attr:`data` is a tensor up to this size, else a dask array.

    Notes
    -----
    ``iteration`` counts updates. Without ``chunks`` the driver holds the value as a
    tensor, as deepinv's ``DistributedSignal`` does.
    """

    def __init__(self, ctx: DistributedContext, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 init: Any = None, store: str | None = None, *, chunks: Sequence[int] | None = None,
                 storage_options: dict | None = None, fits_bytes: int = FITS_BYTES) -> None:
        self.ctx = ctx
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.fits_bytes = fits_bytes
        self._np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        if chunks is None and isinstance(init, da.Array):
            chunks = tuple(c[0] for c in init.chunks)
        self.chunks = None if chunks is None else tuple(int(c) for c in chunks)
        if self.chunks is not None and len(self.chunks) != len(self.shape):
            raise ShapeError(f"chunks {self.chunks} do not match the signal's {len(self.shape)} axes")
        self._store = Checkpoint(store, storage_options) if store else None
        self._tensor: torch.Tensor | None = None
        self._array: da.Array | None = None
        self.iteration = 0
        if init is not None:
            self._set(init, 0)  # stored (when a store is set) as iteration 0, like the count
        elif self.chunks is None:
            self._tensor = torch.zeros(self.shape, dtype=dtype, device=ctx.device)
        else:
            self._array = da.zeros(tuple(self.shape), chunks=self.chunks, dtype=self._np_dtype)

    @property
    def chunked(self) -> bool:
        return self.chunks is not None

    @property
    def data(self) -> Any:
        """The current value: a tensor, or a dask array for a chunked signal above ``fits_bytes``."""
        if not self.chunked:
            return self._tensor
        arr = self.array
        if arr.nbytes <= self.fits_bytes:
            return torch.from_numpy(np.asarray(self._compute(arr))).to(self.ctx.device)
        return arr

    @data.setter
    def data(self, value: Any) -> None:
        self.update_(value)

    tensor = data

    @property
    def array(self) -> da.Array:
        """The current value as a dask array (lazy; read chunk by chunk from the store)."""
        if not self.chunked:
            return da.from_array(self._tensor.detach().cpu().numpy())
        return self._array

    def _compute(self, arr: da.Array) -> Any:
        return compute([arr], client=self.ctx.client, what="signal", stall_timeout=self.ctx.stall_timeout)[0]

    def update_(self, value: Any) -> DistributedSignal:
        """Replace the value (a tensor or a dask array of the signal's shape); commit it if a store is set."""
        return self._set(value, self.iteration + 1)

    def _set(self, value: Any, iteration: int) -> DistributedSignal:
        if isinstance(value, DistributedSignal):
            value = value.array if value.chunked else value.data
        if not isinstance(value, (torch.Tensor, da.Array)):
            raise TypeError(f"update_ takes a torch.Tensor or a dask array (or a DistributedSignal), got "
                            f"{type(value).__name__}")
        if tuple(value.shape) != tuple(self.shape):
            raise ShapeError(f"update_ got shape {tuple(value.shape)} for a signal of shape {tuple(self.shape)}")
        if isinstance(value, torch.Tensor) and (value.is_complex() != self.dtype.is_complex):
            raise TypeError(f"update_ got a {value.dtype} tensor for a {self.dtype} signal")
        # The count moves only once the new value is in place (and committed, with a store).
        if not self.chunked:
            if isinstance(value, da.Array):
                value = torch.from_numpy(np.asarray(self._compute(value)))
            tensor = value.detach().to(device=self.ctx.device, dtype=self.dtype).clone()
            if self._store is not None:
                self._store.save(iteration, tensor.cpu().numpy(), {"shape": list(self.shape)})
            self._tensor, self.iteration = tensor, iteration
            return self
        if isinstance(value, torch.Tensor):
            value = da.from_array(value.detach().cpu().numpy(), chunks=self.chunks)
        value = value.astype(self._np_dtype).rechunk(self.chunks)
        if self._store is not None:
            self._store.save_dask(iteration, value, {"shape": list(self.shape)}, client=self.ctx.client,
                                  stall_timeout=self.ctx.stall_timeout)
            self._array = self._store.committed()
        else:
            self._array = value.persist()  # held by the workers, not the driver
        self.iteration = iteration
        return self

    copy_ = update_

    def restore(self) -> DistributedSignal:
        """Load the last committed value from the store."""
        if self._store is None:
            raise ValueError("this signal has no store to restore from")
        if self.chunked:
            self._array = self._store.committed()
            self.iteration = self._store.meta()["iteration"]
            return self
        saved = self._store.load()
        self._tensor = torch.from_numpy(saved.x).to(device=self.ctx.device, dtype=self.dtype)
        self.iteration = saved.iteration
        return self

    def clone(self) -> Any:
        return self._tensor.clone() if not self.chunked else self.array.copy()

    def __repr__(self) -> str:
        kind = f"chunks={self.chunks}" if self.chunked else "tensor"
        return f"DistributedSignal(shape={tuple(self.shape)}, {kind}, iteration={self.iteration})"
