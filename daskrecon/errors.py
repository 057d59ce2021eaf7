"""Exceptions raised by daskrecon.

Every exception also inherits the builtin a caller would expect (``ValueError``,
``TypeError``, ``RuntimeError``...), so ``except ValueError`` keeps working, while
``except DaskreconError`` catches everything this package raises on purpose.
"""

from __future__ import annotations

__all__ = [
    "ClusterConnectionError",
    "ConfigError",
    "ContextMismatchError",
    "DaskreconError",
    "DeviceError",
    "LinearityError",
    "MeasurementError",
    "MissingChunkError",
    "NotOwnedError",
    "OMEZarrError",
    "OutputExistsError",
    "OverwriteSourceError",
    "PrecisionError",
    "SerializationError",
    "ShapeError",
    "StalledError",
    "StorageNotSharedError",
    "StorageUnreachableError",
    "TransferError",
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


class ContextMismatchError(DaskreconError, ValueError):
    """Objects distributed with different :class:`~daskrecon.DistributedContext` objects were combined.

    Each context's operators, models and results live on its own cluster (and belong to its own
    client): one call can only combine objects of one context.
    """


class DeviceError(DaskreconError, RuntimeError):
    """A device (GPU) was requested that the machine or cluster does not have."""


class ClusterConnectionError(DaskreconError, OSError):
    """The scheduler could not be reached or the cluster could not be started.

    ``unreachable`` is ``(address, why)`` when a scheduler address did not answer (else ``None``):
    a caller that took the address from elsewhere (a command's option) words its own advice.
    """

    unreachable: tuple[str, str] | None = None


class WorkerTaskError(DaskreconError, RuntimeError):
    """A task failed on a worker; the message carries the worker's traceback."""


class TransferError(WorkerTaskError):
    """A task cannot start: a worker failed to fetch one of its inputs from another worker.

    Distributed leaves such a task waiting for ever; daskrecon detects it and raises this,
    naming the operator (or tile) and the key that could not be transferred.
    """


class StalledError(DaskreconError, TimeoutError):
    """A call made no progress for ``stall_timeout`` seconds: nothing finished, nothing ran.

    The message names what was waited for and why it could not run (a worker that does not
    answer, a task that no worker may run, a paused worker).
    """


class SerializationError(DaskreconError, TypeError):
    """An operator (or its factory) cannot be serialized to be built on its worker.

    Its source travels once, pickled, to the worker that owns it. Some objects stop being
    picklable once they have run (deepinv's ``compute_norm`` leaves autograd wrappers inside a
    ``Tomography``): distribute them before using them, or pass a factory.
    """


class StorageNotSharedError(DaskreconError, OSError):
    """Workers cannot see a storage location that tasks will read and write.

    Raised before any work, by the probe of :func:`daskrecon.runtime.storage.check_shared`: the
    message names the location, the workers that cannot read the driver's probe file there,
    and what to pass instead (``checkpoint=`` or ``scratch=`` a shared path or an fsspec URL).
    """


class StorageUnreachableError(DaskreconError, OSError):
    """The driver cannot reach a storage location it was given (credentials, network, permissions).

    Raised at the first access, before any work: the message names the location, what it was
    for, and the storage library's own error (the exception is chained to it).
    """


class NotOwnedError(DaskreconError, FileExistsError):
    """A folder or array that daskrecon did not create stands where it would write.

    daskrecon writes, replaces and deletes only what it created (marked as its own); it
    refuses a non-empty folder of someone else's files, naming what is there.
    """


class MissingChunkError(DaskreconError, FileNotFoundError):
    """A chunk of an array daskrecon wrote is not where it was written.

    Never read as the fill value (zeros): the usual cause is storage that the workers do not
    share (each wrote to its own disk). The message names the array, the chunk and the worker.
    """


class PrecisionError(DaskreconError, ValueError):
    """A reduced precision was asked for that the device cannot run or whose measured error is over budget."""


class OMEZarrError(DaskreconError, ValueError):
    """A path that is not an OME-Zarr image, a level it lacks, or axes with no place in deepinv's layout.

    daskrecon maps an OME-Zarr image's time axis to the batch ``B``, its channel axis to ``C`` and
    its 2 or 3 space axes to ``[D,] H, W``; anything else is refused with the axes named.
    """


class OutputExistsError(DaskreconError, FileExistsError):
    """Something is already where a result would be written, and overwriting was not asked for.

    Nothing is deleted: pass ``overwrite=True`` (``output.overwrite = true`` in a config) or another path.
    """


class OverwriteSourceError(DaskreconError, ValueError):
    """A result would be written over the data it is computed from.

    Replacing a Zarr store that a dask array still reads would delete the chunks before they are
    read (the written result would be the fill value). Refused whatever ``overwrite`` says: write
    to another path, and move it afterwards if it must take the input's place.
    """


class ConfigError(DaskreconError, ValueError):
    """A configuration file (``daskrecon reconstruct CONFIG``) is invalid; the message names the key and the fix."""
