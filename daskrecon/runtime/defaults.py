"""daskrecon's defaults in Dask's configuration: the ``daskrecon`` namespace of ``dask.config``.

The defaults ship in ``daskrecon/daskrecon.yaml`` and are registered when daskrecon is imported,
the way distributed registers ``distributed.yaml``: below anything the user set (a YAML file
in ``~/.config/dask/``, ``DASK_DASKRECON__…`` environment variables, ``dask.config.set``). Every
public keyword listed there defaults to ``None`` and reads its value here when called, so
``with dask.config.set({"daskrecon.reconstruct.iterations": 50}): ...`` changes what
``reconstruct`` does without a keyword; a keyword given always wins.
"""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

__all__ = ["PATH", "default", "keys", "pick"]

#: The YAML file of defaults shipped with the package.
PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "daskrecon.yaml")

with open(PATH) as f:
    _DEFAULTS = yaml.safe_load(f)
dask.config.update_defaults(_DEFAULTS)


def default(key: str) -> Any:
    """The current value of ``daskrecon.<key>`` (e.g. ``"reconstruct.iterations"``)."""
    return dask.config.get(f"daskrecon.{key}")


def pick(value: Any, key: str) -> Any:
    """``value`` when given (not ``None``), else the configured ``daskrecon.<key>``."""
    return default(key) if value is None else value


def keys() -> list[str]:
    """Every key of the shipped defaults, dotted (``"context.fan-in"``...)."""
    return [f"{section}.{name}" for section, table in _DEFAULTS["daskrecon"].items() for name in table]
