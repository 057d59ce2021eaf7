"""Storage inside tasks: the shared-location probe, and where a task runs (for messages)."""

from __future__ import annotations

from typing import Any

__all__ = ["here", "open_sources", "read_probe"]


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
