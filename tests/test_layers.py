"""The package's layers: every import points down (or within its layer), never up.

Read from the source (``ast``), so it holds for code paths no test runs. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "daskrecon"

#: Bottom to top: a module may import its own layer and those before it.
LAYERS = ["errors", "planning", "tasks", "runtime", "operators", "engine", "frontend", "apps"]
_TOP_LEVEL = {"errors": "errors", "models": "planning", "data": "planning", "cli": "apps", "config": "apps", "batch": "apps",
              "demo": "apps", "testing": "apps", "_moved": "apps", "__init__": "apps",
              "__main__": "apps"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "apps"  # the package's __init__
    head = parts[1]
    if head in LAYERS:
        return head
    return _TOP_LEVEL[head]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported daskrecon module) for every runtime import in ``tree``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("daskrecon")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.startswith("daskrecon"):
                for a in node.names:
                    full = f"{base}.{a.name}"
                    found.append((node.lineno, full if full.replace(".", "/") in _FILES else base))
    return found


_FILES = {n.replace(".", "/") for n in _modules()}


def test_every_import_points_down_the_layers():
    wrong = []
    for module, path in _modules().items():
        own = LAYERS.index(_layer(module))
        tree = ast.parse(path.read_text())
        for line, target in _imports(tree, module, path.name == "__init__.py"):
            if target == "daskrecon":
                continue  # the package itself: only apps do `import daskrecon as dr`
            if LAYERS.index(_layer(target)) > own:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} ({_layer(module)}) imports {target} "
                             f"({_layer(target)})")
    assert not wrong, "imports that point up the layers:\n" + "\n".join(wrong)


def test_every_subpackage_says_what_lives_there_and_what_it_may_import():
    for layer in ("planning", "tasks", "runtime", "operators", "engine", "frontend"):
        doc = importlib.import_module(f"daskrecon.{layer}").__doc__ or ""
        assert "May import" in doc or "imports" in doc, layer


@pytest.mark.parametrize("old, new", [("daskrecon.staging", "daskrecon.runtime.halos"),
                                      ("daskrecon.local", "daskrecon.operators.chunkwise"),
                                      ("daskrecon.solvers", "daskrecon.frontend.reconstruct"),
                                      ("daskrecon.strategies", "daskrecon.planning.strategies")])
def test_old_import_paths_keep_working(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_a_module_named_like_a_function_is_refused_naming_its_new_place():
    import daskrecon as dr

    with pytest.raises(ImportError, match="daskrecon.distribute is now daskrecon.frontend.distribute"):
        importlib.import_module("daskrecon.distribute")
    assert callable(dr.distribute) and dr.distribute.__module__ == "daskrecon.frontend.distribute"


def test_every_moved_module_has_its_new_place():
    from daskrecon._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from daskrecon.engine import run
    from daskrecon.operators import FFTConvolution, local_form  # the old modules' names, from their packages

    assert callable(run) and callable(local_form) and isinstance(FFTConvolution, type)
