"""Static measures of the package's shape, from its source alone (``ast``): what issue #26 tracks.

    python scripts/architecture_metrics.py            # a table
    python scripts/architecture_metrics.py --json     # the same numbers as JSON

- modules per (sub)package;
- the largest classes and functions, in lines (definition to last statement, docstrings not
  counted);
- private members (``_name``) of another daskrecon module used through an attribute of an
  object or a module (``proc._kept_live``, ``physics._place_x``) or imported by name: a
  seam that should be public. ``self._x`` / ``cls._x``, a module's own names, and names no
  daskrecon module defines (``client._run``: distributed's) do not count; the latter are
  listed apart;
- duplicated blocks: runs of at least 6 identical (whitespace-normalised, non-blank,
  non-comment) lines appearing in two places;
- import cycles between modules: at run time, and with the imports made only for type checkers
  (``if TYPE_CHECKING:``) counted too.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "daskrecon"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _doc_lines(node: ast.AST) -> int:
    """Lines of the docstrings of ``node`` and of everything inside it."""
    n = 0
    for sub in ast.walk(node):
        if isinstance(sub, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and sub.body:
            first = sub.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                n += first.end_lineno - first.lineno + 1
    return n


def sizes(tree: ast.AST, module: str) -> tuple[list, list]:
    """(lines, name) of classes and functions: definition to last statement, docstrings not counted."""
    classes, functions = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            classes.append((node.end_lineno - node.lineno + 1 - _doc_lines(node), f"{module}.{node.name}"))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append((node.end_lineno - node.lineno + 1 - _doc_lines(node), f"{module}:{node.name}"))
    return classes, functions


def private_reach(tree: ast.AST, module: str, own: set[str]) -> list[str]:
    """Private names of other modules this module touches."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("daskrecon"):
            if node.module != module:
                out += [f"{node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr in own:
                continue  # one of this module's own private names (another instance of its own class)
            out.append(f"{ast.unparse(base)}.{node.attr}")
    return out


def own_private(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and node.attr.startswith("_") and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id.startswith("_"):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id.startswith("_"):
                    names.add(t.id)
    return names


def _type_only(tree: ast.AST) -> set[int]:
    """``id``s of the import nodes inside ``if TYPE_CHECKING:`` blocks (never executed)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def imports(tree: ast.AST, module: str, known: set[str], type_only: bool = True) -> set[str]:
    """The daskrecon modules ``module`` imports; without ``type_only``, those imported at run time only."""
    out = set()
    skip = set() if type_only else _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                parts = module.split(".")
                base = ".".join(parts[:len(parts) - node.level] + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def duplicates(texts: dict[str, list[str]], run: int = 6) -> int:
    """Blocks of ``run`` identical normalised lines found in two places (overlapping windows merged)."""
    seen: dict[tuple, tuple[str, int]] = {}
    hits: set[tuple[str, int]] = set()
    for name, lines in texts.items():
        norm = [(i, re.sub(r"\s+", " ", line.strip())) for i, line in enumerate(lines)]
        norm = [(i, t) for i, t in norm if t and not t.startswith("#") and t not in ('"""', ")", "]", "}")]
        for k in range(len(norm) - run + 1):
            key = tuple(t for _, t in norm[k:k + run])
            where = (name, norm[k][0])
            first = seen.setdefault(key, where)
            if first != where and first[0] != where[0] or (first[0] == where[0] and abs(first[1] - where[1]) >= run):
                if first != where:
                    hits.add(where)
    # consecutive windows of one duplicated block count once
    blocks, last = 0, {}
    for name, line in sorted(hits):
        if last.get(name) is None or line > last[name] + 1:
            blocks += 1
        last[name] = line
    return blocks


def measure() -> dict:
    mods = modules()
    known = set(mods)
    per_package: dict[str, int] = defaultdict(int)
    classes, functions, reach, outside, graph, runtime, texts = [], [], [], [], {}, {}, {}
    trees = {name: ast.parse(path.read_text()) for name, path in mods.items()}
    defined: dict[str, set[str]] = defaultdict(set)
    for name, tree in trees.items():
        for attr in own_private(tree):
            defined[attr].add(name)
    for name, path in mods.items():
        src = path.read_text()
        tree = trees[name]
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        per_package[package] += 1
        c, f = sizes(tree, name)
        classes += c
        functions += f
        for r in private_reach(tree, name, own_private(tree)):
            base, attr = r.rsplit(".", 1)
            ours = attr in defined and name not in defined[attr] and not base.endswith("client")
            (reach if ours or base.startswith("daskrecon") else outside).append(f"{name}: {r}")
        graph[name] = imports(tree, name, known)
        runtime[name] = imports(tree, name, known, type_only=False)
        texts[name] = src.splitlines()
    classes.sort(reverse=True)
    functions.sort(reverse=True)
    return {
        "modules": len(mods),
        "modules_per_package": dict(sorted(per_package.items())),
        "largest_classes": classes[:5],
        "largest_functions": functions[:5],
        "classes_over_250_lines": [n for s, n in classes if s > 250],
        "private_members_used_across_modules": len(reach),
        "private_reach": sorted(reach),
        "private_members_of_other_libraries": sorted(outside),
        "duplicated_blocks_of_6_lines": duplicates(texts),
        "import_cycles": cycles(runtime),
        "import_cycles_with_type_only_imports": cycles(graph),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--reach", action="store_true", help="list every private member used across modules")
    args = p.parse_args()
    m = measure()
    if args.json:
        print(json.dumps(m, indent=1))
        return
    print(f"modules: {m['modules']}")
    for pkg, n in m["modules_per_package"].items():
        print(f"  {pkg}: {n}")
    print("largest classes:", ", ".join(f"{n} {s}" for s, n in m["largest_classes"]))
    print("largest functions:", ", ".join(f"{n} {s}" for s, n in m["largest_functions"]))
    print("classes over 250 lines:", m["classes_over_250_lines"] or "none")
    print("private members used across modules:", m["private_members_used_across_modules"])
    if args.reach:
        print("\n".join("  " + r for r in m["private_reach"]))
    print("duplicated blocks (>= 6 lines):", m["duplicated_blocks_of_6_lines"])
    print("import cycles at run time:", m["import_cycles"] or "none")
    print("import cycles counting type-only imports:", m["import_cycles_with_type_only_imports"] or "none")


if __name__ == "__main__":
    main()
