"""Storage inside tasks: the shared-location probe, the inputs' strict reads, and where a task runs (for messages)."""

from __future__ import annotations

import threading
from typing import Any

from daskrecon.errors import StorageNotSharedError

__all__ = ["StrictSource", "forget_opened", "here", "open_sources", "read_probe"]


def here() -> str:
    """The address of the worker running this code, or ``"the driver"``."""
    try:
        from distributed import get_worker

        return f"worker {get_worker().address}"
    except ValueError:
        return "the driver"


def read_probe(fs: Any, path: str) -> str:
    """The probe file's content as this worker sees it, or why it cannot read it (``"!" + reason``).

    Never raises: a worker that cannot see the location is an answer, not a failure.
    """
    try:
        return fs.cat_file(path).decode()
    except FileNotFoundError:
        return "!no such file there"
    except Exception as exc:  # permissions, credentials, an unreachable endpoint
        return f"!{type(exc).__name__}: {exc}"


def open_sources(arrays: list) -> list[str]:
    """For each Zarr array (as the driver opened it), ``""`` when this worker opens the same array at its
    place, else why not (``"!" + reason``): the array's metadata read back through its own store.

    Never raises, and writes nothing: the arrays are the user's.
    """
    import zarr

    answers = []
    for a in arrays:
        try:
            seen = zarr.open_array(store=a.store, path=a.path, mode="r")
        except FileNotFoundError:
            answers.append("!no array there")
            continue
        except Exception as exc:  # zarr's not-found errors, permissions, credentials, an unreachable endpoint
            answers.append(f"!{type(exc).__name__}: {exc}")
            continue
        if (seen.shape, seen.dtype, seen.chunks) != (a.shape, a.dtype, a.chunks):
            answers.append(f"!another array there: shape {seen.shape}, {seen.dtype}, chunks {seen.chunks} against the "
                           f"driver's {a.shape}, {a.dtype}, {a.chunks}")
        else:
            answers.append("")
    return answers


#: The Zarr arrays this process has opened at their place (location, shape, dtype, chunks): checked once.
_OPENED: set[tuple] = set()
_OPENED_LOCK = threading.Lock()


def forget_opened() -> None:
    """Forget which Zarr arrays this process has opened: the next read of each opens it again (as a new worker's)."""
    with _OPENED_LOCK:
        _OPENED.clear()


class StrictSource:
    """A dask chunk source (a ``zarr.Array``, or xarray's lazy wrapper of one) read only by a process that opens
    its Zarr arrays.

    The driver checks, before any work, that every worker opens the user's Zarr inputs
    (:func:`daskrecon.runtime.storage.check_sources_seen`); a worker that joins later — or that
    recomputes a lost input chunk on a node without the input's disk — would read every chunk as
    missing, and Zarr gives a missing chunk its fill value. Its first read of the source in each
    process opens the arrays' metadata through their own stores (:func:`open_sources`); one it
    cannot open raises :class:`~daskrecon.errors.StorageNotSharedError` naming the worker and the
    array. Later reads cost a set lookup. Any other attribute is the source's.

    ``arrays``: the Zarr arrays the source reads; ``where``: their locations, for messages.
    """

    __slots__ = ("arrays", "source", "where")

    def __init__(self, source: Any, arrays: list, where: list[str]) -> None:
        self.source, self.arrays, self.where = source, list(arrays), list(where)

    def __reduce__(self) -> tuple:
        return StrictSource, (self.source, self.arrays, self.where)

    def __getattr__(self, name: str) -> Any:
        if name in StrictSource.__slots__:  # not set yet (unpickling): not the source's
            raise AttributeError(name)
        return getattr(self.source, name)

    def __getitem__(self, key: Any) -> Any:
        self.check()
        return self.source[key]

    def __repr__(self) -> str:
        return f"StrictSource({self.source!r})"

    def check(self) -> None:
        """Open each array once per process, or raise :class:`~daskrecon.errors.StorageNotSharedError`."""
        keys = [(w, a.shape, str(a.dtype), a.chunks) for w, a in zip(self.where, self.arrays)]
        if all(k in _OPENED for k in keys):
            return
        for key, where, answer in zip(keys, self.where, open_sources(self.arrays)):
            if answer:
                raise StorageNotSharedError(
                    f"{here()} cannot open the Zarr array {where!r} that an input reads ({answer[1:]}): it would "
                    f"read every chunk of it as missing, that is as zeros. The inputs were checked on the workers "
                    f"present when the call started; this one joined later or sits on a node without the input's "
                    f"disk. Put the input where every worker sees it — a shared file system, or an fsspec URL "
                    f"(s3://…, gs://…) — or pass it as a tensor")
            with _OPENED_LOCK:
                _OPENED.add(key)
