"""The package's shape: every module imports, no import cycle, and the kernels' choices live in specs, not in
module state.

Why these are tests: an import cycle works until someone imports the modules in another order (then a name is
missing from a half-initialised module); a module-level switch makes a call's result depend on what other code
in the process set; the kernel modules are read one at a time, so none may reach into another's private names.
The import graph is read from the source (``ast``), every ``import`` statement counted, those inside functions
too: a deferred import only postpones a cycle.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import MappingProxyType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "liteattn"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (source file, is a package)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _from_module(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of ``from ... import`` in module ``name``."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path, is_package: bool) -> set[str]:
    """The package modules ``name`` imports. ``from X import y`` counts as an import of ``X.y`` when that is a
    module, else of ``X``; a dotted target also imports its parent packages, except those ``name`` lies in (they
    are initialised before it), unless it imports a name from one of them."""
    targets: set[tuple[str, bool]] = set()  # (module, names something defined in it)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {(alias.name, "." not in alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(name, is_package, node)
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                targets.add((sub, False) if sub in MODULES else (module, True))
    edges = set()
    for target, names_something in targets:
        if not target.startswith("liteattn"):
            continue
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            parent = ".".join(parts[:i])
            direct = parent == target and names_something
            if parent in MODULES and parent != name and (direct or not name.startswith(parent + ".")):
                edges.add(parent)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = {name: _imports(name, path, is_package) for name, (path, is_package) in MODULES.items()}
    assert graph["liteattn.kernels.dispatch"] >= {"liteattn.kernels.portable", "liteattn.kernels.sm90"}
    edges = [f"{a} -> {b}" for cycle in _cycles(graph) for a in cycle for b in sorted(graph[a]) if b in cycle]
    assert edges == [], "imports that close a cycle are among these:\n" + "\n".join(edges)


def test_the_cycle_check_finds_a_cycle():
    """The check above can fail: a deferred import back to the importer is a cycle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "liteattn.__main__"))
def test_every_module_imports(name):
    if name.startswith("liteattn.kernels.") and name not in ("liteattn.kernels.config",):
        pytest.importorskip("triton")
    importlib.import_module(name)


KERNELS = {name: path for name, (path, _) in MODULES.items() if name.startswith("liteattn.kernels.")}


def test_kernel_modules_use_no_private_name_of_another():
    """Each kernel module is read on its own: what two share is public in :mod:`liteattn.kernels.common` (a private
    module, such as :mod:`liteattn.kernels._gluon`, may be imported; a private name from a module may not)."""
    private = []
    for name, path in KERNELS.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = _from_module(name, False, node)
                private += [f"{name}: {module}.{a.name}" for a in node.names if module.startswith("liteattn")
                            and a.name.startswith("_") and f"{module}.{a.name}" not in MODULES]
    assert private == []


# Module-level values of the kernels that are not settings: constants, and one record of what happened (the
# Triton versions whose Gluon build failed in this process, so later calls do not try again).
_RECORDS = {"liteattn.kernels.dispatch": {"_GLUON_BUILD_FAILED"}}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_modules_hold_no_switches(name):
    """No kernel setting lives in module state: every module-level value of a kernel module is immutable (a
    setting is a :class:`~liteattn.kernels.dispatch.KernelSpec` field) and no function rebinds a module global."""
    pytest.importorskip("triton")
    module = importlib.import_module(name)
    tree = ast.parse(KERNELS[name].read_text())
    assert not [node.names for node in ast.walk(tree) if isinstance(node, ast.Global)]
    assigned = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    immutable = (str, int, float, bool, tuple, frozenset, type(None), MappingProxyType)
    mutable = sorted(n for n in assigned - _RECORDS.get(name, set()) if not n.startswith("__")
                     and not isinstance(getattr(module, n), immutable)
                     and type(getattr(module, n)).__name__ != "constexpr")
    assert mutable == [], f"{name}: module-level values {mutable} are mutable"


def test_nothing_sets_attributes_of_the_kernel_modules():
    """Neither the package nor the development scripts in lab/ change a kernel module's attributes (``setattr``
    or ``module.NAME = ...``): experiments pass a spec to the launcher instead."""
    offences = []
    where = {path: (name, is_package) for name, (path, is_package) in MODULES.items()}
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "lab").rglob("*.py")):
        tree = ast.parse(path.read_text())
        name, is_package = where.get(path, ("__main__", False))
        aliases = set()  # names bound to a kernel module, or to a package above one
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases |= {a.asname or a.name.split(".")[0] for a in node.names
                            if a.name.startswith("liteattn.kernels")}
            elif isinstance(node, ast.ImportFrom):
                module = _from_module(name, is_package, node)
                aliases |= {a.asname or a.name for a in node.names
                            if f"{module}.{a.name}".startswith("liteattn.kernels") and f"{module}.{a.name}" in MODULES}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and _root_name(target.value) in aliases:
                    offences.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                    and node.args and _root_name(node.args[0]) in aliases):
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offences == []


def _root_name(node) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None
