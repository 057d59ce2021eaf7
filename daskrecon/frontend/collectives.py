"""deepinv's rank API for a Dask driver: one rank, which sees every result.

A ``deepinv.distributed`` script runs once per rank (SPMD); each rank holds part of the
work and the ranks combine results with collectives. Under daskrecon the script runs once,
on the driver, and every distributed call already returns the *whole* result (operators and
tiles run on the workers, results are reduced or gathered before they come back). So the
driver is a world of one rank: ``rank == 0``, ``world_size == 1``, ``local_indices(n)`` is
every index, and each collective is what torch.distributed does in a one-process group:

========================================  ==================================================
call                                      result on the driver
========================================  ==================================================
``all_reduce(t, op=SUM|AVG|MAX|...)``     ``t`` unchanged (returned, as deepinv 0.5 does)
``broadcast(t, src=0)``                   ``t`` unchanged; ``src`` other than 0 is an error
``all_gather(t)``                         ``t.unsqueeze(0)`` (shape ``(world_size, ...)``)
``all_gather(tensor_list, t)``            ``tensor_list[0]`` receives a copy of ``t``
``all_gather_object(objs, obj)``          ``objs[0] = obj``
``broadcast_object_list(objs, src=0)``    ``objs`` unchanged
``barrier()``                             returns at once
``all_reduce_(t, op="sum"|"mean")``       the user guide's in-place form; ``t`` unchanged
========================================  ==================================================

A script that sums a per-rank value and divides by ``world_size`` therefore gets the right
answer. The number of Dask workers is :attr:`DistributedContext.num_workers`.
``use_dist`` is ``False``: there is no ``torch.distributed`` process group, so a script that
calls ``torch.distributed`` itself under ``if ctx.use_dist:`` skips it, as in a plain
single-process run. Other ``torch.distributed`` names reached through the context are no-ops
returning ``None``, as deepinv's context does without a process group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from daskrecon.planning.reduction import REDUCTIONS

__all__ = ["SingleRank"]

_OPS = ("SUM", "AVG", "MEAN", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR", "PREMUL_SUM")


def _check_op(op: Any) -> None:
    name = op if isinstance(op, str) else getattr(op, "name", None) or str(op).rsplit(".", 1)[-1]
    if str(name).upper() not in _OPS:
        raise ValueError(f"op must be a torch.distributed.ReduceOp (or 'sum'/'mean'), got {op!r}")


def _check_src(src: int) -> None:
    if src != 0:
        raise ValueError(f"src={src}: the driver is the only rank (rank 0) of a daskrecon context")


class SingleRank:
    """The rank API of :class:`~daskrecon.DistributedContext` (see the module docstring)."""

    rank = 0
    local_rank = 0
    world_size = 1
    local_world_size = 1
    use_dist = False
    is_dist = False
    created_dist = False
    backend: str | None = None

    def local_indices(self, num_items: int) -> list[int]:
        """Indices of ``num_items`` items this rank handles: all of them (round robin over one rank)."""
        if not isinstance(num_items, int) or num_items < 0:
            raise ValueError(f"num_items must be a non-negative int, got {num_items!r}")
        return list(range(num_items))

    def get_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def all_reduce(self, x: torch.Tensor, op: Any = "sum", group: Any = None, **kwargs: Any) -> torch.Tensor:
        """Reduce ``x`` over the ranks: over one rank, ``x`` itself (returned)."""
        _check_op(op)
        return x

    def all_reduce_(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The older user guide's in-place reduction (``"sum"`` or ``"mean"``): ``x`` unchanged."""
        if op not in REDUCTIONS:
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0, group: Any = None, **kwargs: Any) -> torch.Tensor:
        """Broadcast from rank ``src``: this rank's ``x`` (returned)."""
        _check_src(src)
        return x

    def broadcast_(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """The older user guide's in-place broadcast."""
        return self.broadcast(x, src)

    def all_gather(self, x: Any, tensor: torch.Tensor | None = None, group: Any = None, **kwargs: Any) -> Any:
        """``all_gather(x)`` (deepinv 0.5) → ``x.unsqueeze(0)``; ``all_gather(list, x)`` (torch) fills ``list[0]``."""
        if isinstance(x, list):
            if tensor is None or len(x) != 1:
                raise ValueError("all_gather(tensor_list, tensor) needs a list of world_size=1 tensors and a tensor")
            if isinstance(x[0], torch.Tensor) and x[0].shape == tensor.shape:
                x[0].copy_(tensor)  # torch fills the caller's buffers in place
            else:
                x[0] = tensor.clone()
            return None
        return x.unsqueeze(0)

    def all_gather_object(self, object_list: list, obj: Any, group: Any = None) -> None:
        """``object_list[0] = obj`` (one rank)."""
        if len(object_list) > 0:
            object_list[0] = obj
        return None

    def broadcast_object_list(self, object_list: list, src: int = 0, group: Any = None, device: Any = None) -> list:
        """``object_list`` unchanged (it is rank 0's)."""
        _check_src(src)
        return object_list

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """Returns at once: there is no other rank to wait for."""
        return None

    def __getattr__(self, name: str) -> Callable[..., None]:
        # deepinv's context forwards unknown names to torch.distributed and, without a process
        # group, answers None; do the same for torch.distributed's names only.
        if not name.startswith("_") and torch.distributed.is_available() and hasattr(torch.distributed, name):
            return lambda *args, **kwargs: None
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
