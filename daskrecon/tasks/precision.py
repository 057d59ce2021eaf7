"""Inside tasks: the denoiser's network calls in a reduced precision, and the probe that measures it.

:func:`autocast` is the one place a network call changes precision: ``"fp32"`` is a no-op
(today's results bit for bit), ``"bf16"``/``"fp16"`` run under ``torch.autocast`` with the
weights kept in fp32 (measured on this project's CPU: autocast 0.144 s against 0.149 s for
weights cast to bf16 once, DnCNN 20×64 on a 276² window). Outputs are cast back to the
input's type by the callers (:mod:`daskrecon.tasks.denoising`), so the data term, the tree
and the step never see a reduced type.
"""

from __future__ import annotations

import contextlib
import statistics
import time


import numpy as np
import torch

from daskrecon.tasks.arrays import to_tensor

__all__ = ["DTYPES", "autocast", "probe", "supported"]

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(model_key: str, device_mode: str | None, method: str, window: np.ndarray, args: tuple, kwargs: dict,
          candidates: list[str], repeats: int = 3) -> dict[str, dict[str, float]]:
    """The network on ``window`` in fp32 and in each of ``candidates`` this worker's device runs.

    Returns ``{precision: {"seconds": median of repeats, "max_error": …, "rel_error": …}}``,
    errors against fp32 (computed in float64). The first call of each precision warms up and
    is not timed.
    """
    from daskrecon.tasks.denoising import _to_device, get_model, model_device  # noqa: PLC0415 (same layer)

    model = get_model(model_key, device_mode)
    dev = model_device(model, device_mode)
    xt = to_tensor(window, dev)
    if getattr(model, "_daskrecon_channels_last", False) and xt.dim() == 4:
        xt = xt.contiguous(memory_format=torch.channels_last)
    fn = model if method == "__call__" else getattr(model, method)
    args, kwargs = _to_device(args, dev), _to_device(kwargs, dev)
    native = supported(dev)
    outputs, report = {}, {}
    for p in ["fp32"] + [c for c in candidates if c in native]:
        times = []
        with torch.no_grad():
            for k in range(repeats + 1):
                _sync(dev)
                t0 = time.perf_counter()
                with autocast(dev, p):
                    out = fn(xt, *args, **kwargs)
                out = out.to(xt.dtype)
                _sync(dev)
                if k:
                    times.append(time.perf_counter() - t0)
        outputs[p] = out.double()
        ref = outputs["fp32"]
        diff = (out.double() - ref)
        report[p] = {"seconds": statistics.median(times), "max_error": float(diff.abs().max()),
                     "rel_error": float(diff.norm() / ref.norm()) if float(ref.norm()) > 0 else float(diff.norm())}
    return report
