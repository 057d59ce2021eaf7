"""Storage inside tasks: the shared-location probe, and where a task runs (for messages)."""

from __future__ import annotations

from typing import Any

__all__ = ["here", "read_probe"]


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
