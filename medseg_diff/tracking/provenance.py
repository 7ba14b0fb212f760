"""Which code made a run: the git commit of the package and MLflow's own source tags (no MLflow import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def source_tags(commit: str | None = None) -> dict[str, str]:
    """MLflow's own provenance tags (the UI's Source and Version columns): the entry point and the git commit.

    ``mlflow.source.git.commit`` holds the bare SHA; ``source_tree_dirty`` says when the tree had changes.
    """
    commit = commit or git_commit()
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": Path(sys.argv[0]).name or "python",
            "source_tree_dirty": str(commit.endswith("+dirty")).lower()}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("+dirty")
    return tags


def git_commit(cwd: str | Path | None = None) -> str:
    """The git commit of the code that runs (``+dirty`` when its tree has changes), or 'unknown' outside git.

    Asked in the package's own folder unless ``cwd`` is given: the working directory (often a data or
    run folder) says nothing about the code.
    """
    cwd = Path(__file__).resolve().parent if cwd is None else cwd
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
