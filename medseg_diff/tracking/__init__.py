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

    def log_dataset(self, name, digest, source, context, profile=None):
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
        db = _sqlite_file(uri)
        if db is not None and db.exists():
            relocate_store(db)
        _check_server(uri)
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

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: dict | None = None) -> None:
        """Record a dataset as this run's input (MLflow's Datasets column): ``digest`` identifies its content,
        ``context`` says what the run used it for (training, evaluation)."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": source}),
                          profile=json.dumps(profile) if profile else None)
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

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


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (relative PATHs are relative to the working directory)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if not rest or rest == ":memory:" else Path(rest)


#: MLflow's columns that hold artifact locations: what a moved store needs rewritten (tables absent from older
#: schemas are skipped). Registered versions of MLflow 3 have ``source = models:/m-ID``, which no move affects.
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                     ("model_versions", "source"))
_STORE_FOLDERS = ("mlartifacts", "mlruns")  # beside the database: ours, and MLflow's default for experiment 0


def relocate_store(db: str | Path) -> int:
    """Point a moved or copied sqlite store at the ``mlartifacts/`` (and ``mlruns/``) beside its database again.

    An experiment whose artifact location is a local ``.../mlartifacts`` folder that is not beside ``db`` (as
    ``_experiment_id`` creates them, before the move) names the store's old folder ``OLD``; every artifact
    location under ``OLD/mlartifacts`` or ``OLD/mlruns`` -- experiments, runs, logged models, model versions -- is
    rewritten to the same path under ``db``'s folder. Nothing is done when the old folder is the same one (another
    path to it), or when it still exists while no ``mlartifacts`` is beside ``db`` (only the database was moved:
    the artifacts are still where it says). Locations elsewhere (``mlflow-artifacts:``, ``s3://``, other folders)
    are left alone. Returns the number of values rewritten.
    """
    import sqlite3

    db = Path(db)
    if not db.is_file():
        return 0
    try:
        return _relocate(sqlite3.connect(str(db), timeout=30), db.resolve().parent)
    except sqlite3.Error as err:  # read-only or not MLflow's: MLflow itself will say what is wrong
        import logging

        logging.getLogger(__name__).warning("could not check or relocate the artifact locations of %s (%s)", db, err)
        return 0


def _relocate(con, here: Path) -> int:
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return 0
        moved_from = set()
        for (location,) in con.execute("SELECT artifact_location FROM experiments"):
            path = _local_path(location)
            if path is None or path.name != "mlartifacts" or path.parent == here:
                continue
            if path.exists() and path.resolve() == here / "mlartifacts":
                continue
            if (here / "mlartifacts").is_dir() or not path.exists():
                moved_from.add(path.parent)
        changed = 0
        with con:
            for old in moved_from:
                for folder in _STORE_FOLDERS:
                    for before, after in (((old / folder).as_uri(), (here / folder).as_uri()),
                                          (str(old / folder), str(here / folder))):
                        for table, column in _ARTIFACT_COLUMNS:
                            if table not in tables:
                                continue
                            changed += con.execute(
                                f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                                (after, len(before) + 1, before, len(before) + 1, before + "/")).rowcount
        return changed
    finally:
        con.close()


def _local_path(location: str | None) -> Path | None:
    """The absolute local path of a ``file:`` URI or a plain absolute path; None for anything else."""
    import urllib.parse

    if not location:
        return None
    parts = urllib.parse.urlsplit(location)
    if parts.scheme == "file":
        path = Path(urllib.parse.unquote(parts.path))
    elif parts.scheme == "" and location.startswith("/"):
        path = Path(location)
    else:
        return None
    return path if path.is_absolute() else None


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def start_tracker(enabled: bool, uri: str | None, experiment: str, run_name: str | None = None,
                  run_id: str | None = None, tags: dict[str, str] | None = None) -> Tracker:
    """An MLflow run when ``enabled``, else a ``NullTracker``."""
    if not enabled:
        return NullTracker()
    return MlflowTracker.start(uri, experiment, run_name=run_name, run_id=run_id, tags=tags)


def runs_table_url(base_url: str, experiment_id: str) -> str:
    """The address that opens an experiment's runs table in the MLflow 3 UI, not its GenAI overview.

    The UI (MLflow 3.x, a hash router) has the route ``/experiments/:experimentId/runs`` for the runs tab; its
    sidebar follows a per-browser "workflow type" that defaults to GenAI, which ``workflowType=machine_learning``
    switches to the machine-learning one (Runs, Models, ...).
    """
    import urllib.parse

    experiment = urllib.parse.quote(str(experiment_id), safe="")
    return f"{base_url.rstrip('/')}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def _check_server(uri: str) -> None:
    """An http(s) tracking server must answer within 5 s (MLflow itself would retry for minutes)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            pass
    except urllib.error.HTTPError:
        pass  # it answered (a proxy may refuse /health)
    except ValueError:
        pass  # a URI urllib cannot open (credentials in it): MLflow's own client will say
    except OSError as err:
        from medseg_diff.errors import ServiceError

        parts = urllib.parse.urlsplit(uri)  # shown without any credentials
        host = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        raise ServiceError(f"tracking.uri: the MLflow server {host} does not answer ({getattr(err, 'reason', err)}); "
                           "start it, or use tracking.uri=sqlite:///mlflow.db, or tracking.enabled=false") from None


def source_tags(commit: str | None = None) -> dict[str, str]:
    """MLflow's own provenance tags (the UI's Source and Version columns): the entry point and the git commit.

    ``mlflow.source.git.commit`` holds the bare SHA; ``source_tree_dirty`` says when the tree had changes.
    """
    import sys

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
