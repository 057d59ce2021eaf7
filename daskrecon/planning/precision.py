"""The precision the denoiser's tiles run in, chosen from a measured error budget.

``"fp32"`` runs the network as it is (bit for bit today's results). ``"bf16"`` and
``"fp16"`` run its tiles under ``torch.autocast`` (fp32 weights, convolutions and matrix
products in the reduced type, the output cast back to the input's type): 4–5× faster on
CPUs with AMX/AVX-512-bf16 units, and what GPU tensor cores are for. ``"auto"`` takes the
fastest precision the device runs in hardware (bf16, then fp16) whose measured error is within
budget — decided from the hardware and the error only, never from timings, so that the same
cluster always makes the same choice (results bitwise reproducible, resume included).

The budget is measured, not assumed: a probe
(:func:`daskrecon.tasks.denoising.precision_probe`) runs the network on a window of the actual input in fp32 and in each candidate, on a worker, and
reports the error of each — the largest absolute difference and the relative L2 difference
``‖out_p − out_fp32‖ / ‖out_fp32‖`` — and its time. :func:`choose` decides from that report
alone (a pure function): an asked-for precision over budget is refused
(:class:`PrecisionError`), ``"auto"`` falls back to the next within budget, fp32 last.

:data:`DEFAULT_TOL` (relative L2) was chosen from measurements on this project's machine, all
in bf16 (``benchmarks/bench_precision.py``, ``benchmarks/bench_tiling.py``): the bundled 2-D
DnCNN 0.74–0.75 % (≤ 0.08 dB PSNR lost), the bundled 3-D DnCNN 1.0–1.1 %, deepinv's DnCNN
(20 layers, random weights) 1.2 %, tiled DRUNet 0.62 %; 2 % leaves room for other networks of
that kind and refuses one that bf16 breaks.
"""

from __future__ import annotations

from collections.abc import Mapping

from daskrecon.errors import PrecisionError

__all__ = ["DEFAULT_TOL", "PRECISIONS", "REDUCED", "check_precision", "choose"]

#: What ``precision=`` takes.
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
#: The reduced precisions, in the order "auto" prefers them when equally fast.
REDUCED = ("bf16", "fp16")
#: Largest relative L2 error of a reduced precision's output against fp32 (see the module).
DEFAULT_TOL = 2e-2


def check_precision(precision: str, tol: float | None = None) -> tuple[str, float]:
    """``(precision, tol)`` checked: a known name, a positive finite tolerance (default :data:`DEFAULT_TOL`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    tol = DEFAULT_TOL if tol is None else tol
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < float(tol) < float("inf"):
        raise ValueError(f"precision_tol must be a positive number, got {tol!r}")
    return precision, float(tol)


def choose(requested: str, report: Mapping[str, Mapping[str, float]], tol: float) -> tuple[str, str]:
    """The precision to run and why, from a probe's ``report``.

    Parameters
    ----------
    requested : {"fp32", "bf16", "fp16", "auto"}
    report : mapping
        Per precision probed: ``{"seconds": …, "max_error": …, "rel_error": …}`` (fp32's
        errors are 0); a precision the device cannot run is absent.
    tol : float
        Largest relative L2 error accepted.

    Returns
    -------
    precision : str
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    reason : str
        One sentence for the log and the history.

    Raises
    ------
    PrecisionError
        An asked-for reduced precision the device cannot run, or whose error exceeds ``tol``.
    """
    check_precision(requested, tol)
    if requested == "fp32":
        return "fp32", "fp32 asked for"
    if requested != "auto":
        if requested not in report:
            raise PrecisionError(f"precision={requested!r}: the workers' device cannot run it "
                                 f"(probed: {', '.join(sorted(report))}); use 'fp32' or 'auto'")
        err = report[requested]["rel_error"]
        if not err <= tol:  # NaN too
            raise PrecisionError(
                f"precision={requested!r}: measured relative L2 error {err:.3g} (max {report[requested]['max_error']:.3g}) "
                f"against fp32 on a window of the input exceeds precision_tol={tol:g}; use precision='fp32', "
                f"'auto' (falls back) or a larger precision_tol")
        return requested, f"{requested} asked for: relative L2 error {err:.3g} within {tol:g}"
    within = [p for p in REDUCED if p in report and report[p]["rel_error"] <= tol]
    if within:
        p = within[0]
        fp32 = report.get("fp32", {}).get("seconds")
        speed = f" ({report[p]['seconds']:.3g} s against fp32's {fp32:.3g} s on the probe)" if fp32 else ""
        return p, f"auto: {p}{speed}, relative L2 error {report[p]['rel_error']:.3g} within {tol:g}"
    over = [f"{p} {report[p]['rel_error']:.3g}" for p in REDUCED if p in report]
    why = f"over precision_tol={tol:g}: {', '.join(over)}" if over else "no reduced precision in this device's hardware"
    return "fp32", f"auto fell back to fp32 ({why})"
