"""MLflow tracking as its users meet it: another process and ``mlflow server`` read a training run back,
``tracking: false`` needs neither MLflow nor a store, ``MLFLOW_TRACKING_URI`` is honoured, and a resumed
training continues the same MLflow run."""

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from factories import tiny_config
from mlflow_processes import free_port, mlflow_client, stop_group, wait_for
from medseg_diff.config import load_config
from medseg_diff.checkpoint import load_checkpoint
from medseg_diff.training.run import train
from medseg_diff.training.trainer import Trainer

EXPERIMENT = "tiny-phantoms"  # default experiment: the data set's name
FAST = dict(data={"max_val_cases": 1}, train={"epochs": 2, "steps_per_epoch": 1, "val_every": 2},
            infer={"roi_size": [48, 48, 32], "sw_batch_size": 1})
STORE_FILES = ("*.db", "mlruns", "mlartifacts")


@dataclass
class Store:
    uri: str
    folder: Path
    run_id: str
    history: list[dict[str, float]]


@pytest.fixture(scope="module")
def store(phantoms, tmp_path_factory) -> Store:
    """A sqlite tracking store holding one finished training run (tiny U-Net, 2 epochs)."""
    folder = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    state = train(tiny_config(phantoms, folder / "unet", "unet", tracking_uri=uri, **FAST))
    assert state.run_id is not None and state.epoch == 2
    return Store(uri, folder, state.run_id, state.history)


# --- reading a run back from elsewhere ------------------------------------------------------------------

READ_BACK = """
import json, sys
from mlflow.tracking import MlflowClient

client = MlflowClient(tracking_uri=sys.argv[1])
run = client.get_run(sys.argv[2])
history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
           for key in run.data.metrics}
print(json.dumps({"status": run.info.status, "params": run.data.params, "tags": run.data.tags, "history": history}))
"""


def test_a_second_process_reads_back_the_training_metrics(store, tmp_path):
    proc = subprocess.run([sys.executable, "-c", READ_BACK, store.uri, store.run_id], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["status"] == "FINISHED"
    assert run["params"]["model.kind"] == "unet" and run["params"]["train.epochs"] == "2"
    assert run["tags"]["model"] == "unet" and run["tags"]["stage"] == "train"
    for key in ("train_loss", "train_dice_loss", "lr"):
        expected = [(e["epoch"], e[key]) for e in store.history]
        assert [step for step, _ in run["history"][key]] == [step for step, _ in expected]
        assert [value for _, value in run["history"][key]] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [step for step, _ in run["history"]["val_dice_mean"]] == [2]


@pytest.fixture(scope="module")
def mlflow_server(store):
    """``mlflow server`` on the store's database, on a free local port; always stopped afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = store.folder / "server.log"
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store.uri,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=store.folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"{url}/health", proc, log, timeout=180)
        yield url
    finally:
        stop_group(proc)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_mlflow_server_serves_the_experiment_and_its_runs(mlflow_server, store):
    query = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
    experiment = _get_json(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]
    assert experiment["name"] == EXPERIMENT
    found = _post_json(f"{mlflow_server}/api/2.0/mlflow/runs/search",
                       {"experiment_ids": [experiment["experiment_id"]], "filter": "tags.stage = 'train'"})
    runs = {r["info"]["run_id"]: r for r in found["runs"]}
    assert store.run_id in runs
    run = runs[store.run_id]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "train: unet, fold 0"
    metrics = {m["key"]: m for m in run["data"]["metrics"]}
    assert metrics["train_loss"]["step"] == 2
    assert metrics["train_loss"]["value"] == pytest.approx(store.history[-1]["train_loss"], rel=1e-6)
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.kind"] == "unet" and params["data.roi_size"] == "[16, 16, 16]"
    with urllib.request.urlopen(f"{mlflow_server}/", timeout=30) as response:  # the UI itself
        assert response.status == 200 and b"<html" in response.read(2000).lower()


# --- where runs go, and when there are none -------------------------------------------------------------


def _store_files(folder: Path) -> list[Path]:
    return [p for pattern in STORE_FILES for p in folder.rglob(pattern)]


def test_tracking_false_trains_without_mlflow_or_a_store(phantoms, tmp_path, monkeypatch):
    """``tracking: false`` in the YAML: no store anywhere, and MLflow is not even imported."""
    monkeypatch.chdir(tmp_path)  # where the default sqlite:///mlflow.db would go
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow...` now raises ImportError
    raw = tiny_config(phantoms, tmp_path / "run", "unet", **FAST).to_dict()
    raw["tracking"] = False
    path = tmp_path / "no_tracking.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert cfg.tracking.enabled is False
    state = train(cfg)
    assert state.epoch == 2 and state.run_id is None
    assert load_checkpoint(tmp_path / "run" / "last.pt")["run_id"] is None
    assert _store_files(tmp_path) == []


def test_mlflow_tracking_uri_is_used_when_the_config_has_none(phantoms, store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    cfg = tiny_config(phantoms, tmp_path / "run", "unet", train={"epochs": 1, "steps_per_epoch": 1},
                      data={"max_val_cases": 0}, tracking={"enabled": True, "uri": None, "experiment": "from-env"})
    state = train(cfg)
    client = mlflow_client(store.uri)
    run = client.get_run(state.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "from-env"
    assert run.info.status == "FINISHED"
    assert _store_files(tmp_path) == []  # not the default sqlite:///mlflow.db in the working directory


def test_config_uri_wins_over_mlflow_tracking_uri(phantoms, store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    cfg = tiny_config(phantoms, tmp_path / "run", "unet", train={"epochs": 1, "steps_per_epoch": 1},
                      data={"max_val_cases": 0},
                      tracking={"enabled": True, "uri": store.uri, "experiment": "from-config"})
    state = train(cfg)
    assert mlflow_client(store.uri).get_run(state.run_id).info.status == "FINISHED"
    assert not elsewhere.exists() and _store_files(tmp_path) == []


def test_resumed_training_continues_the_same_mlflow_run(phantoms, store, tmp_path, monkeypatch):
    """Interrupted (Ctrl-C) after epoch 1, then resumed: one run, marked KILLED then FINISHED, epochs 1..3."""
    cfg = tiny_config(phantoms, tmp_path / "run", "unet", data={"max_val_cases": 0},
                      train={"epochs": 3, "steps_per_epoch": 1},
                      tracking={"enabled": True, "uri": store.uri, "experiment": "resume"})
    train_epoch = Trainer._train_epoch

    def interrupted_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    run_id = load_checkpoint(tmp_path / "run" / "last.pt")["run_id"]
    client = mlflow_client(store.uri)
    assert client.get_run(run_id).info.status == "KILLED"
    state = train(cfg)
    assert state.run_id == run_id and state.epoch == 3
    experiment = client.get_experiment_by_name("resume")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_epoch"] == "1"
    assert [m.step for m in sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)] == [1, 2, 3]
    assert run.data.params["train.epochs"] == "3"
