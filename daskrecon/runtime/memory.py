"""What one denoiser task needs in memory, checked against the workers' limits before submitting.

A tile batch that cannot fit a worker would make the nanny kill the worker again and
again (dask retries the task on the next one) until ``KilledWorker``; refusing up front,
with the tile size and the limit in the message, saves the user that loop.
"""

from __future__ import annotations

from typing import Any

import torch
from dask.utils import format_bytes

from daskrecon.errors import DaskreconError
from daskrecon.runtime.cluster import scheduler_workers

__all__ = ["MemoryLimitError", "activation_channels", "check_fits"]


class MemoryLimitError(DaskreconError, MemoryError):
    """One task (a tile batch, a chunk) cannot fit in a worker's memory limit."""


def activation_channels(model: Any, method: str, channels: int, ndim: int, dtype: torch.dtype, args: tuple,
                        kwargs: dict, side: int = 64, total: bool = False) -> float | None:
    """The largest activation of ``model`` in channels at full resolution (a probe forward pass).

    Runs ``model.<method>`` on a ``side``-pixel probe with forward hooks on every leaf
    module and returns ``max(numel(output)) / probe pixels`` (with ``total=True`` the sum
    over leaf modules: about what a backward pass keeps). ``None`` if the probe fails
    (the model is not a torch module, needs other sizes, ...): no estimate then.
    """
    if not isinstance(model, torch.nn.Module) and not isinstance(getattr(model, "denoiser", None), torch.nn.Module):
        return None
    module = model if isinstance(model, torch.nn.Module) else model.denoiser
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()) if isinstance(out, torch.Tensor) else None)
             for m in module.modules() if not list(m.children())]
    try:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        probe = torch.zeros((1, channels, *(side,) * ndim), dtype=dtype, device=device)
        with torch.no_grad():
            getattr(model, method)(probe, *args, **kwargs)
    except Exception:
        return None
    finally:
        for h in hooks:
            h.remove()
    return (sum(sizes) if total else max(sizes, default=0)) / side**ndim


def check_fits(client: Any, need: int, what: str, advice: str) -> None:
    """Raise :class:`MemoryLimitError` if ``need`` bytes exceed what a worker has left.

    Left = the worker's memory limit × dask's ``terminate`` fraction (the nanny kills a
    worker above it) − its *unmanaged* memory (process memory minus the task results
    dask holds, which it can spill): the code, the libraries and what the allocator
    keeps. Workers without a limit are not checked.
    """
    import dask

    frac = dask.config.get("distributed.worker.memory.terminate") or 1.0
    workers = scheduler_workers(client)
    best = None
    for addr, w in workers.items():
        limit = w.get("memory_limit") or 0
        if not limit:
            return
        metrics = w.get("metrics") or {}
        used = max(0, metrics.get("memory", 0) - metrics.get("managed_bytes", 0))
        left = limit * frac - used
        if best is None or left > best[0]:
            best = (left, addr, limit, used)
    if best is None or need <= best[0]:
        return
    left, addr, limit, used = best
    raise MemoryLimitError(
        f"{what} needs at least {format_bytes(int(need))} on a worker, but the roomiest worker ({addr}) has a memory limit "
        f"of {format_bytes(int(limit))} with {format_bytes(int(used))} already in use by the process (the nanny restarts a worker above "
        f"{frac:.0%} of its limit); {advice}"
    )
