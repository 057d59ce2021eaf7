"""`DistributedSignal`: the iterate of a reconstruction, as a tensor or as a chunked array on the cluster.

A *chunked* signal never lives on the driver: its value is a dask array whose chunks are
persisted in cluster memory, or stored in a double-buffered Zarr array (a
:class:`~daskrecon.engine.checkpoint.Checkpoint`) when it is larger than memory. Every update
computes the new value together with any reductions asked for (``also``) in one pass, and
commits it atomically when a store is set. Several signals sharing one store (an
algorithm's whole state) are updated and committed together by :func:`advance`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import torch
from distributed import futures_of

from daskrecon.engine.checkpoint import Checkpoint
from daskrecon.errors import ShapeError
from daskrecon.runtime.waiting import cancel, compute, drain, gather

if TYPE_CHECKING:  # annotations only: the front is a layer above
    from daskrecon.frontend.context import DistributedContext

__all__ = ["DistributedSignal", "Pending", "advance", "submit"]

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
    store : str or Checkpoint, optional
        A local directory or an fsspec URL (``s3://…``), or a
        :class:`~daskrecon.engine.checkpoint.Checkpoint` shared with other signals: every update is
        committed there crash-safely (double-buffered Zarr array + atomic commit record):
        the stored state is never half old, half new, and :meth:`restore` reads the last
        complete one back. The workers write it: it must be a location they all see
        (checked before the first write, :mod:`daskrecon.runtime.storage`), new, empty or
        daskrecon's own.
    chunks : tuple, optional
        Makes the signal *chunked*: its value is a dask array with these chunks (a tuple of
        ints, or dask's tuple of tuples), persisted in cluster memory or streamed through
        ``store``. Given a dask ``init``, its chunks are used. :attr:`chunks` gives the size
        per axis, :attr:`block_chunks` dask's full form.
    storage_options : dict, optional
        fsspec options for a URL ``store``.
    fits_bytes : int
        A chunked signal's :attr:`data` is a tensor up to this size, else a dask array.
    name : str
        The array's name in ``store`` (``"x"``; an algorithm's other state arrays have others).
    in_memory : bool, optional
        Chunked signals: keep the value in cluster memory (default without ``store``) or
        stream it through ``store`` (default with one: the value may exceed the cluster's
        memory). In memory with a store, the store is written when an update is committed.

    Notes
    -----
    ``iteration`` counts updates. Without ``chunks`` the driver holds the value as a
    tensor, as deepinv's ``DistributedSignal`` does.
    """

    def __init__(self, ctx: DistributedContext, shape: Sequence[int], dtype: torch.dtype | Any = torch.float32,
                 init: Any = None, store: str | os.PathLike | Checkpoint | None = None, *,
                 chunks: Sequence[Any] | None = None, storage_options: dict | None = None,
                 fits_bytes: int = FITS_BYTES, name: str = "x", in_memory: bool | None = None) -> None:
        self.ctx = ctx
        self.shape = torch.Size(shape)
        self._np_dtype = dtype if isinstance(dtype, np.dtype) else torch.empty((), dtype=dtype).numpy().dtype
        self.dtype = torch.from_numpy(np.empty((), self._np_dtype)).dtype
        self.fits_bytes = fits_bytes
        self.name = name
        if chunks is None and isinstance(init, da.Array):
            chunks = init.chunks
        self.block_chunks = None if chunks is None else _normalize(chunks, tuple(self.shape))
        if store is not None and not isinstance(store, Checkpoint):
            store = Checkpoint(store, storage_options)
        self._store: Checkpoint | None = store
        self.in_memory = (store is None) if in_memory is None else bool(in_memory)
        if not self.in_memory and store is None:
            raise ValueError("a signal streamed through Zarr (in_memory=False) needs a store")
        self._tensor: torch.Tensor | None = None
        self._array: da.Array | None = None
        self.iteration = 0
        if init is not None:
            self._set(init, 0)  # stored (when a store is set) as iteration 0, like the count
        elif self.block_chunks is None:
            self._tensor = torch.zeros(self.shape, dtype=self.dtype, device=ctx.device)
        else:
            self._array = da.zeros(tuple(self.shape), chunks=self.block_chunks, dtype=self._np_dtype)

    @property
    def chunked(self) -> bool:
        return self.block_chunks is not None

    @property
    def chunks(self) -> tuple[int, ...] | None:
        """The chunk size along each axis (the last chunk may differ: :attr:`block_chunks`)."""
        return None if self.block_chunks is None else tuple(c[0] for c in self.block_chunks)

    @property
    def store(self) -> Checkpoint | None:
        return self._store

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
        """The current value as a dask array (lazy; in cluster memory or read chunk by chunk from the store)."""
        if not self.chunked:
            return da.from_array(self._tensor.detach().cpu().numpy())
        return self._array

    def _compute(self, arr: da.Array) -> Any:
        return compute([arr], client=self.ctx.client, what="signal", stall_timeout=self.ctx.stall_timeout)[0]

    def update_(self, value: Any) -> DistributedSignal:
        """Replace the value (a tensor or a dask array of the signal's shape); commit it if a store is set."""
        return self._set(value, self.iteration + 1)

    copy_ = update_

    def _check(self, value: Any) -> Any:
        if isinstance(value, DistributedSignal):
            value = value.array if value.chunked else value.data
        if not isinstance(value, (torch.Tensor, da.Array)):
            raise TypeError(f"update_ takes a torch.Tensor or a dask array (or a DistributedSignal), got "
                            f"{type(value).__name__}")
        if tuple(value.shape) != tuple(self.shape):
            raise ShapeError(f"update_ got shape {tuple(value.shape)} for a signal of shape {tuple(self.shape)}")
        if isinstance(value, torch.Tensor) and (value.is_complex() != self.dtype.is_complex):
            raise TypeError(f"update_ got a {value.dtype} tensor for a {self.dtype} signal")
        return value

    def _set(self, value: Any, iteration: int) -> DistributedSignal:
        value = self._check(value)
        # The count moves only once the new value is in place (and committed, with a store).
        if not self.chunked:
            if isinstance(value, da.Array):
                value = torch.from_numpy(np.asarray(self._compute(value)))
            tensor = value.detach().to(device=self.ctx.device, dtype=self.dtype).clone()
            if self._store is not None:
                self._store.save(iteration, tensor.cpu().numpy(), {"shape": list(self.shape)}, name=self.name)
            self._tensor, self.iteration = tensor, iteration
            return self
        advance({self.name: self}, {self.name: value}, iteration=iteration, commit=self._store is not None,
                record={"shape": list(self.shape)})
        return self

    def restore(self) -> DistributedSignal:
        """Load the last committed value from the store."""
        if self._store is None:
            raise ValueError("this signal has no store to restore from")
        meta = self._store.meta()
        if self.chunked:
            arr = self._store.committed(self.name, self.block_chunks).astype(self._np_dtype)
            self._array = self.ctx.client.persist(arr) if self.in_memory else arr
            self.iteration = meta["iteration"]
            return self
        saved = self._store.load(self.name)
        self._tensor = torch.from_numpy(saved.x).to(device=self.ctx.device, dtype=self.dtype)
        self.iteration = saved.iteration
        return self

    def clone(self) -> Any:
        return self._tensor.clone() if not self.chunked else self.array.copy()

    def __repr__(self) -> str:
        kind = f"chunks={self.chunks}" if self.chunked else "tensor"
        where = ("" if not self.chunked else ", in cluster memory" if self.in_memory
                 else f", streamed via {self._store}")
        return f"DistributedSignal(shape={tuple(self.shape)}, {kind}{where}, iteration={self.iteration})"


def advance(
    signals: dict[str, DistributedSignal],
    values: dict[str, Any],
    *,
    iteration: int,
    also: dict[str, Any] | None = None,
    commit: bool = True,
    record: dict | None = None,
    extra: dict | Callable[[dict], dict] | None = None,
    unchanged: Collection[str] = (),
) -> dict[str, Any]:
    """Give chunked signals new values in one pass, compute ``also`` with them, and commit.

    The signals share one store (or none). In-memory signals are persisted on the workers;
    streamed ones are written into their store's free slot. ``also`` (lazy reductions of
    the same graph: metrics) is computed in the same submission. With ``commit`` and a
    store, every signal is written to the free slot and the slot committed atomically, with
    ``record`` (the problem) and ``extra`` (or ``extra(values)``) in the commit record.
    Signals named in ``unchanged`` are not written: the caller vouches that both slots of the
    store hold their value already. :func:`submit` then :meth:`Pending.finish`.

    Returns
    -------
    dict
        The computed ``also``.
    """
    return submit(signals, values, iteration=iteration, also=also, commit=commit, record=record,
                  extra=extra, unchanged=unchanged).finish()


class Pending:
    """An :func:`advance` submitted to the cluster and not yet finished.

    ``kept`` maps the in-memory signals' names to their new values (persisted dask arrays):
    a next iteration can be built on them before this one's reductions come back. The
    signals themselves change only in :meth:`finish`.
    """

    def __init__(self, signals: dict[str, DistributedSignal], kept: dict[str, da.Array], waited: list[list],
                 names: list[str], n_stores: int, slot: int | None, iteration: int, record: dict | None,
                 extra: dict | Callable[[dict], dict] | None, graphs: Sequence[Any] = ()) -> None:
        self.signals, self.kept, self._waited, self._names = signals, kept, waited, names
        self._n_stores, self.slot, self.iteration = n_stores, slot, iteration
        self._record, self._extra = record, extra
        self._graphs = list(graphs)  # the submitted graphs: which tasks are this submission's, if it is cancelled
        #: Whether :meth:`finish` returned or :meth:`cancel` ran: the submission is over.
        self.done = False

    @property
    def commits(self) -> bool:
        """Whether :meth:`finish` commits a slot of the store."""
        return self.slot is not None

    def finish(self) -> dict[str, Any]:
        """Wait for the reductions (never for ever), commit, give the signals their new values: the ``also`` values."""
        first = next(iter(self.signals.values()))
        ctx, store = first.ctx, first.store
        flat = [f for fs in self._waited for f in fs]
        try:
            results = gather(ctx.client, flat, what=f"iteration {self.iteration}",
                             stall_timeout=ctx.stall_timeout) if flat else []
        except BaseException:  # a failed task, Ctrl-C: the rest of the submission is not wanted any more
            self.cancel()
            raise
        out, pos = {}, len(flat) - sum(len(fs) for fs in self._waited[self._n_stores:])
        for k, fs in zip(self._names, self._waited[self._n_stores:]):
            out[k] = results[pos] if len(fs) == 1 else results[pos:pos + len(fs)]
            pos += len(fs)
        if self.commits:
            extra = self._extra(out) if callable(self._extra) else self._extra
            store.commit(self.iteration, self.slot, self._record or {}, extra)
        for n, s in self.signals.items():
            s._array = self.kept[n] if s.in_memory else store.committed(n, s.block_chunks).astype(s._np_dtype)
            s.iteration = self.iteration
        self.done, self._graphs = True, []
        return out

    def cancel(self) -> None:
        """Drop the submission: its tasks not started never run, and when it writes to a store, wait
        (up to ``stall_timeout``, at most a minute) for its running ones to end, so that nothing
        writes there once the caller goes on (to remove a temporary folder, to start again).
        """
        if self.done:
            return
        self.done = True
        first = next(iter(self.signals.values()))
        ctx, store = first.ctx, first.store
        futures = [f for fs in self._waited for f in fs] + [f for a in self.kept.values() for f in futures_of(a)]
        graphs, self._graphs = self._graphs, []
        try:
            if futures:
                cancel(ctx.client, futures)
            if store is not None:  # running tasks may still write chunks into it
                drain(ctx.client, {k for g in graphs for k in g.keys()}, min(ctx.stall_timeout, 60.0))
        except Exception:  # the cluster is gone: nothing of this submission runs any more
            pass


def submit(
    signals: dict[str, DistributedSignal],
    values: dict[str, Any],
    *,
    iteration: int,
    also: dict[str, Any] | None = None,
    commit: bool = True,
    record: dict | None = None,
    extra: dict | Callable[[dict], dict] | None = None,
    unchanged: Collection[str] = (),
) -> Pending:
    """The first half of :func:`advance`: one submission of the new values, writes and ``also``."""
    if not signals:
        raise ValueError("advance needs at least one signal")
    first = next(iter(signals.values()))
    ctx, store = first.ctx, first.store
    if any(s.store is not store for s in signals.values()):
        raise ValueError("signals advanced together must share one store (or have none)")
    client = ctx.client
    arrays = {}
    for name, s in signals.items():
        v = s._check(values[name])
        if isinstance(v, torch.Tensor):
            v = da.from_array(v.detach().cpu().numpy(), chunks=s.block_chunks)
        arrays[name] = v.astype(s._np_dtype).rechunk(s.block_chunks)
    streamed = [n for n, s in signals.items() if not s.in_memory]
    committing = store is not None and (commit or streamed)
    names = list(also or {})
    keep = [n for n, s in signals.items() if s.in_memory]
    if committing:  # the workers write the store: it must be theirs too (checked again when they change)
        store.ensure_shared(ctx, why=f"signal {', '.join(signals)} is written there by the workers")
    written = {n: a for n, a in arrays.items() if n not in unchanged}
    slot, stores = store.store_tasks(written) if committing else (None, [])
    # One submission for everything: new values, writes, metrics. Unoptimized, so that every key
    # (and the placement annotations) is the graph's own, and keys shared between the
    # collections are computed once.
    collections = [*(arrays[n] for n in keep), *stores, *(also[k] for k in names)]
    with dask.config.set({"optimization.fuse.active": False}):
        persisted = client.persist(collections, optimize_graph=False)
    kept = dict(zip(keep, persisted[:len(keep)]))
    waited = [futures_of(p) for p in persisted[len(keep):]]
    return Pending(signals, kept, waited, names, len(stores), slot if committing else None, iteration, record, extra,
                   graphs=[c.__dask_graph__() for c in collections] if store is not None else ())


def _normalize(chunks: Sequence[Any], shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    if len(chunks) != len(shape):
        raise ShapeError(f"chunks {tuple(chunks)} do not match the signal's {len(shape)} axes")
    return da.core.normalize_chunks(tuple(chunks), shape)
