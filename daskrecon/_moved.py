"""Old import paths of modules that moved into the layer subpackages (issue #26) keep working.

``import daskrecon.staging`` (or ``from daskrecon.local import local_form``) gives the module
at its new place, the same object under both names: a script, a pickle or a config written
against the flat layout runs unchanged. :data:`MOVED` is the map, also in
``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

__all__ = ["MOVED", "RENAMED", "install"]

#: Old module -> its new place.
MOVED = {
    "daskrecon.tiling": "daskrecon.planning.tiling",
    "daskrecon.sharding": "daskrecon.planning.sharding",
    "daskrecon.reduction": "daskrecon.planning.reduction",
    "daskrecon.chunking": "daskrecon.planning.chunking",
    "daskrecon.receptive": "daskrecon.planning.receptive",
    "daskrecon.fingerprint": "daskrecon.planning.fingerprint",
    "daskrecon.subsets": "daskrecon.planning.subsets",
    "daskrecon.local": "daskrecon.operators.chunkwise",
    "daskrecon.cluster": "daskrecon.runtime.cluster",
    "daskrecon.placement": "daskrecon.runtime.placement",
    "daskrecon.waiting": "daskrecon.runtime.waiting",
    "daskrecon.memory": "daskrecon.runtime.memory",
    "daskrecon.memory_trim": "daskrecon.runtime.memory_trim",
    "daskrecon._scheduler": "daskrecon.runtime.scheduler_plugin",
    "daskrecon._arrays": "daskrecon.runtime.arrays",
    "daskrecon.storage": "daskrecon.runtime.storage",
    "daskrecon.staging": "daskrecon.runtime.halos",
    "daskrecon.problem": "daskrecon.engine.problem",
    "daskrecon.terms": "daskrecon.engine.terms",
    "daskrecon.algorithms": "daskrecon.engine.algorithms",
    "daskrecon.graph": "daskrecon.engine.iteration",
    "daskrecon.signal": "daskrecon.engine.signal",
    "daskrecon.checkpoint": "daskrecon.engine.checkpoint",
    "daskrecon.linsolve": "daskrecon.engine.linsolve",
    "daskrecon.context": "daskrecon.frontend.context",
    "daskrecon.collectives": "daskrecon.frontend.collectives",
    "daskrecon.physics": "daskrecon.frontend.physics",
    "daskrecon.measurements": "daskrecon.frontend.measurements",
    "daskrecon.fidelity": "daskrecon.frontend.fidelity",
    "daskrecon.processing": "daskrecon.frontend.processing",
    "daskrecon.strategies": "daskrecon.planning.strategies",
    "daskrecon.autograd": "daskrecon.frontend.autograd",
    "daskrecon.bundle": "daskrecon.frontend.bundle",
    "daskrecon.framework": "daskrecon.frontend.framework",
    "daskrecon.solvers": "daskrecon.frontend.reconstruct",
}
# ``daskrecon.engine`` and ``daskrecon.operators`` were modules and are packages now: they re-export
# the old modules' names (the loop's ``run``...; ``FFTConvolution``, ``specialize``).

#: Old modules whose name is also a function of the package: importing the module under that name
#: would replace ``daskrecon.distribute`` (the function) by the module, so it is refused, naming the new one.
RENAMED = {"daskrecon.distribute": "daskrecon.frontend.distribute"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name in RENAMED:
            raise ModuleNotFoundError(f"the module {name} is now {RENAMED[name]} ({name} itself is the function "
                                      f"dr.distribute)", name=name)
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])  # the same module object, under its old name too

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its new name


def install() -> None:
    """Let the old paths import (idempotent)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
