"""The layout rules of DESIGN §2, checked on the source with an AST scan of every import in ``geolink/``.

Every ``import x`` and ``from x import y`` counts, wherever it is written: at module level, inside functions, under
``if TYPE_CHECKING:``; relative imports are resolved; ``importlib.import_module("geolink.x")`` and the lazy
re-export tables of PEP 562 packages (``_EXPORTS = {name: module}`` read by ``importlib.import_module`` in
``__getattr__``) count as imports of the modules they name. The implicit import of a parent package
(``geolink.graph.tiles`` runs ``geolink/graph/__init__``) does not count: only what a module names.

Layers: the sub-packages ``graph``, ``models``, ``data``, ``train``, ``eval``; the base modules ``errors``,
``runtime``, ``hub``, ``registry``, ``convert``; ``cli``; the package root ``geolink`` (its ``__init__``); every other
top-level module is an app (``demo``, ``finetune``, ``embed``, ...). The tables below are DESIGN §2's arrows
("may import"; anything not listed is forbidden). DESIGN does not list the base modules' arrows; they follow from
the listed ones: ``models`` may import ``hub``, so ``hub`` imports no model; ``registry`` builds models, loads
their weights (``hub``, and ``convert`` for ``pretrained=<official .pth>``), makes their image preprocessing
(``data.transforms``, for ``create_model_and_transforms``) and the tag encoder of a tag's text model
(``graph.text``, for ``tag_encoder_for``); ``convert`` turns official checkpoints
into models and official graphs into the schema (``graph``).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "geolink"
ROOT = "geolink"

SUBPACKAGES = ("graph", "models", "data", "train", "eval")
BASE_MODULES = ("errors", "runtime", "hub", "registry", "convert", "cli")
LAYERS = (ROOT, *SUBPACKAGES, *BASE_MODULES, "apps")
EVERYTHING_BUT_CLI = frozenset(LAYERS) - {"cli"}

# source layer -> what it may import: layer names, or full module names (dotted) for a single module of a layer
ALLOWED: dict[str, frozenset[str]] = {
    "graph": frozenset({"graph", "errors", "runtime"}),
    "models": frozenset({"models", "geolink.graph.schema", "hub", "errors", "runtime"}),
    "data": frozenset({"data", "graph", "errors", "runtime"}),
    "train": frozenset({"train", "models", "data", "registry", "hub", "runtime", "errors"}),
    "eval": frozenset({"eval", "models", "registry", "data", "runtime", "errors"}),
    "errors": frozenset({"errors"}),
    "runtime": frozenset({"runtime", "errors"}),
    "hub": frozenset({"hub", "errors", "runtime"}),
    "registry": frozenset({"registry", "models", "hub", "convert", "errors", "runtime", "geolink.data.transforms",
                           "geolink.graph.text"}),
    "convert": frozenset({"convert", "models", "hub", "graph", "errors", "runtime"}),
    "apps": EVERYTHING_BUT_CLI,
    ROOT: EVERYTHING_BUT_CLI,  # the public API: lazy re-exports of the layers
    "cli": frozenset(LAYERS),
}


@dataclass(frozen=True)
class Import:
    """One import written in a module: who imports what, where."""

    source: str  # importing module, e.g. "geolink.data.shards"
    target: str  # imported geolink module (or the name as written when no such module exists)
    path: Path
    line: int
    exists: bool


def module_files(package: Path, name: str = ROOT) -> dict[str, Path]:
    """Every module of the package under ``package`` by dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = [name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(source: str, path: Path, module: str | None, level: int) -> str:
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def _dynamic_imports(tree: ast.Module, source: str) -> list[tuple[str, int]]:
    """``(module, line)`` imported by name: ``import_module("geolink.x")`` calls, and each entry of a module-level
    ``_EXPORTS`` table when the module uses ``import_module`` (relative entries name modules of the package)."""
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and "import_module" in (
        getattr(node.func, "attr", None), getattr(node.func, "id", None))]
    found = [(call.args[0].value, call.lineno) for call in calls
             if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)]
    for node in tree.body if calls else []:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets) and isinstance(node.value, ast.Dict):
            for value in node.value.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    name = value.value if value.value.split(".")[0] == ROOT else f"{source}.{value.value}"
                    found.append((name, value.lineno))
    return found


def scan_imports(modules: dict[str, Path]) -> list[Import]:
    """Every import of a ``geolink`` module written in ``modules`` (see the module docstring for what counts)."""
    imports = []
    for source, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        named: list[tuple[str, int]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                named += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (_resolve_relative(source, path, node.module, node.level) if node.level
                        else node.module or "")
                for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                    child = f"{base}.{alias.name}"
                    named.append((child if child in modules else base, node.lineno))
        named += _dynamic_imports(tree, source)
        for target, line in dict.fromkeys(named):  # ``from x import a, b`` names x once
            if target.split(".")[0] == ROOT:
                imports.append(Import(source, target, path, line, target in modules))
    return imports


def layer_of(module: str) -> str:
    """The DESIGN §2 layer of a dotted module name."""
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT
    return parts[1] if parts[1] in SUBPACKAGES or parts[1] in BASE_MODULES else "apps"


def is_allowed(source: str, target: str) -> bool:
    allowed = ALLOWED[layer_of(source)]
    return layer_of(target) in allowed or target in allowed


def import_cycles(modules: dict[str, Path], imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module in the import graph (Tarjan), each sorted."""
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if imp.exists and imp.target != imp.source:
            edges[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(modules):
        if node not in index:
            visit(node)
    return sorted(components)


def _rule(layer: str) -> str:
    return f"DESIGN §2: {layer} may import only {', '.join(sorted(ALLOWED[layer]))}"


def _where(imp: Import, package: Path) -> str:
    return f"{imp.path.relative_to(package.parent)}:{imp.line}"


MODULES = module_files(PACKAGE)
IMPORTS = scan_imports(MODULES)


def layering_violations(imports: list[Import], package: Path, layer: str) -> list[str]:
    return [f"{_where(i, package)}: {i.source} ({layer}) imports {i.target} ({layer_of(i.target)}); {_rule(layer)}"
            for i in imports if layer_of(i.source) == layer and i.exists and not is_allowed(i.source, i.target)]


def cycle_report(cycle: list[str], imports: list[Import], package: Path) -> str:
    members = set(cycle)
    arrows = [f"{i.source} -> {i.target} ({_where(i, package)})" for i in imports
              if i.source in members and i.target in members and i.source != i.target]
    return "import cycle (DESIGN §2: no import cycles, lazy imports count) between " + ", ".join(cycle) + \
        ":\n    " + "\n    ".join(arrows)


# --- the scanner itself, on a made-up package: it must see what the rules are about -----------------------------


def test_scanner_sees_lazy_relative_and_function_level_imports_and_cycles(tmp_path):
    package = tmp_path / "geolink"
    files = {
        "__init__.py": '"""Root."""\n',
        "cli.py": '"""CLI."""\n',
        "graph/__init__.py": '"""Lazy."""\nimport importlib\n_EXPORTS = {"Builder": "build"}\n'
                             "def __getattr__(name):\n    return importlib.import_module(name)\n",
        "graph/build.py": '"""Build."""\nfrom . import schema\n\n\ndef f():\n    from geolink.data import pairs\n',
        "graph/schema.py": '"""Schema."""\nfrom geolink.graph import Builder\n',
        "data/__init__.py": '"""Data."""\n',
        "data/pairs.py": '"""Pairs."""\nfrom ..cli import main\nimport geolink.graph.gone\n',
        "demo.py": '"""Demo."""\nimport importlib\nimportlib.import_module("geolink.data.pairs")\n',
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    modules = module_files(package)
    imports = scan_imports(modules)
    edges = {(i.source, i.target, i.line, i.exists) for i in imports}
    assert edges == {
        ("geolink.graph", "geolink.graph.build", 3, True),  # lazy export table
        ("geolink.graph.build", "geolink.graph.schema", 2, True),  # relative, ``from . import module``
        ("geolink.graph.build", "geolink.data.pairs", 6, True),  # function level
        ("geolink.graph.schema", "geolink.graph", 2, True),
        ("geolink.data.pairs", "geolink.cli", 2, True),  # relative, two levels up
        ("geolink.data.pairs", "geolink.graph.gone", 3, False),
        ("geolink.demo", "geolink.data.pairs", 3, True),  # import_module with a literal name
    }
    assert layering_violations(imports, package, "graph") == [
        "geolink/graph/build.py:6: geolink.graph.build (graph) imports geolink.data.pairs (data); " + _rule("graph")]
    assert [i.source for i in imports if i.target == "geolink.cli"] == ["geolink.data.pairs"]
    assert import_cycles(modules, imports) == [["geolink.graph", "geolink.graph.build", "geolink.graph.schema"]]


def test_the_scan_covers_the_package():
    layers = {layer_of(m) for m in MODULES}
    assert {ROOT, *SUBPACKAGES, "errors", "runtime", "hub", "registry", "convert", "cli"} <= layers
    assert ("geolink.registry", "geolink.models") in {(i.source, i.target) for i in IMPORTS}


# --- the rules ---------------------------------------------------------------------------------------------------


def test_every_module_has_a_docstring():
    missing = [f"{path.relative_to(PACKAGE.parent)}:1: no module docstring (DESIGN §2: every module starts with a "
               "docstring saying what it owns)" for path in MODULES.values()
               if not (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if layer != "cli"])
def test_imports_follow_the_layering(layer):
    violations = layering_violations(IMPORTS, PACKAGE, layer)
    assert not violations, "\n".join(violations)


def test_nothing_imports_cli():
    offenders = [f"{_where(i, PACKAGE)}: {i.source} imports {i.target} (DESIGN §2: nothing imports cli)"
                 for i in IMPORTS if layer_of(i.target) == "cli" and layer_of(i.source) != "cli"]
    assert not offenders, "\n".join(offenders)


def test_imports_name_existing_modules():
    missing = [f"{_where(i, PACKAGE)}: {i.source} imports {i.target}, which is not a module of geolink"
               for i in IMPORTS if not i.exists]
    assert not missing, "\n".join(missing)


def test_no_import_cycles():
    cycles = import_cycles(MODULES, IMPORTS)
    assert not cycles, "\n".join(cycle_report(c, IMPORTS, PACKAGE) for c in cycles)
