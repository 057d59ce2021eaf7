"""Inside tasks: the denoiser's network calls in a reduced precision (the probe that measures it is
:func:`daskrecon.tasks.denoising.precision_probe`).

:func:`autocast` is the one place a network call changes precision: ``"fp32"`` is a no-op
(today's results bit for bit), ``"bf16"``/``"fp16"`` run under ``torch.autocast`` with the
weights kept in fp32 (casting the network to bf16 once runs faster on some inputs but rounds
every activation too, and training needs fp32 weights: docs/precision.md). Outputs are cast back to the
input's type by the callers (:mod:`daskrecon.tasks.denoising`), so the data term, the tree
and the step never see a reduced type.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["DTYPES", "autocast", "supported", "synchronize"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context a network call runs in for ``precision`` on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def supported(device: torch.device) -> list[str]:
    """The reduced precisions ``device`` runs in hardware: bf16 on CPUs with AVX-512-bf16 or AMX and on
    GPUs that have it; fp16 on GPUs and on CPUs with AMX-fp16 (others emulate it, slower than fp32)."""
    if device.type == "cuda":
        out = ["fp16"]
        if torch.cuda.is_bf16_supported():
            out.insert(0, "bf16")
        return out
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                   "_is_amx_tile_supported"))
    fp16 = getattr(cpu, "_is_amx_fp16_supported", lambda: False)()
    return (["bf16"] if native else []) + (["fp16"] if fp16 else [])


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (GPU), so that a timing measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
