"""Architecture check: imports flow one way and no stage module is imported.

Layers, lowest first (a module may import its own layer or lower ones):

0. ``hymirec_udfs.core.*``: config, schemas, session, tables, tracking, lineage, stage API
1. algorithm modules: every ``hymirec_udfs.<subpackage>.<module>`` that is not ``stage``
2. ``hymirec_udfs.artifacts``: the read side ("the current embeddings, codebook, ...")
3. stage modules ``hymirec_udfs.<subpackage>.stage``: import nothing of their own layer
4. ``hymirec_udfs.pipeline``: names stage modules only as ``"module:function"`` strings
5. ``hymirec_udfs.cli``, ``hymirec_udfs.notebook``

Every import counts, including those inside functions and under ``TYPE_CHECKING``; any
import cycle fails. Written with ``ast`` rather than import-linter: the rule "each
subpackage's ``stage`` module sits above the read side while its siblings sit below it"
would need every module listed by hand in import-linter's layers contract (and updated
with every new module), where a rule over names states it once.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "hymirec_udfs"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

CORE, ALGORITHM, READ_SIDE, STAGE, PIPELINE, ENTRY = range(6)
LAYER_NAMES = ["core", "algorithm", "read side", "stage", "pipeline", "entry point"]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root``: dotted name -> file."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join([package, *parts])] = path
    return names


def layer_of(module: str, package: str) -> int:
    """The layer of a dotted module name (see the module docstring)."""
    parts = module.split(".")[1:]
    if not parts:
        return CORE
    if parts[0] == "core":
        return CORE
    if parts == ["artifacts"]:
        return READ_SIDE
    if parts == ["pipeline"]:
        return PIPELINE
    if parts[0] in ("cli", "notebook", "schedule"):
        return ENTRY
    if len(parts) >= 2 and parts[1] == "stage":
        return STAGE
    return ALGORITHM


def imports_of(path: Path, module: str, known: set[str], package: str) -> set[str]:
    """Package modules that ``path`` imports anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            if not (target == package or target.startswith(package + ".")):
                continue
            # the longest known module that the dotted name starts with
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != module:
                found.add(target)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> package modules it imports."""
    names = module_names(root, package)
    known = set(names)
    return {name: imports_of(path, name, known, package) for name, path in names.items()}


def _is_ancestor_package(importer: str, imported: str) -> bool:
    # ``from hymirec_udfs.core import schemas`` loads ``hymirec_udfs.core/__init__``:
    # a package's docstring-only __init__ is not a dependency on its contents.
    return importer.startswith(imported + ".")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if _is_ancestor_package(node, nxt):
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def layer_violations(graph: dict[str, set[str]], package: str) -> list[str]:
    """Imports that go up a layer, import a stage module, or are between stage modules."""
    problems = []
    for importer, targets in sorted(graph.items()):
        mine = layer_of(importer, package)
        for imported in sorted(targets):
            if _is_ancestor_package(importer, imported):
                continue
            theirs = layer_of(imported, package)
            if theirs == STAGE:
                problems.append(f"{importer} imports stage module {imported} (only the registry names "
                                f"stages, by string)")
            elif theirs > mine:
                problems.append(f"{importer} ({LAYER_NAMES[mine]}) imports {imported} "
                                f"({LAYER_NAMES[theirs]}), a higher layer")
    return problems


def check_architecture(root: Path, package: str) -> list[str]:
    """All violations of the package at ``root`` (empty when it is clean)."""
    graph = import_graph(root, package)
    problems = [f"import cycle: {' <-> '.join(c)}" for c in find_cycles(graph)]
    return problems + layer_violations(graph, package)


def test_package_imports_flow_one_way():
    assert check_architecture(ROOT, PACKAGE) == []


def test_every_stage_module_is_registered_and_no_other():
    from hymirec_udfs.pipeline import all_stages

    stage_modules = {name for name in module_names(ROOT, PACKAGE) if layer_of(name, PACKAGE) == STAGE}
    registered = {spec.target.split(":")[0] for spec in all_stages()}
    assert registered == stage_modules


def _write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_check_catches_a_cycle_it_is_given(tmp_path):
    root = _write_package(tmp_path, {
        "core/__init__.py": "",
        "a/__init__.py": "",
        "a/x.py": "def f():\n    from pkg.b.y import g\n",
        "b/__init__.py": "",
        "b/y.py": "from pkg.a import x\n",
    })
    problems = check_architecture(root, "pkg")
    assert problems == ["import cycle: pkg.a.x <-> pkg.b.y"]


def test_check_catches_a_stage_import_and_an_upward_import(tmp_path):
    root = _write_package(tmp_path, {
        "core/__init__.py": "",
        "core/config.py": "from pkg import artifacts\n",
        "artifacts.py": "",
        "a/__init__.py": "",
        "a/stage.py": "",
        "b/__init__.py": "",
        "b/stage.py": "from pkg.a.stage import run\n",
    })
    problems = check_architecture(root, "pkg")
    assert "pkg.b.stage imports stage module pkg.a.stage (only the registry names stages, by string)" in problems
    assert "pkg.core.config (core) imports pkg.artifacts (read side), a higher layer" in problems
    assert len(problems) == 2


@pytest.mark.parametrize("module,layer", [
    ("hymirec_udfs.core.tables", CORE), ("hymirec_udfs.codebook.kmeans", ALGORITHM),
    ("hymirec_udfs.artifacts", READ_SIDE), ("hymirec_udfs.codebook.stage", STAGE),
    ("hymirec_udfs.pipeline", PIPELINE), ("hymirec_udfs.cli", ENTRY),
])
def test_layers_are_named_as_documented(module, layer):
    assert layer_of(module, PACKAGE) == layer


def test_no_package_module_is_over_700_lines_unless_it_says_it_is_one_concern():
    long = []
    for name, path in module_names(ROOT, PACKAGE).items():
        text = path.read_text()
        if text.count("\n") > 700 and "One concern:" not in text[:3000]:
            long.append(f"{name} ({text.count(chr(10))} lines)")
    assert long == []
