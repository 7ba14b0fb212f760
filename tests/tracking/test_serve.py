"""The registered model as a service: it holds the inference checkpoint only (which predicts exactly as ``best.pt``),
training points the alias ``@candidate`` at each new version, its requirements ask PyPI for nothing PyPI lacks, and
``mlflow models serve -m models:/NAME@candidate --env-manager local`` answers a real request with a prediction
folder. Against an embedded sqlite store, as a user's default ``mlflow.db``."""

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from factories import run_cli, tiny_config
from mlflow_processes import free_port, mlflow_client, stop_group, wait_for
from medseg_diff.checkpoint import INFERENCE_KEYS, inference_checkpoint, load_checkpoint, save_checkpoint
from medseg_diff.data.conventions import get_convention
from medseg_diff.data.dataset import case_record
from medseg_diff.data.manifest import load_manifest
from medseg_diff.errors import DataError
from medseg_diff.inference.case import predict_case
from medseg_diff.inference.loading import load_model
from medseg_diff.tracking import MlflowTracker
from medseg_diff.tracking import registry
from medseg_diff.tracking.registry import CANDIDATE, INPUT_COLUMNS, checkpoint_of_model, log_model

NAME = "tiny-diffusion"
EXPERIMENT = "serve"
RESUME_ONLY = ("model", "ema", "optimizer", "lr_schedule", "rng", "history", "step")


@dataclass
class Store:
    uri: str
    folder: Path
    run_id: str
    checkpoint: Path  # the run's best.pt
    manifest: Path


@pytest.fixture(scope="module")
def store(phantoms, tmp_path_factory) -> Store:
    """A tiny diffusion model trained two steps (so that its EMA differs from its raw weights) by
    ``training.run.train`` into an embedded store: its MLflow hook logs and registers ``tiny-diffusion`` 1."""
    from medseg_diff.training.run import train

    folder = tmp_path_factory.mktemp("serve_store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cfg = tiny_config(phantoms, folder / "run", "diffusion", tracking_uri=uri, data={"max_val_cases": 0},
                      train={"epochs": 1, "steps_per_epoch": 2}, infer={"roi_size": [32, 32, 32]},
                      tracking={"experiment": EXPERIMENT, "register_model": NAME, "log_checkpoints": False})
    state = train(cfg)
    assert state.run_id is not None and (folder / "run" / "best.pt").exists()
    return Store(uri, folder, state.run_id, folder / "run" / "best.pt", phantoms)


def _first_case(manifest: Path) -> dict:
    m = load_manifest(manifest)
    return case_record(m, m.cases[0], with_label=False)


# --- what the model holds --------------------------------------------------------------------------------------


def test_the_logged_model_holds_the_inference_weights_and_the_network_spec_only(store):
    path = checkpoint_of_model(f"models:/{NAME}@{CANDIDATE}", store.uri)
    assert path.name == "inference.pt"
    slim, full = load_checkpoint(path), load_checkpoint(store.checkpoint)
    assert set(slim) == {k for k in INFERENCE_KEYS if k in full} | {"inference_only"}
    assert not set(RESUME_ONLY) & set(slim)
    for key in ("network", "config", "spacing_mm", "training_data", "run_id", "epoch", "format", "model_kind"):
        assert slim[key] == full[key], key
    assert slim["run_id"] == store.run_id
    # the weights prediction uses: the EMA, which after two steps is not the raw network
    assert any(not torch.equal(full["model"][k], v) for k, v in full["inference_model"].items())
    for key, value in full["inference_model"].items():
        assert torch.equal(slim["inference_model"][key], value), key
    assert path.stat().st_size < store.checkpoint.stat().st_size / 3  # no optimizer moments, no second copies


def test_the_inference_checkpoint_predicts_exactly_as_best_pt(store, tmp_path):
    slim = inference_checkpoint(store.checkpoint, tmp_path / "inference.pt")
    record = _first_case(store.manifest)
    conv = get_convention(load_manifest(store.manifest).convention)
    full_model, slim_model = load_model(store.checkpoint), load_model(slim)
    assert (slim_model.run_id, slim_model.epoch, slim_model.training) == (
        full_model.run_id, full_model.epoch, full_model.training)  # what a prediction records of its model
    a, b = predict_case(full_model, record, conv), predict_case(slim_model, record, conv)
    assert np.ptp(a.probs) > 0 and a.variance is not None  # a map to compare, not a constant
    for name in ("labels", "probs", "entropy", "variance"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert a.attention.keys() == b.attention.keys()
    for name in a.attention:
        assert a.attention[name].tobytes() == b.attention[name].tobytes(), name


def test_a_file_that_is_no_checkpoint_is_refused_by_name(tmp_path):
    foreign = save_checkpoint({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(DataError, match="not a medseg-diff checkpoint") as caught:
        inference_checkpoint(foreign, tmp_path / "inference.pt")
    assert caught.value.path == str(foreign) and not (tmp_path / "inference.pt").exists()


def test_a_model_logged_with_the_whole_checkpoint_still_loads(store, tmp_path, monkeypatch):
    """Models logged before the inference checkpoint carry ``best.pt`` itself as their ``checkpoint`` artifact."""
    import mlflow

    code = tmp_path / "medseg_model.py"
    code.write_text(registry._MODEL_CODE, encoding="utf-8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    with mlflow.start_run(experiment_id=mlflow_client(store.uri).get_experiment_by_name(EXPERIMENT).experiment_id):
        mlflow.pyfunc.log_model(name="model", python_model=str(code), artifacts={"checkpoint": str(store.checkpoint)},
                                registered_model_name="whole-checkpoint", pip_requirements=["mlflow"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    path = checkpoint_of_model("models:/whole-checkpoint/1", store.uri)
    assert path.name == "best.pt" and path.read_bytes() == store.checkpoint.read_bytes()
    assert load_model(path).net.state_dict().keys() == load_checkpoint(store.checkpoint)["inference_model"].keys()


# --- the alias ---------------------------------------------------------------------------------------------------


def _aliases(client, name: str) -> dict[str, int]:
    return {alias: int(v) for alias, v in client.get_registered_model(name).aliases.items()}


def test_training_points_candidate_at_the_version_it_registers_and_sets_no_champion(store):
    from mlflow.exceptions import MlflowException

    client = mlflow_client(store.uri)
    assert _aliases(client, NAME) == {CANDIDATE: 1}
    assert client.get_model_version_by_alias(NAME, CANDIDATE).run_id == store.run_id
    with pytest.raises(MlflowException):  # champion is a reviewer's to set
        client.get_model_version_by_alias(NAME, "champion")


def test_candidate_moves_to_each_new_version_and_a_refused_alias_keeps_the_version(store, monkeypatch, caplog):
    from mlflow.exceptions import MlflowException

    tracker = MlflowTracker.start(store.uri, EXPERIMENT)
    try:
        assert log_model(tracker, store.checkpoint, "moving") == "models:/moving/1"
        assert log_model(tracker, store.checkpoint, "moving") == "models:/moving/2"
        assert _aliases(tracker.client, "moving") == {CANDIDATE: 2}

        def refuse(*args, **kwargs):
            raise MlflowException("aliases are read-only here")

        monkeypatch.setattr(tracker.client, "set_registered_model_alias", refuse)
        assert log_model(tracker, store.checkpoint, "moving") == "models:/moving/3"  # registered all the same
        assert "could not point the alias @candidate" in caplog.text
        assert _aliases(tracker.client, "moving") == {CANDIDATE: 2}
        tags = tracker.client.get_run(tracker.run_id).data.tags
        assert tags["model_alias_error"] == "MlflowException: aliases are read-only here"
        assert log_model(tracker, store.checkpoint, "no-alias", alias=None) == "models:/no-alias/1"
        assert _aliases(tracker.client, "no-alias") == {}
    finally:
        tracker.end()


def test_predict_takes_the_candidate_alias(store, tmp_path, capsys):
    record = _first_case(store.manifest)
    case = record["case_id"]
    rc, out = run_cli(capsys, "predict", "--checkpoint", f"models:/{NAME}@{CANDIDATE}", "--tracking-uri", store.uri,
                      "--input", Path(record["image"][0]).parent, "--out", tmp_path / "out", "--steps", "1",
                      "--ensemble", "1", "--device", "cpu")
    assert rc == 0, out
    meta = json.loads((tmp_path / "out" / case / "prediction.json").read_text())
    assert meta["model_uri"] == f"models:/{NAME}@{CANDIDATE}" and meta["run_id"] == store.run_id


# --- serving -----------------------------------------------------------------------------------------------------


def test_the_requirements_name_releases_on_pypi_and_not_medseg_diff(store):
    """Each line pins an installed distribution at its public version (no ``+cpu``); medseg-diff is not among them,
    so no environment manager asks PyPI for it."""
    import mlflow

    model = checkpoint_of_model(f"models:/{NAME}/1", store.uri).parents[1]  # MODEL/artifacts/inference.pt
    lines = [line.strip() for line in (model / "requirements.txt").read_text().splitlines() if line.strip()]
    pins = dict(line.split("==", 1) for line in lines)
    assert "medseg-diff" not in pins and "medseg_diff" not in pins
    assert {"mlflow", "torch", "monai", "nibabel", "pandas"} <= set(pins)
    for name, pinned in pins.items():
        assert pinned == version(name).split("+")[0], name
    assert pins["mlflow"] == mlflow.__version__


class _Uninstalled:
    """A meta path finder before all others for which ``medseg_diff`` is not installed."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname == "medseg_diff":
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def test_a_missing_package_is_named_when_the_model_is_loaded(monkeypatch):
    """What a virtualenv built from ``requirements.txt`` would meet: the model's code says what to install."""
    for name in [m for m in sys.modules if m == "medseg_diff" or m.startswith("medseg_diff.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Uninstalled(), *sys.meta_path])
    with pytest.raises(ImportError, match="medseg-diff, which is not installed here and not on PyPI.*--env-manager"):
        exec(compile(registry._MODEL_CODE, "medseg_model.py", "exec"), {})


def _serving_path() -> str:
    """``PATH`` with this interpreter's scripts first: ``mlflow models serve`` runs ``uvicorn`` from ``PATH``."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


@pytest.mark.timeout(120)
def test_mlflow_models_serve_predicts_a_case_over_http(store, tmp_path):
    for module in ("uvicorn", "fastapi"):
        pytest.importorskip(module, reason=f"mlflow models serve needs {module} (pip install 'mlflow[genai]' or "
                                           f"{module} itself)")
    if shutil.which("uvicorn", path=_serving_path()) is None:
        pytest.skip("no uvicorn executable beside this Python: mlflow models serve starts it from PATH")
    port, log = free_port(), tmp_path / "serve.log"
    env = os.environ | {"MLFLOW_TRACKING_URI": store.uri, "PATH": _serving_path()}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@{CANDIDATE}",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/ping", proc, log, timeout=90)
        record = _first_case(store.manifest)
        case = record["case_id"]
        row = [case, *record["image"], "brats2021", str(tmp_path / "served")]
        body = {"dataframe_split": {"columns": list(INPUT_COLUMNS), "data": [row]},
                "params": {"sample_steps": 1, "ensemble": 1}}
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        stop_group(proc)
    [prediction] = answer["predictions"]
    seg_path = tmp_path / "served" / case / f"{case}_seg.nii.gz"
    assert prediction["case_id"] == case and prediction["seg_path"] == str(seg_path) and prediction["seconds"] > 0
    meta = json.loads((seg_path.parent / "prediction.json").read_text())
    assert meta["run_id"] == store.run_id and meta["convention"] == "brats2021"
    assert meta["provenance"]["sample_steps"] == 1 and meta["provenance"]["ensemble"] == 1  # the request's params
    # the served inference checkpoint predicts what best.pt predicts in this process
    expected = predict_case(load_model(store.checkpoint, sample_steps=1, ensemble=1), record,
                            get_convention("brats2021"))
    served = nib.load(seg_path)
    np.testing.assert_array_equal(np.asarray(served.dataobj), expected.labels)
    np.testing.assert_array_equal(served.affine, nib.load(record["image"][0]).affine)
