"""The package's stages: inference never imports training, and no module imports its own importers."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medseg_diff"


def _imports(path: Path) -> set[str]:
    """Every ``medseg_diff`` module a file imports, at any depth (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medseg_diff"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medseg_diff")}
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_inference_and_evaluation_import_nothing_from_training():
    for stage in ("inference", "evaluation", "export"):
        for path in (PACKAGE / stage).rglob("*.py"):
            bad = {m for m in _imports(path) if m.startswith("medseg_diff.training")}
            assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_loading_a_model_and_predicting_does_not_load_training_modules():
    code = ("import sys, medseg_diff.inference.run, medseg_diff.inference.loading, medseg_diff.evaluation.run; "
            "print(sorted(m for m in sys.modules if m.startswith('medseg_diff.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_import_graph_between_modules_is_acyclic():
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [m, n]))
            if n not in state:
                visit(n, stack + [m] if n not in stack else stack)
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_old_flat_engine_package_is_gone():
    assert not (PACKAGE / "engine").exists()
