"""The trained model in the MLflow Model Registry, as its users meet it: a training run against a real ``mlflow
server`` registers a pyfunc that predicts a whole case when loaded back through the server, ``load_model`` takes
the registered weights unchanged, a wrong URI or an absent server is a ``DataError`` naming it, and a store moved to
another folder still resolves (served: ``mlflow-artifacts:`` URIs; embedded sqlite: relocated on open)."""

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from factories import tiny_config
from mlflow_processes import free_port, mlflow_client, stop_group, wait_for
from medseg_diff.checkpoint import load_checkpoint
from medseg_diff.data.dataset import case_record
from medseg_diff.data.manifest import load_manifest
from medseg_diff.errors import DataError
from medseg_diff.tracking import MlflowTracker, NullTracker, compare_runs_url, runs_table_url
from medseg_diff.tracking import registry
from medseg_diff.tracking.registry import INPUT_COLUMNS, checkpoint_of_model, log_model

NAME = "tiny-unet"  # tracking.register_model of the training run
EXPERIMENT = "registry"
ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "storage_location"))


# --- a real mlflow server on loopback ------------------------------------------------------------------------


class Server:
    """``mlflow server`` on a sqlite database in ``folder``, artifacts served from ``folder/mlartifacts``."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder.parent / f"server-{self.port}.log"
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                 "--artifacts-destination", str(folder / "mlartifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 180) -> str:
        wait_for(f"{self.url}/health", self.proc, self.log, timeout)
        return self.url

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture(scope="module")
def booting_server(tmp_path_factory):
    """The server process, started before the phantoms are made so that both happen at once."""
    folder = tmp_path_factory.mktemp("served") / "store"
    folder.mkdir()
    server = Server(folder)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Trained:
    url: str
    store: Path
    run_id: str
    checkpoint: Path
    manifest: Path


@pytest.fixture(scope="module")
def trained(booting_server, phantoms, tmp_path_factory) -> Trained:
    """A tiny U-Net trained for one step through ``medseg_diff.training.run.train`` against the server: its
    MLflow hook logs the pyfunc and registers it as ``tiny-unet`` version 1."""
    from medseg_diff.training.run import train

    url = booting_server.wait()
    out = tmp_path_factory.mktemp("registry_model") / "unet"
    cfg = tiny_config(phantoms, out, "unet", tracking_uri=url, data={"max_val_cases": 0},
                      train={"epochs": 1, "steps_per_epoch": 1},
                      tracking={"experiment": EXPERIMENT, "register_model": NAME, "log_checkpoints": False})
    env = os.environ.get("MLFLOW_TRACKING_URI")
    state = train(cfg)
    assert state.run_id is not None and (out / "best.pt").exists()
    assert os.environ.get("MLFLOW_TRACKING_URI") == env  # logging the model changed no process-wide setting
    return Trained(url, booting_server.folder, state.run_id, out / "best.pt", phantoms)


def _case_frame(manifest: Path, out_dir: Path) -> tuple[pd.DataFrame, dict]:
    m = load_manifest(manifest)
    record = case_record(m, m.cases[0], with_label=False)
    t1, t1ce, t2, flair = record["image"]
    frame = pd.DataFrame([{"case_id": record["case_id"], "t1": t1, "t1ce": t1ce, "t2": t2, "flair": flair,
                           "convention": m.convention, "out_dir": str(out_dir)}])
    return frame, record


# --- registration -----------------------------------------------------------------------------------------------


def test_training_registers_a_pyfunc_with_the_case_signature(trained, monkeypatch):
    import mlflow

    client = mlflow_client(trained.url)
    version = client.get_model_version(NAME, "1")
    assert version.run_id == trained.run_id
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"  # logging the model left the run's end to the hook
    assert "model_logging_error" not in run.data.tags
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.url)
    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    assert info.signature.inputs.input_names() == list(INPUT_COLUMNS)
    assert [c.type.name for c in info.signature.inputs.inputs] == ["string"] * len(INPUT_COLUMNS)
    assert info.signature.outputs.input_names() == ["case_id", "seg_path", "seconds"]
    assert [p.name for p in info.signature.params.params] == ["sample_steps", "ensemble"]
    pyfunc = info.flavors["python_function"]
    assert pyfunc["artifacts"]["checkpoint"]["path"] == "artifacts/inference.pt"  # best.pt less what resumes
    assert pyfunc["model_code_path"].endswith("medseg_model.py")  # models-from-code: nothing unpickled
    # the logged model sits in the run's experiment, under the server's movable artifact root
    logged = client.get_logged_model(info.model_id)
    assert logged.source_run_id == trained.run_id and logged.experiment_id == run.info.experiment_id
    assert logged.artifact_location.startswith(f"mlflow-artifacts:/{run.info.experiment_id}/models/")
    assert logged.model_type == "unet"


def test_the_registered_pyfunc_predicts_a_case_through_the_server(trained, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.url)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    frame, record = _case_frame(trained.manifest, tmp_path / "predictions")
    result = model.predict(frame)
    case = record["case_id"]
    assert list(result.columns) == ["case_id", "seg_path", "seconds"]
    assert result["case_id"].tolist() == [case]
    seg_path = Path(result["seg_path"][0])
    assert seg_path == tmp_path / "predictions" / case / f"{case}_seg.nii.gz"
    seg, t1 = nib.load(seg_path), nib.load(record["image"][0])
    assert seg.shape == t1.shape
    np.testing.assert_array_equal(seg.affine, t1.affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 4}  # BraTS 2021 labels
    assert result["seconds"][0] > 0
    meta = json.loads((seg_path.parent / "prediction.json").read_text())
    assert meta["model_kind"] == "unet" and meta["run_id"] == trained.run_id and meta["convention"] == "brats2021"
    with pytest.raises(Exception, match="out_dir"):  # MLflow enforces the signature
        model.predict(frame.drop(columns=["out_dir"]))


# --- fetching the checkpoint back ----------------------------------------------------------------------------


def _assert_same_weights(net: torch.nn.Module, checkpoint: Path) -> None:
    expected = load_checkpoint(checkpoint)["inference_model"]
    state = net.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key].cpu(), value), key


def _assert_inference_checkpoint_of(fetched: Path, checkpoint: Path) -> None:
    """``fetched`` is the inference checkpoint of ``checkpoint``: its weights and config, nothing to resume with."""
    slim, full = load_checkpoint(fetched), load_checkpoint(checkpoint)
    assert slim["inference_only"] is True and "optimizer" not in slim and "model" not in slim
    assert slim["config"] == full["config"] and slim["run_id"] == full["run_id"]
    assert set(slim["inference_model"]) == set(full["inference_model"])
    for key, value in full["inference_model"].items():
        assert torch.equal(slim["inference_model"][key], value), key


def test_load_model_takes_the_registered_weights_unchanged(trained):
    from medseg_diff.stages.models import load_model

    uri = f"models:/{NAME}/1"
    model = load_model(uri, "cpu", tracking_uri=trained.url)
    assert model.source == uri and model.kind == "unet" and model.run_id == trained.run_id
    _assert_same_weights(model.net, trained.checkpoint)
    _assert_inference_checkpoint_of(model.checkpoint, trained.checkpoint)
    # the aliases (training's candidate, a reviewer's champion), the run's model and the latest version are the
    # same logged model: one cached copy
    mlflow_client(trained.url).set_registered_model_alias(NAME, "champion", "1")
    for other in (f"models:/{NAME}@candidate", f"models:/{NAME}@champion", f"runs:/{trained.run_id}/model",
                  f"models:/{NAME}/latest"):
        assert checkpoint_of_model(other, trained.url) == model.checkpoint, other


@pytest.mark.parametrize("uri", [f"models:/{NAME}/7", "models:/no-such-model/1", f"models:/{NAME}@nobody",
                                 f"runs:/{'0' * 32}/model"])
def test_an_unknown_model_or_version_is_a_data_error_naming_it(trained, uri):
    from medseg_diff.stages.models import load_model

    with pytest.raises(DataError) as caught:
        load_model(uri, "cpu", tracking_uri=trained.url)
    assert caught.value.path == uri
    assert "not found" in caught.value.problem and trained.url in caught.value.problem


def test_an_absent_server_is_a_service_error_at_once():
    from medseg_diff.errors import ServiceError

    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ServiceError, match="does not answer") as caught:  # a runtime fault (status 1), not bad input
        checkpoint_of_model(f"models:/{NAME}/1", url)
    assert str(caught.value).startswith(f"models:/{NAME}/1: ") and url in str(caught.value)
    assert time.monotonic() - start < 10  # not MLflow's minutes of retries


def test_without_a_run_nothing_is_logged(trained):
    assert log_model(NullTracker(), trained.checkpoint, NAME) == ""


# --- moving a store --------------------------------------------------------------------------------------------


def _artifact_locations(db: Path) -> list[str]:
    con = sqlite3.connect(str(db))
    try:
        return [v for table, column in ARTIFACT_COLUMNS for (v,) in con.execute(f"SELECT {column} FROM {table}") if v]
    finally:
        con.close()


def test_a_served_store_moves_as_it_is(trained, tmp_path):
    """Its database holds ``mlflow-artifacts:`` URIs only: a copy served from elsewhere, with the original's
    artifacts out of the way, gives the same checkpoint."""
    locations = _artifact_locations(trained.store / "mlflow.db")
    assert locations and all(v.startswith("mlflow-artifacts:/") for v in locations), locations
    moved = tmp_path / "moved"
    shutil.copytree(trained.store, moved)
    away = trained.store.with_name("away")
    server = Server(moved)
    (trained.store / "mlartifacts").rename(away)
    try:
        path = checkpoint_of_model(f"models:/{NAME}/1", server.wait())
        _assert_inference_checkpoint_of(path, trained.checkpoint)
    finally:
        server.stop()
        away.rename(trained.store / "mlartifacts")


def _refuse(*args, **kwargs):
    from mlflow.exceptions import MlflowException

    raise MlflowException("the store is full")


def test_an_embedded_store_is_relocated_when_moved(trained, tmp_path, monkeypatch):
    """``sqlite:///`` with no server: logged without an active run or a lasting change of the process's tracking
    URI, then the folder moved; the model, the run's artifacts and the resumed run are found under the new folder."""
    import mlflow

    before = tmp_path / "before"
    before.mkdir()
    tracker = MlflowTracker.start(f"sqlite:///{before / 'mlflow.db'}", "embedded")
    global_uri = mlflow.get_tracking_uri()
    assert log_model(tracker, trained.checkpoint, "embedded-unet") == "models:/embedded-unet/1"
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() == global_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///somewhere-else.db")
    assert log_model(tracker, trained.checkpoint, None) == f"runs:/{tracker.run_id}/model"
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///somewhere-else.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert mlflow.active_run() is None
    assert tracker.client.get_run(tracker.run_id).info.status == "RUNNING"  # its end is the caller's
    with pytest.MonkeyPatch.context() as patch:  # a store that refuses: warned and tagged, not raised
        patch.setattr(registry, "_log_model", _refuse)
        assert log_model(tracker, trained.checkpoint, "embedded-unet") == ""
    tags = tracker.client.get_run(tracker.run_id).data.tags
    assert tags["model_logging_error"] == "MlflowException: the store is full"
    tracker.log_artifact(trained.checkpoint, "checkpoints")
    tracker.end()
    assert all(before.as_uri() in v for v in _artifact_locations(before / "mlflow.db") if "mlartifacts" in v)

    after = tmp_path / "after"
    shutil.move(before, after)
    uri = f"sqlite:///{after / 'mlflow.db'}"
    path = checkpoint_of_model("models:/embedded-unet/1", uri)  # relocates the store first
    _assert_inference_checkpoint_of(path, trained.checkpoint)
    locations = [v for v in _artifact_locations(after / "mlflow.db") if "mlartifacts" in v]
    assert locations and all(v.startswith((after / "mlartifacts").as_uri()) for v in locations), locations
    resumed = MlflowTracker.start(uri, "embedded", run_id=tracker.run_id)
    assert resumed.run_id == tracker.run_id
    fetched = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{tracker.run_id}/checkpoints/best.pt",
                                                  dst_path=str(tmp_path / "fetched"), tracking_uri=uri)
    assert Path(fetched).read_bytes() == trained.checkpoint.read_bytes()
    resumed.end()


# --- the UI ----------------------------------------------------------------------------------------------------


def test_runs_table_url_is_a_route_of_the_served_ui(trained):
    run = mlflow_client(trained.url).get_run(trained.run_id)
    url = runs_table_url(trained.url + "/", run.info.experiment_id)
    assert url == f"{trained.url}/#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning"
    with urllib.request.urlopen(f"{trained.url}/", timeout=30) as response:
        html = response.read().decode()
    bundle = re.search(r'src="\.?/?([^"]*/main\.[0-9a-f]+\.js)"', html).group(1)
    with urllib.request.urlopen(f"{trained.url}/{bundle}", timeout=30) as response:
        js = response.read().decode()
    assert '"/experiments/:experimentId/runs"' in js  # the runs tab's route
    # newer UIs open on a GenAI view that ?workflowType=machine_learning switches off; older ones (the floor's, e.g.
    # MLflow 3.11) have no such switch and ignore the query, opening the runs table at the route asserted above
    assert ('"workflowType"' not in js) or 'MACHINE_LEARNING="machine_learning"' in js
    # the Compare page's route and its query, as the UI itself builds them (getCompareRunPageRoute)
    assert '"/compare-runs"' in js and "?runs=${JSON.stringify(e)}&experiments=${JSON.stringify(t)}" in js
    compare = compare_runs_url(trained.url, ["r1", "r2"], [run.info.experiment_id, run.info.experiment_id])
    query = urllib.parse.parse_qs(compare.split("#/compare-runs?", 1)[1])
    assert compare.startswith(f"{trained.url}/#/compare-runs?")
    assert json.loads(query["runs"][0]) == ["r1", "r2"]
    assert json.loads(query["experiments"][0]) == [run.info.experiment_id]


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium (apt install chromium)")
@pytest.mark.timeout(240)
def test_the_review_addresses_open_the_comparison_in_the_served_ui(trained, tmp_path):
    """README's review steps in a real browser against the installed MLflow UI: the *Compare* address that evaluate
    prints shows both models' runs and their metrics; the evaluation run's page shows the comparison as its
    description."""
    from browser import DevTools

    from medseg_diff.data.manifest import load_manifest
    from medseg_diff.stages.evaluate import evaluate
    from medseg_diff.stages.options import Scoring, Tracking

    manifest = load_manifest(trained.manifest)
    folders = {}
    for name, shift in (("toolA", 0), ("toolB", 1)):  # two "tools": the labels, and the labels shifted by a voxel
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for case in manifest.cases:
            img = nib.load(str(manifest.path_of(case.label)))
            seg = np.roll(np.asarray(img.dataobj), shift, axis=0)
            nib.save(nib.Nifti1Image(seg, img.affine), str(folders[name] / f"{case.id}.nii.gz"))
    report = evaluate(trained.manifest, tmp_path / "eval", predictions=folders,
                      scoring=Scoring(subset="all", n_boot=200, export_cases=0),
                      tracking=Tracking(uri=trained.url, experiment="review"))
    hint = report.mlflow_hint()
    compare = hint.split("compare the models: ", 1)[1].strip()
    assert compare == compare_runs_url(trained.url, list(report.model_run_ids.values()), [report.experiment_id])
    run_page = f"{trained.url}/#/experiments/{report.experiment_id}/runs/{report.run_id}"

    def page_text(browser, url, expected, timeout=60.0):
        browser.call("Page.navigate", url=url)
        deadline, text = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            text = browser.js("document.body ? document.body.innerText : ''") or ""
            if all(e in text for e in expected):
                return text
            time.sleep(0.5)
        pytest.fail(f"{url} never showed {expected}; it showed:\n{text[:3000]}")

    browser = DevTools(tmp_path / "profile", 1600, 1200)
    try:
        page_text(browser, compare, ["toolA", "toolB", "dice_WT_case_mean"])
        page_text(browser, run_page, ["evaluate: toolA vs toolB", "paired comparison"])
    finally:
        browser.close()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
