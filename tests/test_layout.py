"""The package's layers: each package imports only the packages its row of ``ALLOWED`` names (imports inside
functions count: a lazy import does not hide an arrow; imports under ``if TYPE_CHECKING:`` are annotations only and
do not), no module imports its own importers, and inference never loads training. docs/architecture.md draws it."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medseg_diff"


#: package (or top-level module) -> the packages it may import; ``medseg_diff`` is the package root (its version).
#: Bottom to top: the error types and the run-time set-up; data (files, manifests, DICOM reading, the label
#: vocabulary), networks, diffusion; the model kinds; the config; the prediction folder; the libraries (inference,
#: evaluation, export, DICOM writing, tracking, training, the audit); the stages that compose them; the CLI.
ALLOWED: dict[str, set[str]] = {
    "medseg_diff": set(),
    "errors": set(),
    "runtime": {"errors"},
    "safe_yaml": set(),
    "store_uris": {"errors"},
    "ownership": {"errors"},
    "checkpoint": {"errors"},
    "data": {"errors", "safe_yaml"},
    "models": {"errors"},
    "diffusion": {"errors", "models"},
    "kinds": {"errors", "models", "diffusion"},
    "config": {"errors", "safe_yaml", "store_uris", "kinds"},
    "predictions": {"errors", "data"},
    "tracking": {"errors", "store_uris", "checkpoint"},
    "inference": {"errors", "checkpoint", "config", "data", "kinds", "predictions"},
    "evaluation": {"errors", "runtime", "data", "predictions", "tracking"},
    "export": {"medseg_diff", "errors", "data", "kinds", "predictions", "evaluation"},
    "dicom": {"medseg_diff", "errors", "data", "predictions"},
    "training": {"errors", "runtime", "checkpoint", "config", "data", "kinds", "inference", "evaluation", "tracking"},
    "audit": {"errors", "runtime", "data", "models", "diffusion", "kinds", "inference", "evaluation", "tracking"},
    "stages": {"errors", "runtime", "ownership", "config", "data", "predictions", "inference", "evaluation", "export", "dicom",
               "tracking", "training", "audit"},
    "cli": {"medseg_diff", "errors", "runtime", "store_uris", "stages"},
}
#: modules held to a narrower row than their package's: module -> the packages it may import (its own included).
MODULES: dict[str, set[str]] = {
    "data.nnunet": {"errors", "data"},  # the nnU-Net exporter and label mapping: the data layer and the errors only
}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (annotations, never imported at run time)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def _imports(path: Path) -> set[str]:
    """Every ``medseg_diff`` module a file imports, at any depth (lazy imports inside functions included)."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    annotations = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in annotations:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medseg_diff"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medseg_diff")}
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The row of ``ALLOWED`` a module belongs to: its package under ``medseg_diff`` (or the root itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_package_imports_only_what_its_row_allows():
    units = {_unit(_module(p)) for p in PACKAGE.rglob("*.py")}
    assert units == set(ALLOWED), f"packages without a row: {units - set(ALLOWED)}; rows without a package: " \
                                  f"{set(ALLOWED) - units}"
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _unit(_module(path))
        for target in sorted({_unit(m) for m in _imports(path)} - {src}):
            if target not in ALLOWED[src]:
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {target}")
    assert not bad, "arrows outside the table:\n" + "\n".join(bad)


def test_the_table_itself_has_no_cycle():
    state: dict[str, int] = {}

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for nxt in sorted(ALLOWED[unit]):
            assert state.get(nxt) != 1, "cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[unit] = 2

    for unit in sorted(ALLOWED):
        if unit not in state:
            visit(unit, [unit])


def test_the_arrows_the_architecture_forbids_are_absent():
    forbidden = [("inference", "export"), ("export", "inference"), ("evaluation", "inference"),
                 ("evaluation", "training"), ("data", "dicom"), ("data", "export"), ("inference", "tracking"),
                 ("training", "stages"), ("cli", "training")]
    assert not [arrow for arrow in forbidden if arrow[1] in ALLOWED[arrow[0]]]


def test_inference_and_evaluation_import_nothing_from_training():
    for stage in ("inference", "evaluation", "export"):
        for path in (PACKAGE / stage).rglob("*.py"):
            bad = {m for m in _imports(path) if m.startswith("medseg_diff.training")}
            assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_loading_a_model_and_predicting_does_not_load_training_modules():
    code = ("import sys, medseg_diff.stages.predict, medseg_diff.inference.loading, medseg_diff.evaluation.run; "
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


def test_modules_with_their_own_row_import_only_what_it_allows():
    for module, allowed in MODULES.items():
        path = PACKAGE / f"{module.replace('.', '/')}.py"
        assert path.is_file(), f"{module} has a row but no file"
        bad = sorted(m for m in _imports(path) if _unit(m) not in allowed)
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}, outside its row {sorted(allowed)}"


def test_the_old_flat_engine_package_is_gone():
    assert not (PACKAGE / "engine").exists()
