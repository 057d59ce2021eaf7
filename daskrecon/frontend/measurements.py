"""Measurements of a stack: `DistributedMeasurements` (each ``y_i`` kept on the worker that owns operator
``i``) and `MeasurementList` (the ``TensorList`` a distributed physics returns)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from deepinv.utils import TensorList
from distributed import Future

from daskrecon.errors import MeasurementError
from daskrecon.frontend.context import DistributedContext
from daskrecon.runtime.arrays import as_numpy, gather_tensors, place_on_owners
from daskrecon.tasks import operators as operator_tasks

__all__ = ["DistributedMeasurements", "MeasurementList"]

#: ``torch.*_like`` functions a MeasurementList answers entry by entry.
_LIKE = frozenset({torch.ones_like, torch.zeros_like, torch.full_like, torch.empty_like, torch.rand_like,
                   torch.randn_like})


class MeasurementList(TensorList):
    """The measurements of a distributed physics: deepinv's ``TensorList``, that also answers
    ``torch.ones_like`` (and the other ``*_like`` functions) and ``data_ptr()``.

    deepinv 0.5's ``MLEM`` and ``SIRT`` take ``torch.ones_like(y)`` (and SIRT ``y.data_ptr()`` to cache its
    normalizers), which a ``TensorList`` — the measurements of any stacked physics — does not pass.
    What a distributed physics returns does, so ``dinv.optim.MLEM()(dphys(x), dphys)`` runs, each
    operator on its worker. Wrap your own list with ``MeasurementList(list_of_tensors)``.
    """

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _LIKE and args and isinstance(args[0], TensorList):
            first, *rest = args
            return cls([func(t, *rest, **(kwargs or {})) for t in first.x])
        return NotImplemented

    def data_ptr(self) -> int:
        """One number for the entries' storage (deepinv's SIRT recomputes its normalizers when it changes)."""
        return hash(tuple(t.data_ptr() for t in self.x))


def _keeping_type(name: str) -> Any:
    base = getattr(TensorList, name)

    def method(self: MeasurementList, *args: Any, **kwargs: Any) -> Any:
        out = base(self, *args, **kwargs)
        return MeasurementList(out.x) if type(out) is TensorList else out

    method.__name__ = method.__qualname__ = name
    method.__doc__ = base.__doc__
    return method


# TensorList's entry-wise methods build plain TensorLists; a MeasurementList's stay MeasurementLists
# (deepinv's SIRT keeps ``A(1).clamp(min=eps)`` as a torch buffer, which needs ``__torch_function__``).
for _name in ("to", "clone", "detach", "cpu", "cuda", "type", "abs", "clamp", "clip", "conj", "__add__", "__mul__",
              "__rmul__", "__truediv__", "__neg__", "__sub__", "sum", "reshape", "squeeze", "unsqueeze", "isnan"):
    setattr(MeasurementList, _name, _keeping_type(_name))
del _name



class DistributedMeasurements:
    """Measurements ``y_1 … y_N`` placed once on the workers that own their operators.

    Parameters
    ----------
    ctx : DistributedContext
    y : TensorList or sequence of torch.Tensor, optional
        The measurements, sent once from the driver (``measurements_list`` is an alias).
    num_items : int, optional
        Number of measurements when built by ``factory``.
    factory : callable, optional
        ``factory(i, device, shared) -> Tensor``, run on the owning worker, so that the
        data never passes through the driver (e.g. reading a file or a Zarr store).
    shared : any, optional
        Third argument of ``factory``.
    owners : sequence of str, optional
        Worker addresses; default: the context's sharding.

    Notes
    -----
    ``y_i`` lives as a future on worker ``owners[i]``; per-operator tasks are submitted
    next to it, so a measurement crosses the network once, when it is placed.
    """

    def __init__(
        self,
        ctx: DistributedContext,
        y: Sequence[torch.Tensor] | None = None,
        *,
        num_items: int | None = None,
        factory: Callable[[int, torch.device, Any], torch.Tensor] | None = None,
        measurements_list: Sequence[torch.Tensor] | None = None,
        shared: Any = None,
        owners: Sequence[str] | None = None,
    ) -> None:
        if y is None:
            y = measurements_list
        if (y is None) == (factory is None):
            raise MeasurementError("give exactly one of y (a TensorList / list of tensors) or factory")
        self.ctx = ctx
        client = ctx.client
        if y is not None:
            if isinstance(y, torch.Tensor):
                y = [y]
            arrays = [as_numpy(t, f"y[{i}]") for i, t in enumerate(y)]
            n = len(arrays)
            self.owners = list(owners) if owners is not None else ctx.owners(n)
            self.futures: list[Future] = place_on_owners(client, arrays, self.owners)
            self.shapes = [tuple(a.shape) for a in arrays]
            self.dtypes = [a.dtype for a in arrays]
        else:
            if not isinstance(num_items, int) or num_items < 1:
                raise MeasurementError(f"a measurement factory needs num_items (a positive int), got {num_items!r}")
            n = num_items
            self.owners = list(owners) if owners is not None else ctx.owners(n)
            self.futures = [
                client.submit(operator_tasks.build_measurement, factory, i, shared, ctx.device_mode,
                              workers=[w], allow_other_workers=True, pure=False)
                for i, w in enumerate(self.owners)
            ]
            self.shapes = None
            self.dtypes = None
        if len(self.owners) != n:
            raise MeasurementError(f"owners has {len(self.owners)} entries for {n} measurements")

    def __len__(self) -> int:
        return len(self.futures)

    def indices(self) -> list[int]:
        """Global indices held (all of them: the driver sees every item)."""
        return list(range(len(self)))

    def get_by_global_index(self, i: int) -> torch.Tensor:
        """Fetch ``y_i`` to the driver."""
        if not 0 <= i < len(self):
            raise KeyError(f"measurement index {i} out of range 0..{len(self) - 1}")
        return gather_tensors(self.ctx.client, [self.futures[i]], self.ctx.device, "measurement",
                              stall_timeout=self.ctx.stall_timeout)[0]

    def gather(self) -> TensorList:
        """All measurements, fetched to the driver, in operator order."""
        return MeasurementList(gather_tensors(self.ctx.client, self.futures, self.ctx.device, "measurement",
                                         stall_timeout=self.ctx.stall_timeout))

    get_local = gather

    def __repr__(self) -> str:
        return f"DistributedMeasurements(n={len(self)}, workers={sorted(set(self.owners))})"
