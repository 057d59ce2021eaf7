"""Exceptions raised by daskrecon.

Every exception also inherits the builtin a caller would expect (``ValueError``,
``TypeError``, ``RuntimeError``...), so ``except ValueError`` keeps working, while
``except DaskreconError`` catches everything this package raises on purpose.
"""

from __future__ import annotations

__all__ = [
    "ClusterConnectionError",
    "DaskreconError",
    "DeviceError",
    "LinearityError",
    "MeasurementError",
    "ShapeError",
    "WorkerTaskError",
]


class DaskreconError(Exception):
    """Base class of every error raised by daskrecon."""


class ShapeError(DaskreconError, ValueError):
    """An array has a shape, length or dtype that does not fit the operation."""


class MeasurementError(DaskreconError, ValueError):
    """Measurements do not match the operators they belong to."""


class LinearityError(DaskreconError, TypeError):
    """A linear operation (adjoint, pseudo-inverse, norm) was asked of non-linear physics."""


class DeviceError(DaskreconError, RuntimeError):
    """A device (GPU) was requested that the machine or cluster does not have."""


class ClusterConnectionError(DaskreconError, OSError):
    """The scheduler could not be reached or the cluster could not be started."""


class WorkerTaskError(DaskreconError, RuntimeError):
    """A task failed on a worker; the message carries the worker's traceback."""
