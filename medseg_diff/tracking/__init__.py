"""MLflow tracking behind a small interface, so that ``tracking: false`` (or no MLflow) costs nothing.

Default store: ``sqlite:///mlflow.db`` in the working directory (embedded, no server), artifacts in
``mlartifacts/`` beside it. Any tracking URI via config ``tracking.uri`` or ``MLFLOW_TRACKING_URI``.
Runs are addressed by id through ``MlflowClient`` (no global active run), so a resumed training
continues the same run and evaluation runs can nest one child run per model.

Moving a store: MLflow writes every local artifact location into the database as an absolute ``file://`` URI, so a
moved (or copied) embedded store would still point at its old ``mlartifacts/``. ``relocate_store`` rewrites them;
``MlflowTracker.start`` and ``registry.checkpoint_of_model`` call it when they open a sqlite store. A store served by
``mlflow server --artifacts-destination DIR`` holds ``mlflow-artifacts:/`` URIs instead and moves as it is (see
``tracking.registry``). The trained model is logged and registered by ``tracking.registry.log_model``.

This module is the public face; the work is done in
``uris`` (which store, does its server answer, the UI's runs table), ``provenance`` (git commit, source tags),
``mlflow_tracker`` (a run through ``MlflowClient``), ``registry`` (the model: logged, registered, fetched back) and
``mlflow_store``, the one module that goes beyond MLflow's public client API (version check, the process's
tracking URI for a block, relocating a moved sqlite store). None of them imports MLflow at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from medseg_diff.tracking.mlflow_store import relocate_store
from medseg_diff.tracking.mlflow_tracker import MlflowTracker
from medseg_diff.tracking.provenance import git_commit, source_tags
from medseg_diff.tracking.uris import DEFAULT_URI, check_server, compare_runs_url, resolve_uri, runs_table_url

__all__ = [
    "DEFAULT_URI",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "check_server",
    "compare_runs_url",
    "git_commit",
    "relocate_store",
    "resolve_uri",
    "runs_table_url",
    "source_tags",
    "start_tracker",
]


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None: ...

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: dict | None = None) -> None: ...

    def child(self, name: str, tags: dict[str, str] | None = None) -> "Tracker": ...

    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracking disabled: every call is accepted and dropped."""

    run_id = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass

    def log_table(self, rows, artifact_file):
        pass

    def log_dataset(self, name, digest, source, context, profile=None):
        pass

    def child(self, name, tags=None):
        return self

    def end(self, status="FINISHED"):
        pass


def start_tracker(enabled: bool, uri: str | None, experiment: str, run_name: str | None = None,
                  run_id: str | None = None, tags: dict[str, str] | None = None) -> Tracker:
    """An MLflow run when ``enabled``, else a ``NullTracker``."""
    if not enabled:
        return NullTracker()
    return MlflowTracker.start(uri, experiment, run_name=run_name, run_id=run_id, tags=tags)
