"""The import-layer contract of the ``sdtl`` package, read from the source (AST; nothing is imported).

Layers, top to bottom; a module may import its own layer (within the rules below) and any layer
under it, never one above::

    entry       sdtl (the package facade), sdtl.__main__, sdtl.cli,
                and the subcommand registration modules sdtl.data.cli, sdtl.models.cli
    studies     sdtl.studies.*           (demo, compare, sweep, wise: many runs, one summary)
    engine      sdtl.engine.*            (config, loops, run folders, diagnostics, evaluation)
    components  sdtl.pretext.*, sdtl.data.*, sdtl.models.*, sdtl.regularizers.*
    base        sdtl.errors, sdtl.atomic, sdtl.assets, sdtl.option_keys

* Every import counts: module level, inside functions and classes, under ``if TYPE_CHECKING``, and
  ``importlib.import_module("sdtl...")`` with a literal name. (The lazy ``__getattr__`` re-exports of
  ``sdtl.data`` / ``sdtl.models``, ``import_module(f"sdtl.data.{...}")``, only reach their own package
  and are not followed.) ``from pkg import name`` is an import of ``pkg.name`` when that is a module,
  else of ``pkg`` (its ``__init__``). A package's ``__init__`` is not counted as imported by its
  submodules (Python runs it first, but a package re-exporting its own modules is no cycle).
* Components may import each other only along :data:`COMPONENT_ARROWS` (pretext tasks build on the data
  pipeline and on encoders; a regularizer may ask an encoder for its spec). ``sdtl.data`` and
  ``sdtl.models`` import no other component: the data pipeline knows no model and vice versa.
* ``sdtl`` itself (``__init__``: ``__version__`` and the lazy public re-export of ``SelfDistillation``)
  is the facade at the top: lower layers do not import it (read the version with
  ``importlib.metadata.version("sdtl")`` if a lower layer ever needs it).
* ``sdtl.data.cli`` and ``sdtl.models.cli`` register the ``sdtl data ...`` / ``sdtl model ...``
  subcommands: CLI code that lives beside the package it serves. They are entry-layer modules, so no
  module of their package (or any other below the entry layer) may import them, and they may import
  only their home package and the base layer (:data:`SUBCOMMAND_MODULES`): a subcommand that needs the
  engine belongs in ``sdtl/cli.py``.
* No import cycle anywhere in the package (module graph, every import above).

Each violation is reported as ``file:line: from -> to (why)``.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: bottom to top
LAYERS = ("base", "components", "engine", "studies", "entry")

#: module (exact) or package prefix -> layer; the longest match wins; ``sdtl`` matches only itself.
PLACEMENT = {
    "sdtl": "entry", "sdtl.__main__": "entry", "sdtl.cli": "entry",
    "sdtl.data.cli": "entry", "sdtl.models.cli": "entry",
    "sdtl.studies": "studies",
    "sdtl.engine": "engine",
    "sdtl.pretext": "components", "sdtl.data": "components", "sdtl.models": "components",
    "sdtl.regularizers": "components",
    "sdtl.errors": "base", "sdtl.atomic": "base", "sdtl.assets": "base", "sdtl.option_keys": "base",
    "sdtl.cli_options": "studies",  # argparse helpers: for the CLI and the studies that register commands
}

#: the only imports allowed between different component packages
COMPONENT_ARROWS = {
    "sdtl.pretext": {"sdtl.data", "sdtl.models"},
    "sdtl.regularizers": {"sdtl.models"},
    "sdtl.data": set(),
    "sdtl.models": set(),
}

#: subcommand registration module -> the one package (besides the base layer) it may import
SUBCOMMAND_MODULES = {"sdtl.data.cli": "sdtl.data", "sdtl.models.cli": "sdtl.models"}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} -> {self.target}"


def find_modules(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``src/package``."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _literal_import(node: ast.Call) -> str | None:
    """The module of ``importlib.import_module("x")`` / ``import_module("x")`` / ``__import__("x")``."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def import_edges(src: Path, package: str) -> tuple[dict[str, Path], list[Edge]]:
    """Every import of a ``package`` module by a ``package`` module, wherever it is written."""
    modules = find_modules(src, package)

    def existing(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        rel = path.relative_to(src.parent) if src.parent in path.parents else path
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
            elif isinstance(node, ast.Call):
                literal = _literal_import(node)
                targets = [literal] if literal else []
            for target in targets:
                if target.split(".")[0] != package:
                    continue
                resolved = existing(target)
                if resolved is not None and resolved != module:
                    edges.append(Edge(module, resolved, str(rel), node.lineno))
    return modules, edges


def layer_of(module: str) -> str | None:
    best = None
    for key in PLACEMENT:
        matches = module == key or (key != "sdtl" and module.startswith(key + "."))
        if matches and (best is None or len(key) > len(best)):
            best = key
    return PLACEMENT[best] if best else None


def component_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layer_violations(modules: dict[str, Path], edges: list[Edge]) -> list[str]:
    problems = [f"{modules[m]}: module {m} is in no layer; add it to PLACEMENT in tests/test_layers.py"
                for m in modules if layer_of(m) is None]
    rank = {name: i for i, name in enumerate(LAYERS)}
    for e in edges:
        src_layer, dst_layer = layer_of(e.source), layer_of(e.target)
        if src_layer is None or dst_layer is None:
            continue
        if e.source in SUBCOMMAND_MODULES:
            home = SUBCOMMAND_MODULES[e.source]
            if not (dst_layer == "base" or (component_of(e.target) == home and e.target not in SUBCOMMAND_MODULES)):
                problems.append(f"{e} (the subcommand module {e.source} may import only {home} and the base "
                                f"layer; a subcommand that needs more belongs in sdtl/cli.py)")
            continue
        if rank[dst_layer] > rank[src_layer]:
            why = f"the {src_layer} layer imports the {dst_layer} layer above it"
            if e.target in SUBCOMMAND_MODULES:
                why += f"; {e.target} registers CLI subcommands, only sdtl.cli imports it"
            elif e.target == "sdtl":
                why += "; the sdtl facade is for users (importlib.metadata.version('sdtl') for the version)"
            problems.append(f"{e} ({why})")
        elif src_layer == dst_layer == "components":
            a, b = component_of(e.source), component_of(e.target)
            if a != b and b not in COMPONENT_ARROWS.get(a, set()):
                allowed = ", ".join(sorted(COMPONENT_ARROWS.get(a, set()))) or "no other component"
                problems.append(f"{e} ({a} may import {allowed}; allowed arrows between components are "
                                f"COMPONENT_ARROWS in tests/test_layers.py)")
    return problems


def cycles(modules: dict[str, Path], edges: list[Edge]) -> list[str]:
    """One message per strongly connected component of the module graph, naming a cycle's imports."""
    graph: dict[str, dict[str, Edge]] = defaultdict(dict)
    for e in edges:
        graph[e.source].setdefault(e.target, e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(modules):  # iterative Tarjan
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        components.append(sorted(comp))
    messages = []
    for comp in components:
        members = set(comp)
        # the shortest way back to comp[0] from its first import inside the component
        start = comp[0]
        paths = {start: []}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                for child, edge in sorted(graph[node].items()):
                    if child not in members:
                        continue
                    if child == start:
                        found = paths[node] + [edge]
                        break
                    if child not in paths:
                        paths[child] = paths[node] + [edge]
                        nxt.append(child)
                if found:
                    break
            frontier = nxt
        chain = "\n    ".join(str(e) for e in found)
        messages.append(f"import cycle among {', '.join(comp)}:\n    {chain}")
    return messages


# --------------------------------------------------------------------------- the contract

def test_every_import_respects_the_layers():
    modules, edges = import_edges(SRC, "sdtl")
    assert len(modules) > 40 and len(edges) > 100  # the scan found the package
    problems = layer_violations(modules, edges)
    if problems:
        pytest.fail("import-layer contract broken (see tests/test_layers.py for the layers):\n  "
                    + "\n  ".join(problems), pytrace=False)


def test_no_import_cycle():
    modules, edges = import_edges(SRC, "sdtl")
    problems = cycles(modules, edges)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_component_arrows_name_real_packages():
    modules = find_modules(SRC, "sdtl")
    packages = {component_of(m) for m in modules if layer_of(m) == "components"}
    assert set(COMPONENT_ARROWS) == packages
    assert all(t in packages for targets in COMPONENT_ARROWS.values() for t in targets)
    assert all(m in modules for m in SUBCOMMAND_MODULES)


# --------------------------------------------------------------------------- the checker itself

def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src"
    for name, text in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


@pytest.fixture
def planted(tmp_path):
    """A miniature sdtl with one upward import, one forbidden component arrow, one subcommand
    module reaching into the engine and a cycle, all written as function-level imports."""
    return _plant(tmp_path, {
        "sdtl/__init__.py": "",
        "sdtl/errors.py": "",
        "sdtl/cli.py": "def main():\n    from sdtl.data import cli\n",
        "sdtl/engine/__init__.py": "",
        "sdtl/engine/loop.py": "from sdtl.data.datasets import x\n",
        "sdtl/data/__init__.py": "",
        "sdtl/data/cli.py": "def run():\n    from sdtl.engine import loop\n",
        "sdtl/data/datasets.py": "def f():\n    from sdtl.engine.loop import fit\n"
                                 "def g():\n    from ..models import net\n",
        "sdtl/models/__init__.py": "",
        "sdtl/models/net.py": "import importlib\nM = importlib.import_module('sdtl.models.other')\n",
        "sdtl/models/other.py": "if True:\n    from sdtl.models import net\n",
    })


def test_the_checker_names_each_planted_violation(planted):
    modules, edges = import_edges(planted, "sdtl")
    problems = "\n".join(layer_violations(modules, edges))
    assert "sdtl/data/datasets.py:2: sdtl.data.datasets -> sdtl.engine.loop (the components layer imports " \
           "the engine layer above it)" in problems
    assert "sdtl/data/datasets.py:4: sdtl.data.datasets -> sdtl.models.net (sdtl.data may import no other " \
           "component" in problems
    assert "sdtl/data/cli.py:2: sdtl.data.cli -> sdtl.engine.loop (the subcommand module" in problems
    assert "sdtl.cli -> sdtl.data.cli" not in problems  # the entry layer registers its subcommands
    found = "\n".join(cycles(modules, edges))
    assert "import cycle among sdtl.data.datasets, sdtl.engine.loop" in found
    assert "sdtl/engine/loop.py:1: sdtl.engine.loop -> sdtl.data.datasets" in found
    assert "import cycle among sdtl.models.net, sdtl.models.other" in found  # import_module and if-block imports
    assert "sdtl/models/net.py:2: sdtl.models.net -> sdtl.models.other" in found


def test_an_unplaced_module_is_reported(tmp_path):
    src = _plant(tmp_path, {"sdtl/__init__.py": "", "sdtl/newthing.py": "from sdtl import errors\n",
                            "sdtl/errors.py": ""})
    modules, edges = import_edges(src, "sdtl")
    assert any("module sdtl.newthing is in no layer" in p for p in layer_violations(modules, edges))
