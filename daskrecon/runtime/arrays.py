"""Driver-side conversions between torch tensors, numpy arrays and futures."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import torch
from distributed import Client, Future

from daskrecon.runtime.waiting import gather
from daskrecon.tasks import arrays as array_tasks

__all__ = ["as_numpy", "convert_hint", "gather_arrays", "gather_tensors", "persist_fresh", "place", "place_on_owners", "usable"]


def convert_hint(v: Any) -> str:
    """For a message refusing ``v``: how to turn an array of another kind into what daskrecon takes."""
    if isinstance(v, np.ndarray):
        return " (torch.from_numpy(a), or dask.array.from_array(a, chunks=...) to keep it chunked)"
    return ""


def as_numpy(t: torch.Tensor | np.ndarray, name: str = "x") -> np.ndarray:
    """A contiguous host copy (or view) of ``t``, with a message naming ``name`` when it is no array."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t)
    if isinstance(t, torch.Tensor):
        return np.ascontiguousarray(t.detach().resolve_conj().cpu().numpy())
    raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def place(client: Client, array: Any, worker: str | None = None) -> Future:
    """Put ``array`` (or bytes) in cluster memory (on ``worker`` if given) *with lineage*.

    Unlike ``scatter``, the array travels inside a task, so the scheduler keeps it and
    recomputes the key on another worker if the one holding it dies (scattered data is
    simply lost: "already forgotten"). The price is a copy on the scheduler while the
    key is alive.
    """
    restrict = dict(workers=[worker], allow_other_workers=True) if worker else {}
    with warnings.catch_warnings():
        # the array rides in the graph on purpose (lineage); distributed's advice to load it
        # with dask instead does not apply, and would be printed on every large image
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        return client.submit(array_tasks.place_array, array, pure=False, **restrict)


def usable(future: Future | None) -> bool:
    """Whether a future placed earlier still holds its value: not cancelled (``client.restart()``, the
    dashboard's restart, cancels every future of the client), lost or failed."""
    return future is not None and future.status not in ("cancelled", "lost", "error")


def persist_fresh(client: Client, arr: da.Array, kind: str) -> da.Array:
    """Persist ``arr`` under keys of its own (``kind-<uuid>``), never under its content's name.

    Inputs placed by one reconstruction are released when it ends; a second one placing the
    same data under the same keys could have them cancelled by that release arriving late
    (distributed#8215: "lost dependencies"). One identity task per chunk avoids the collision.
    """
    fresh = arr.map_blocks(array_tasks.place_array, dtype=arr.dtype, meta=arr._meta, name=f"{kind}-{uuid.uuid4().hex}")
    return client.persist(fresh)


def place_on_owners(client: Client, arrays: Sequence[np.ndarray], owners: Sequence[str]) -> list[Future]:
    """Place ``arrays[i]`` on worker ``owners[i]``, recomputable after a worker loss."""
    return [place(client, a, w) for a, w in zip(arrays, owners)]


def gather_arrays(client: Client, futures: Sequence[Future], what: str = "task", *,
                  labels: dict | None = None, stall_timeout: float | None = None) -> list[Any]:
    """Gather, never waiting for ever (:func:`daskrecon.runtime.waiting.gather`); errors name the item."""
    return gather(client, futures, what=what, labels=labels, stall_timeout=stall_timeout)


def gather_tensors(client: Client, futures: Sequence[Future], device: torch.device, what: str = "operator", *,
                   labels: dict | None = None, stall_timeout: float | None = None) -> list[torch.Tensor]:
    """Gather futures of arrays into torch tensors on ``device``."""
    arrays = gather_arrays(client, futures, what, labels=labels, stall_timeout=stall_timeout)
    return [torch.from_numpy(np.asarray(a)).to(device) for a in arrays]


def as_dask(v: Any, name: str) -> Any:
    """``v`` as a dask array (a tensor is wrapped whole); anything else is a ``TypeError`` naming ``name``."""
    import dask.array as da

    if isinstance(v, da.Array):
        return v
    if isinstance(v, torch.Tensor):
        return da.from_array(as_numpy(v, name))  # C order: dask's names ignore memory order
    raise TypeError(f"{name} must be a dask array or a tensor, got {type(v).__name__}")


def entries(y: Any) -> list[Any]:
    """The entries of a ``TensorList``, list or tuple; anything else as one entry."""
    from deepinv.utils import TensorList

    if isinstance(y, (TensorList, list, tuple)):
        return [y[i] for i in range(len(y))]
    return [y]


def sum_in_order(terms: Sequence[Any]) -> Any:
    """``terms[0] + terms[1] + …`` left to right: the same float sum on any cluster."""
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total
