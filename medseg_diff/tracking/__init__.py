"""MLflow tracking behind a small interface, so that ``tracking: false`` (or no MLflow) costs nothing.

Default store: ``sqlite:///mlflow.db`` in the working directory (embedded, no server), artifacts in
``mlartifacts/`` beside it. Any tracking URI via config ``tracking.uri`` or ``MLFLOW_TRACKING_URI``.
Runs are addressed by id through ``MlflowClient`` (no global active run), so a resumed training
continues the same run and evaluation runs can nest one child run per model.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Protocol

DEFAULT_URI = "sqlite:///mlflow.db"


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

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

    def child(self, name, tags=None):
        return self

    def end(self, status="FINISHED"):
        pass


def resolve_uri(uri: str | None) -> str:
    """Config URI, else ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


class MlflowTracker:
    """One MLflow run (new or resumed)."""

    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    @classmethod
    def start(cls, uri: str | None, experiment: str, run_name: str | None = None, run_id: str | None = None,
              tags: dict[str, str] | None = None) -> "MlflowTracker":
        """Start a run in ``experiment`` (created if needed), or resume ``run_id`` when it exists."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = resolve_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, experiment, uri)
        if run_id is not None:
            try:
                run = client.get_run(run_id)
                client.update_run(run_id, status="RUNNING")
                return cls(client, run.info.run_id, run.info.experiment_id)
            except MlflowException:
                pass  # the store was reset: start a new run
        run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        return cls(client, run.info.run_id, experiment_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v == v]  # NaN dropped
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def child(self, name: str, tags: dict[str, str] | None = None) -> "MlflowTracker":
        """A nested run (shown under this one in the MLflow UI)."""
        all_tags = {"mlflow.parentRunId": self.run_id, **(tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return MlflowTracker(self.client, run.info.run_id, self.experiment_id)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _experiment_id(client, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        artifact_location = (db.parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def start_tracker(enabled: bool, uri: str | None, experiment: str, run_name: str | None = None,
                  run_id: str | None = None, tags: dict[str, str] | None = None) -> Tracker:
    """An MLflow run when ``enabled``, else a ``NullTracker``."""
    if not enabled:
        return NullTracker()
    return MlflowTracker.start(uri, experiment, run_name=run_name, run_id=run_id, tags=tags)


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
