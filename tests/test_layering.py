"""Imports run one way: commands → pipeline → stages → shared pieces → deploy, and no module imports itself
back through others. Read from the source with ``ast`` (nothing is imported), so the check is cheap and
covers lazy imports inside functions too.

- commands: ``commands/`` and ``distill/run.py`` (the product's entry script);
- pipeline: ``pipeline/`` (the ordered stages, skip/resume, run folder, tracking; experiments over them);
- stages: ``teacher/``, ``distill/``, ``export/``, ``benchmarks/``;
- shared pieces: ``data/``, ``evaluation/``, ``training/``, ``student/``, ``configs/``;
- ``deploy/``: the torch-free edge runtime, which imports nothing of the project outside itself.

Not counted: imports under ``if __name__ == "__main__":`` (a stage module forwarding ``python -m
teacher.train`` to the command layer) and under ``if TYPE_CHECKING:`` (annotations only).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Mapping

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"commands": 0, "pipeline": 1, "teacher": 2, "distill": 2, "export": 2, "benchmarks": 2,
          "data": 3, "evaluation": 3, "training": 3, "student": 3, "configs": 3, "deploy": 4}
ENTRY_SCRIPTS = {"distill.run": "commands"}  # module -> the layer it belongs to
# Stage -> stage imports that are allowed, and why. Any other is a violation.
PEER_EDGES = {
    ("distill", "teacher"): "the teacher cache and online KD run the teacher (a pupil knows its teacher, never the reverse)",
    ("benchmarks", "teacher"): "eager teacher rows load a teacher.pt",
    ("benchmarks", "export"): "--quick exports an untrained student to benchmark",
    ("distill", "export"): "the size × λ search (distill/tune_latency.py) times each student size exported to ONNX",
    ("distill", "benchmarks"): "... with the benchmark's timing helper (benchmarks.measure.time_runs)",
}


def _module_name(rel: Path) -> str:
    name = ".".join(rel.with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def project_sources(root: Path = ROOT) -> dict[str, str]:
    """``{module name: source}`` of every project package module (tests and build output excluded)."""
    out = {}
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            out[_module_name(path.relative_to(root))] = path.read_text()
    return out


def _guarded(tree: ast.AST) -> set[int]:
    """ids of nodes under ``if __name__ == "__main__":`` or ``if TYPE_CHECKING:``."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.If):
            continue
        test = node.test
        main_guard = isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
        type_guard = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                     (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        if main_guard or type_guard:
            skipped.update(id(n) for n in ast.walk(node) if n is not node.test)
    return skipped


def import_edges(sources: Mapping[str, str]) -> dict[str, set[str]]:
    """Module → project modules it imports (``from pkg import name`` resolves to ``pkg.name`` where that is a
    module, else to ``pkg``)."""
    modules = set(sources)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for module, source in sources.items():
        tree = ast.parse(source)
        skipped = _guarded(tree)
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] in LAYERS:
                    target = resolve(name)
                    if target and target != module:
                        targets.add(target)
        edges[module] = targets
    return edges


def _layer(module: str) -> tuple[str, int]:
    package = ENTRY_SCRIPTS.get(module, module.split(".")[0])
    return package, LAYERS[package]


def layering_violations(sources: Mapping[str, str]) -> list[str]:
    """Every import against the order, as ``"a.b imports c.d: why"``."""
    out = []
    for module, targets in sorted(import_edges(sources).items()):
        package, layer = _layer(module)
        for target in sorted(targets):
            target_package, target_layer = _layer(target)
            if target_package == package:
                continue
            if package == "deploy":
                out.append(f"{module} imports {target}: deploy/ imports nothing of the project outside itself")
            elif target_layer < layer:
                out.append(f"{module} imports {target}: {package} ({layer}) may not import {target_package} ({target_layer}), "
                           "a layer above it")
            elif target_layer == layer == LAYERS["teacher"] and (package, target_package) not in PEER_EDGES:
                out.append(f"{module} imports {target}: stage {package} may not import stage {target_package} "
                           "(not an allowed peer edge)")
    return out


def import_cycles(sources: Mapping[str, str]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    edges = import_edges(sources)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def test_imports_run_one_way():
    assert layering_violations(project_sources()) == []


def test_no_import_cycle_among_the_project_modules():
    assert import_cycles(project_sources()) == []


def test_the_check_fails_when_a_stage_imports_the_pipeline_or_deploy_imports_training_code():
    sources = project_sources()
    assert "pipeline.pipeline" in sources and "commands.run" in sources
    bad = {**sources,
           "teacher.sneaky": "def f():\n    from pipeline import Pipeline\n    return Pipeline\n",
           "deploy.sneaky": "from data.atomic import write_json_atomic\n",
           "student.sneaky": "import distill.loss\n",
           "export.sneaky": "from distill.train import train_student\n"}
    found = layering_violations(bad)
    assert any(v.startswith("teacher.sneaky imports pipeline") for v in found), found
    assert any(v.startswith("deploy.sneaky imports data.atomic") for v in found), found
    assert any(v.startswith("student.sneaky imports distill.loss") for v in found), found
    assert any(v.startswith("export.sneaky imports distill.train") and "peer" in v for v in found), found
    # a forwarding __main__ block and a TYPE_CHECKING import are not dependencies
    fine = {**sources, "teacher.entry": 'if __name__ == "__main__":\n    from commands.teacher_train import main\n',
            "data.typed": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from distill.train import StudentResult\n"}
    assert layering_violations(fine) == []


def test_a_cycle_is_found():
    sources = {**project_sources(), "data.loop_a": "import data.loop_b\n", "data.loop_b": "from data import loop_a\n"}
    assert ["data.loop_a", "data.loop_b"] in import_cycles(sources)
