"""One MLflow run behind the ``Tracker`` interface, through ``MlflowClient`` by run id (no global active run).

A resumed training continues the same run, and evaluation runs nest one child run per model. Opening an embedded
store that was moved rewrites its artifact locations first (``mlflow_store.relocate_store``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import medseg_diff.tracking.mlflow_store as mlflow_store
from medseg_diff.tracking.uris import check_server, resolve_uri


class MlflowTracker:
    """One MLflow run (new or resumed)."""

    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    @classmethod
    def start(cls, uri: str | None, experiment: str, run_name: str | None = None, run_id: str | None = None,
              tags: dict[str, str] | None = None) -> "MlflowTracker":
        """Start a run in ``experiment`` (created if needed), or resume ``run_id`` when it exists."""
        from mlflow.exceptions import MlflowException

        uri = resolve_uri(uri)
        db = mlflow_store.sqlite_file(uri)
        if db is not None and db.exists():
            mlflow_store.relocate_store(db)
        check_server(uri)
        client = mlflow_store.client(uri)
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

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """``rows`` as an MLflow table artifact (``artifact_file`` ends in ``.json``): the run page shows it as a table
        and the *Evaluation* tab of *Compare* puts the tables of several runs side by side."""
        import pandas as pd

        self.client.log_table(self.run_id, pd.DataFrame(rows), artifact_file)

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: dict | None = None) -> None:
        """Record a dataset as this run's input (MLflow's Datasets column): ``digest`` identifies its content,
        ``context`` says what the run used it for (training, evaluation)."""
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
    """The id of experiment ``name``; created when absent, in an embedded store with its artifacts in
    ``mlartifacts/`` beside the database (``mlflow_store.artifact_root``)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=mlflow_store.artifact_root(uri))


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
