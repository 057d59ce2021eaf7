"""The precision a distributed denoiser's tiles run in: asked for, probed once on a worker, chosen.

``DistributedProcessing(precision=…)`` (and ``reconstruct(precision=…)``) ask; the first call
that needs a reduced precision takes a window of its input (one tile's window at the image's
centre, first batch element), runs the network on it in fp32 and in the candidates on one
worker (:func:`daskrecon.tasks.denoising.precision_probe`), and keeps the report: the precision chosen
(:func:`daskrecon.planning.precision.choose`), why, and each precision's error and time. The
report goes to the log (``logging.getLogger("daskrecon")``), to the reconstruction's history
and to :attr:`PrecisionChoice.report`; a fallback of ``"auto"`` to fp32 also warns.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import dask.array as da
import numpy as np

from daskrecon.planning.precision import REDUCED, check_precision, choose
from daskrecon.runtime.waiting import compute, gather
from daskrecon.tasks import denoising as denoising_tasks

__all__ = ["PrecisionChoice", "probe_window"]

log = logging.getLogger("daskrecon")


def probe_window(x: Any, geometry: tuple, align: int, ctx: Any = None) -> np.ndarray:
    """One tile's window (core and overlap, aligned) at the centre of ``x``'s first batch element, as numpy.

    ``x`` a tensor or a dask array (only that window is computed, on ``ctx``'s cluster: its
    inputs may live there and nowhere else).
    """
    tiling_dims, patch, overlap = geometry
    index: list[Any] = [slice(0, 1)] + [slice(None)] * (x.ndim - 1)
    for d, p, o in zip(tiling_dims, patch, overlap):
        n = x.shape[d]
        w = min(n, p + 2 * o)
        if w >= align:
            w -= w % align
        lo = (n - w) // 2
        index[d] = slice(lo, lo + w)
    window = x[tuple(index)]
    if isinstance(window, da.Array):
        bound = {} if ctx is None else {"client": ctx.client, "stall_timeout": ctx.stall_timeout}
        return np.asarray(compute([window], what="the precision probe's window", **bound)[0])
    return window.detach().cpu().numpy()


class PrecisionChoice:
    """What one denoiser was asked to run in and what a probe chose (see the module).

    Parameters
    ----------
    precision : {"fp32", "bf16", "fp16", "auto"}
    tol : float, optional
        ``precision_tol``: the largest relative L2 error against fp32 (default
        :data:`daskrecon.planning.precision.DEFAULT_TOL`).
    """

    def __init__(self, precision: str = "fp32", tol: float | None = None) -> None:
        self.requested, self.tol = check_precision(precision, tol)
        #: The last probe's result: ``{"precision", "requested", "reason", "tol", "probe": {p: {...}}}``.
        self.report: dict | None = None
        self._chosen: dict[tuple, dict] = {}

    @property
    def active(self) -> str:
        """The precision tiles run in now: fp32 until a probe chose otherwise."""
        return self.report["precision"] if self.report is not None else "fp32"

    def resolve(self, proc: Any, x: Any, method: str, args: tuple, kwargs: dict, *, requested: str | None = None,
                tol: float | None = None) -> dict:
        """The precision for ``proc``'s calls on inputs like ``x``: fp32 without a probe when fp32 is asked,
        else probed once per (asked, tolerance, method, channels) — on the first such call's
        arguments — and kept."""
        own = requested is None and tol is None
        requested, tol = check_precision(requested or self.requested, self.tol if tol is None else tol)
        if requested == "fp32":
            return {"precision": "fp32", "requested": "fp32", "reason": "fp32 asked for", "tol": tol, "probe": {}}
        key = (requested, tol, method, tuple(x.shape[1:2]))
        found = self._chosen.get(key)
        if found is None:
            found = self._probe(proc, x, method, args, kwargs, requested, tol)
            self._chosen[key] = found
        if own:  # the denoiser's own setting: its later calls run in it (a run's override does not stick)
            self.report = found
        return found

    def _probe(self, proc: Any, x: Any, method: str, args: tuple, kwargs: dict, requested: str, tol: float) -> dict:
        ctx = proc.ctx
        window = probe_window(x, proc.plan.geometry(x.shape), proc.plan.align, ctx)
        worker = sorted(ctx.client.scheduler_info()["workers"])[0]  # one worker: the same device kind as all
        candidates = list(REDUCED) if requested == "auto" else [requested]
        # the choice never depends on timings: an asked precision needs one call of each (its error), auto times 3
        fut = ctx.client.submit(denoising_tasks.precision_probe, proc.key, ctx.device_mode, method, window, args, kwargs,
                                candidates, 3 if requested == "auto" else 0, pure=False, workers=[worker],
                                allow_other_workers=True)
        report = gather(ctx.client, [fut], what="the precision probe", stall_timeout=ctx.stall_timeout)[0]
        chosen, reason = choose(requested, report, tol)  # raises PrecisionError for an asked precision over budget
        out = {"precision": chosen, "requested": requested, "reason": reason, "tol": tol, "probe": report,
               "window": list(window.shape)}
        log.info("daskrecon precision: %s (probe on a %s window: %s)", reason, "×".join(map(str, window.shape)),
                 ", ".join(f"{p}: {r['seconds'] * 1e3:.1f} ms, max error {r['max_error']:.2g}, relative "
                           f"{r['rel_error']:.2g}" for p, r in report.items()))
        if requested == "auto" and chosen == "fp32":
            warnings.warn(f"daskrecon: {reason}", UserWarning, stacklevel=4)
        return out
