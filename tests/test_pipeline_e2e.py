"""The end-to-end CPU run on tiny phantoms, through the command line, as a user runs it:

train both models from YAML configs (the baseline in another process, ``python pipelines/train.py``)
→ ``evaluate`` both on the held-out phantoms → ``predict`` → ``export``; then check every hand-off on
disk and what MLflow holds. The stages run once (module fixture); each test checks one product promise.
"""

import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from factories import tiny_config
from medseg_diff.cli import main
from medseg_diff.data.conventions import REGIONS
from medseg_diff.data.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
MODELS = ("diffusion", "unet")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Pipeline:
    work: Path
    cwd: Path  # the working directory of every stage: must stay empty (no default mlflow.db)
    uri: str
    manifest: Path
    test_cases: list[str]
    checkpoints: dict[str, Path]

    @property
    def eval_dir(self) -> Path:
        return self.work / "eval"


def _write_config(manifest: Path, work: Path, kind: str, uri: str) -> Path:
    cfg = tiny_config(manifest, work / "runs" / kind, kind, tracking_uri=uri,
                      data={"max_val_cases": 1}, train={"epochs": 2, "steps_per_epoch": 1, "val_every": 2},
                      infer={"roi_size": [48, 48, 32], "sw_batch_size": 1})
    path = work / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.fixture(scope="module")
def pipeline(phantoms, tmp_path_factory) -> Pipeline:
    work = tmp_path_factory.mktemp("e2e")
    cwd = work / "cwd"
    cwd.mkdir()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    configs = {kind: _write_config(phantoms, work, kind, uri) for kind in MODELS}
    checkpoints = {kind: work / "runs" / kind / "best.pt" for kind in MODELS}
    fast = ["--steps", "1", "--ensemble", "2", "--device", "cpu"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # 1. train: the diffusion model in this process, the baseline through the pipeline script
        assert main(["train", "--config", str(configs["diffusion"])]) == 0
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"OMP_NUM_THREADS": "2"}
        proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "train.py"), "--config", str(configs["unet"])],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "finished 2 epochs" in proc.stdout
        # 2. evaluate both on the held-out cases, clinician overlays for the first case
        assert main(["evaluate", "--manifest", str(phantoms), "--out", str(work / "eval"), "--export-cases", "1",
                     "--tracking-uri", uri, *fast,
                     *[arg for kind in MODELS for arg in ("--model", f"{kind}={checkpoints[kind]}")]]) == 0
        # 3. predict the held-out cases, then export overlays from the prediction folders alone
        assert main(["predict", "--checkpoint", str(checkpoints["diffusion"]), "--input", str(phantoms),
                     "--subset", "test", "--out", str(work / "predictions"), *fast]) == 0
        assert main(["export", "--predictions", str(work / "predictions"), "--out", str(work / "overlays")]) == 0
    _, _, test = load_manifest(phantoms).split(0)
    return Pipeline(work, cwd, uri, phantoms, sorted(c.id for c in test), checkpoints)


# --- evaluation artifacts -----------------------------------------------------------------------------


def test_per_case_csv_has_every_model_case_and_region(pipeline):
    with open(pipeline.eval_dir / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [(r["model"], r["case"], r["region"]) for r in rows]
    assert sorted(keys) == sorted((m, c, r) for m in MODELS for c in pipeline.test_cases for r in REGIONS)
    for row in rows:
        dice, hd95 = float(row["dice"]), float(row["hd95_mm"])
        assert math.isfinite(dice) and 0.0 <= dice <= 1.0, row
        assert math.isfinite(hd95) and hd95 >= 0.0, row
        assert float(row["seconds"]) > 0


def test_summary_has_the_paired_comparison_with_ci_and_wilcoxon_p(pipeline):
    summary = (pipeline.eval_dir / "summary.md").read_text(encoding="utf-8")
    comparison = json.loads((pipeline.eval_dir / "comparison.json").read_text(encoding="utf-8"))["diffusion_vs_unet"]["dice"]
    assert "## diffusion vs unet: Dice" in summary and "## diffusion vs unet: HD95 (mm)" in summary
    dice_section = summary.split("## diffusion vs unet: Dice")[1].split("## ")[0]
    header = next(line for line in dice_section.splitlines() if line.startswith("| region"))
    assert "95% CI" in header and "Wilcoxon p" in header
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in dice_section.splitlines() if re.match(r"\| (TC|WT|ET|mean) \|", line)}
    assert set(cells) == {*REGIONS, "mean"} == set(comparison)
    for region, row in cells.items():
        n, diff, ci, p = int(row[0]), float(row[3]), row[4], row[5]
        low, high = (float(x) for x in re.fullmatch(r"\[(\S+), (\S+)\]", ci).groups())
        assert n == len(pipeline.test_cases) and low - 1e-3 <= diff <= high + 1e-3, (region, row)
        assert diff == pytest.approx(comparison[region]["mean_diff"], abs=1e-3)
        wilcoxon_p = comparison[region]["wilcoxon_p"]
        if math.isfinite(wilcoxon_p):
            assert 0.0 <= wilcoxon_p <= 1.0 and p == f"{wilcoxon_p:.4f}", (region, row)
        else:  # undefined (e.g. every difference zero after dropping ties): said so, with the reason
            assert p == "n/a" and comparison[region]["note"], (region, row)


def test_box_plots_and_calibration_are_png(pipeline):
    for name in ("box_dice.png", "box_hd95.png", "calibration.png"):
        data = (pipeline.eval_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_evaluation_exports_overlays_for_the_first_case_of_each_model(pipeline):
    first = pipeline.test_cases[0]
    for model in MODELS:
        assert sorted(p.name for p in (pipeline.eval_dir / "overlays" / model).iterdir()) == [first]
        folder = pipeline.eval_dir / "overlays" / model / first
        assert (folder / f"{first}_montage.png").read_bytes().startswith(PNG_MAGIC)
        html = (folder / "report.html").read_text(encoding="utf-8")
        assert first in html and model in html and "data:image/png;base64," in html
        assert "Dice" in html  # the phantoms have ground truth
        assert not re.search(r"""(src|href)=["']?(https?:|file:|/)""", html)  # self-contained


def test_export_writes_report_and_montage_per_predicted_case(pipeline):
    from mlflow.tracking import MlflowClient

    run_id = MlflowClient(pipeline.uri).search_runs(
        [_experiment_id(pipeline)], "tags.stage = 'train' and tags.model = 'diffusion'")[0].info.run_id
    assert sorted(p.name for p in (pipeline.work / "overlays").iterdir()) == pipeline.test_cases
    for case in pipeline.test_cases:
        folder = pipeline.work / "overlays" / case
        assert (folder / f"{case}_montage.png").read_bytes().startswith(PNG_MAGIC)
        html = (folder / "report.html").read_text(encoding="utf-8")
        assert case in html and run_id in html and "research use" in html.lower()


# --- predictions --------------------------------------------------------------------------------------


def _prediction_folders(pipeline) -> list[Path]:
    folders = [pipeline.work / "predictions" / case for case in pipeline.test_cases]
    folders += [pipeline.eval_dir / "predictions" / model / case for model in MODELS for case in pipeline.test_cases]
    return folders


def test_predictions_are_brats2021_labels_on_the_input_grid(pipeline):
    manifest = load_manifest(pipeline.manifest)
    inputs = {c.id: manifest.path_of(c.images["t1"]) for c in manifest.cases}
    for folder in _prediction_folders(pipeline):
        case = folder.name
        ref = nib.load(inputs[case])
        seg = nib.load(folder / f"{case}_seg.nii.gz")
        assert seg.shape == ref.shape and seg.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(seg.affine, ref.affine)
        assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2, 4}, folder
        probs = nib.load(folder / f"{case}_probabilities.nii.gz")
        assert probs.shape == ref.shape + (3,)
        np.testing.assert_array_equal(probs.affine, ref.affine)
        meta = json.loads((folder / "prediction.json").read_text(encoding="utf-8"))
        assert meta["convention"] == "brats2021" and meta["case_id"] == case


# --- MLflow -------------------------------------------------------------------------------------------


def _experiment_id(pipeline) -> str:
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(pipeline.uri).get_experiment_by_name("tiny-phantoms")  # the data set's name
    assert experiment is not None
    return experiment.experiment_id


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_mlflow_training_runs_have_config_provenance_and_epoch_metrics(pipeline):
    from mlflow.tracking import MlflowClient

    from medseg_diff.checkpoint import load_checkpoint

    client = MlflowClient(pipeline.uri)
    runs = client.search_runs([_experiment_id(pipeline)], "tags.stage = 'train'")
    assert sorted(r.data.tags["model"] for r in runs) == sorted(MODELS)
    manifest_hash = load_manifest(pipeline.manifest).content_hash()
    for run in runs:
        kind = run.data.tags["model"]
        assert run.info.status == "FINISHED"
        assert load_checkpoint(pipeline.checkpoints[kind])["run_id"] == run.info.run_id
        cfg = yaml.safe_load((pipeline.work / f"{kind}.yaml").read_text(encoding="utf-8"))
        params = run.data.params
        assert params["model.kind"] == kind and params["train.epochs"] == "2"
        assert params["data.roi_size"] == "[16, 16, 16]" and params["data.manifest"] == cfg["data"]["manifest"]
        mine = {f"{section}.{key}" for section, values in cfg.items() for key in values} - {
            "model.unet", "model.denoiser", "model.attention_unet"}
        assert {k for k in mine if not k.startswith(("model.denoiser", "diffusion") if kind == "unet" else
                                                   ("model.unet",))} <= set(params)
        # a training run logs only its own model's settings
        own, foreign = (("model.unet.strides", "model.denoiser.channels") if kind == "unet" else
                        ("model.denoiser.channels", "model.unet.strides"))
        assert own in params and foreign not in params
        assert not any(k.startswith(("model.denoiser.", "diffusion.") if kind == "unet" else "model.unet.")
                       for k in params)
        tags = run.data.tags
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"]), tags  # MLflow's Source column
        assert tags["manifest_hash"] == manifest_hash
        # the manifest, with its split, is the run's dataset input (digest over data and split) and an artifact
        inputs = run.inputs.dataset_inputs
        assert len(inputs) == 1 and manifest_hash.startswith(inputs[0].dataset.digest)
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
        assert json.loads(inputs[0].dataset.profile)["test_cases"] == len(pipeline.test_cases)
        assert "manifest/manifest.json" in _artifacts(client, run.info.run_id)
        assert tags["device"].startswith("cpu")
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == [1, 2] and all(math.isfinite(m.value) for m in history)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice_mean")] == [2]
        assert {"checkpoints/best.pt", "checkpoints/last.pt"} <= _artifacts(client, run.info.run_id)


def test_mlflow_evaluation_run_nests_one_child_run_per_model(pipeline):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(pipeline.uri)
    experiment = _experiment_id(pipeline)
    evaluations = [r for r in client.search_runs([experiment], "tags.stage = 'evaluate'")
                   if "mlflow.parentRunId" not in r.data.tags]
    assert len(evaluations) == 1
    parent = evaluations[0]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(MODELS)
    train_runs = {r.data.tags["model"]: r.info.run_id for r in client.search_runs([experiment], "tags.stage = 'train'")}
    assert parent.data.params["subset"] == "test" and parent.data.params["n_boot"] == "10000"
    assert parent.data.params["sample_steps"] == "1"
    assert parent.inputs.dataset_inputs[0].dataset.digest == load_manifest(pipeline.manifest).content_hash()[:36]
    rows = list(csv.DictReader((pipeline.eval_dir / "per_case.csv").open(encoding="utf-8")))
    for child in children:
        model = child.info.run_name
        assert child.data.tags["train_run_id"] == train_runs[model] and child.info.status == "FINISHED"
        for tag in ("mlflow.source.git.commit", "manifest_hash", "dataset"):  # the same provenance as the parent
            assert child.data.tags[tag] == parent.data.tags[tag]
        assert child.data.params["checkpoint"] == str(pipeline.checkpoints[model])
        metrics = child.data.metrics
        assert metrics["cases"] == len(pipeline.test_cases)
        # each name has one definition (METRIC_NAMES): recompute a few from per_case.csv
        for region in REGIONS:
            values = [float(r["dice"]) for r in rows if r["model"] == model and r["region"] == region]
            assert metrics[f"dice_{region}_case_mean"] == pytest.approx(sum(values) / len(values))
            assert metrics[f"dice_{region}_case_median"] == pytest.approx(statistics.median(values))
            assert 0.0 <= metrics[f"lesion_dice_{region}_case_mean"] <= 1.0
        ece = [float(r["ece"]) for r in rows if r["model"] == model and r["region"] == "TC"]
        assert metrics["ece_case_mean"] == pytest.approx(sum(ece) / len(ece))
        assert "ece_pooled" in metrics and "ece_mean" not in metrics and "dice_mean" not in metrics
        memory = [float(r["peak_memory_mb"]) for r in rows if r["model"] == model]
        assert metrics["peak_memory_mb_max"] == pytest.approx(max(memory))
    for metric in ("dice", "hd95_mm", "lesion_dice"):
        for region in (*REGIONS, "regionavg"):
            for stat in ("mean_diff", "ci_low", "ci_high", "wilcoxon_p"):
                assert f"diffusion_vs_unet.{metric}_{region}.{stat}" in parent.data.metrics
    artifacts = _artifacts(client, parent.info.run_id)
    assert {"per_case.csv", "summary.md", "comparison.json", "box_dice.png", "box_hd95.png",
            "calibration.png"} <= artifacts
    first = pipeline.test_cases[0]
    assert {f"overlays/{m}/{first}/report.html" for m in MODELS} <= artifacts
    assert f"overlays/diffusion/{first}/{first}_montage.png" in artifacts


def test_mlflow_evaluation_run_reads_as_the_comparison(pipeline):
    """A reviewer sees what the run compares from its name, its description (the rounded comparison.md), a table
    of the paired comparison, and metrics a person can read; training runs say they are training runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(pipeline.uri)
    experiment = _experiment_id(pipeline)
    parent = next(r for r in client.search_runs([experiment], "tags.stage = 'evaluate'")
                  if "mlflow.parentRunId" not in r.data.tags)
    n = len(pipeline.test_cases)
    assert parent.info.run_name == f"evaluate: {' vs '.join(MODELS)}, test, {n} cases"
    assert sorted(r.info.run_name for r in client.search_runs([experiment], "tags.stage = 'train'")) == \
        [f"train: {m}, fold 0" for m in sorted(MODELS)]
    markdown = (pipeline.eval_dir / "comparison.md").read_text(encoding="utf-8")
    assert markdown.startswith(f"# diffusion vs unet: paired comparison on {n} cases")
    assert parent.data.tags["mlflow.note.content"] == markdown  # the run page's description
    comparison = json.loads((pipeline.eval_dir / "comparison.json").read_text(encoding="utf-8"))["diffusion_vs_unet"]
    downloaded = client.download_artifacts(parent.info.run_id, "comparison_table.json", str(pipeline.work))
    table = json.loads(Path(downloaded).read_text(encoding="utf-8"))
    records = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(records) == 3 * 4  # dice, hd95_mm, lesion_dice × TC, WT, ET, per-case mean
    for record in records:
        full = comparison[record["metric"]]["mean" if record["region"] == "regionavg" else record["region"]]
        assert record["comparison"] == "diffusion vs unet" and record["n"] == full["n"] == n
        for stat in ("mean_diff", "ci_low", "ci_high"):
            logged = parent.data.metrics[f"diffusion_vs_unet.{record['metric']}_{record['region']}.{stat}"]
            if math.isfinite(full[stat]):
                assert record[stat] == logged == round(full[stat], 4)  # rounded, and the same in both places
        if math.isfinite(full["wilcoxon_p"]):
            assert record["wilcoxon_p"] == float(f"{full['wilcoxon_p']:.3g}")
    assert "comparison.md" in _artifacts(client, parent.info.run_id)


def test_every_stage_used_the_configured_store_not_the_working_directory(pipeline):
    assert list(pipeline.cwd.iterdir()) == []  # no default sqlite:///mlflow.db, no mlruns/ or mlartifacts/ here
    assert (pipeline.work / "mlartifacts").is_dir()  # artifacts beside the configured database
