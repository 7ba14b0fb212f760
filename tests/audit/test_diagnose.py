"""``medseg-diff diagnose`` end to end on tiny checkpoints: audit.json and audit.md with every question, the default
run is the product's own prediction, a U-Net gets only the questions that apply, MLflow gets the run, and a bad
checkpoint is one line naming the file (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from factories import tiny_config, write_case
from medseg_diff.audit.cases import case_records, load_case
from medseg_diff.audit.probe import DiffusionProbe
from medseg_diff.audit.verdicts import QUESTIONS
from medseg_diff.audit.windows import Windowing
from medseg_diff.cli import main
from medseg_diff.data.manifest import build_manifest, write_manifest

FAST = ["--device", "cpu", "--steps-grid", "1,2", "--ensemble-grid", "2", "--no-tracking"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny diffusion model (sampler K = 1 x N = 2) and U-Net trained for one step on four 16³ cases (two held
    out), and the manifest."""
    from medseg_diff.training.run import train

    root = tmp_path_factory.mktemp("diagnose")
    for i in range(4):
        write_case(root / "data", f"C{i}", seed=i)
    manifest = write_manifest(build_manifest(root / "data", folds=2, test_fraction=0.5, seed=0),
                              root / "data" / "manifest.json")
    for kind in ("diffusion", "unet"):
        train(tiny_config(manifest, root / kind, kind, train={"epochs": 1, "steps_per_epoch": 1},
                          data={"max_val_cases": 0}, diffusion={"sample_steps": 1, "ensemble": 2}))
    return {"diffusion": root / "diffusion" / "best.pt", "unet": root / "unet" / "best.pt", "manifest": manifest}


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["diagnose", *[str(a) for a in args]])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_diagnose_writes_every_question_for_a_diffusion_model(models, tmp_path, capsys):
    out = tmp_path / "audit"
    rc, stdout, err = _run(capsys, "--checkpoint", models["diffusion"], "--manifest", models["manifest"], "--out",
                           out, "--reference", models["unet"], *FAST)
    assert rc == 0, err
    result = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    markdown = (out / "audit.md").read_text(encoding="utf-8")
    assert result["settings"]["model_kind"] == "diffusion" and result["settings"]["cases"] == 2
    assert result["settings"]["prior_source"] == "head" and result["settings"]["reference_kind"] == "unet"
    assert [row["key"] for row in result["questions"]] == list(QUESTIONS)
    for row in result["questions"]:
        assert row["measured"] and row["target"], row
        assert row["question"] in markdown and (row["verdict"] in markdown if row["verdict"] else True)
    rows = {row["key"]: row for row in result["questions"]}
    assert rows["xt_use"]["verdict"].startswith(("ignores x_t", "uses x_t"))
    assert rows["uncertainty"]["met"] in (True, False)  # compared with the reference
    assert "inside the conditioning" in rows["prior"]["measured"]  # prior_source head: knocked out in cond
    assert "not applicable" not in json.dumps(rows)
    case = next(iter(result["per_case"].values()))
    assert set(case["xt_use"]["dice"]) == {"true", "inverted", "empty", "noise"}
    assert set(case["xt_use"]["timesteps"]) == {"abar0.9", "abar0.5", "abar0.1", "T-1"}
    assert set(case["refinement"]) == {"K1xN2", "K2xN2", "default"}
    assert case["refinement"]["K1xN2"] == case["refinement"]["default"] == case["dice"]["mean"]  # K1 x N2: the default
    assert set(case["prior"]["dice"]) == {"none", "other", "outline", "truth", "own"}
    assert case["attention_knockouts"]["cross"]["layers"] >= 1 and case["attention_knockouts"]["self"]["layers"] >= 1
    maps = case["attention_maps"]
    assert maps["cross"]["present"] and maps["self"]["present"]
    assert 0 < maps["cross_weights"]["normalised_entropy"] <= 1
    assert maps["faithfulness"]["occluded_voxels"] > 0
    assert "reference" in case and 0 <= case["reference"]["entropy_auroc"] <= 1
    assert result["metrics"]["audit_cases"] == 2 and "audit_xt_true_abar0.9" in result["metrics"]
    assert "| question | measured | target | verdict |" in stdout and str(out / "audit.json") in stdout


def test_the_audit_default_run_is_the_product_prediction(models):
    """The audit's own segmenter gives what ``predict``'s segmenter gives on the same grid, digit for digit."""
    from medseg_diff.inference.loading import load_model
    from medseg_diff.inference.sliding_window import infer_volume

    model = load_model(models["diffusion"], "cpu")
    _, convention, records = case_records(models["manifest"])
    case = load_case(records[0], convention, model.cfg.data.spacing)
    windows = Windowing.of(model.cfg)
    probe = DiffusionProbe(model, windows, seed=model.cfg.experiment.seed)
    ours = probe.default_run(case)
    product = infer_volume(model.adapter.segmenter(model.net, seed=model.cfg.experiment.seed), case.image,
                           windows.roi, overlap=windows.overlap, sw_batch_size=windows.sw_batch_size, mode=windows.mode)
    torch.testing.assert_close(ours.probs[:3], product.probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.variance, product.variance, rtol=0, atol=1e-6)
    for name in ("cross", "self"):
        torch.testing.assert_close(ours.attention[name], product.attention[name], rtol=0, atol=1e-5)
    members = ours.probs[3:].reshape(probe.default[1], 3, *case.shape)
    torch.testing.assert_close(members.mean(0), ours.probs[:3], rtol=0, atol=1e-5)
    assert case.regions.shape == (3, *case.shape) and case.regions[1].any() and case.head.any()
    assert np.array_equal(case.regions[0] | case.regions[2], case.regions[0])  # ET inside TC, as the label says


def test_a_unet_gets_the_questions_that_apply(models, tmp_path, capsys):
    out = tmp_path / "audit"
    rc, _, err = _run(capsys, "--checkpoint", models["unet"], "--manifest", models["manifest"], "--out", out,
                      "--max-cases", 1, *FAST)
    assert rc == 0, err
    result = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    rows = {row["key"]: row for row in result["questions"]}
    assert result["settings"]["cases"] == 1 and result["settings"]["model_kind"] == "unet"
    for key in ("xt_use", "refinement", "members", "prior", "attention_knockouts", "attention_maps", "faithfulness"):
        assert rows[key]["verdict"].startswith("not applicable") and rows[key]["met"] is None, key
    assert "entropy" in rows["uncertainty"]["measured"] and "not applicable" not in rows["uncertainty"]["verdict"]
    assert 0 <= next(iter(result["per_case"].values()))["entropy_auroc"] <= 1
    assert "not applicable" in (out / "audit.md").read_text(encoding="utf-8")


def test_the_audit_is_logged_to_mlflow_when_tracking_is_on(models, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [a for a in FAST if a != "--no-tracking"]
    rc, stdout, err = _run(capsys, "--checkpoint", models["unet"], "--manifest", models["manifest"], "--out",
                           tmp_path / "audit", "--max-cases", 1, "--tracking-uri", uri, *args)
    assert rc == 0, err
    run_id = stdout.strip().splitlines()[-1].split()[-1]
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["stage"] == "audit" and run.data.params["model_kind"] == "unet"
    assert "audit_dice_mean" in run.data.metrics and "audit_entropy_auroc" in run.data.metrics
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run_id)}
    assert {"audit.json", "audit.md"} <= artifacts


@pytest.mark.parametrize("bad", ["missing", "foreign"])
def test_a_bad_checkpoint_is_named_in_one_line_with_status_2(models, tmp_path, capsys, bad):
    checkpoint = tmp_path / "model.pt"
    if bad == "foreign":
        checkpoint.write_bytes(b"not a checkpoint at all")
    rc, stdout, err = _run(capsys, "--checkpoint", checkpoint, "--manifest", models["manifest"], "--out",
                           tmp_path / "audit", *FAST)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(checkpoint) in lines[0] and lines[0].startswith("medseg-diff diagnose: error:")
    assert "Traceback" not in err and not (tmp_path / "audit").exists()


def test_a_bad_option_is_named_before_any_work(models, tmp_path, capsys):
    rc, _, err = _run(capsys, "--checkpoint", models["unet"], "--manifest", models["manifest"], "--out",
                      tmp_path / "audit", "--device", "banana", "--no-tracking")
    assert rc == 2 and "--device" in err and "banana" in err and not (tmp_path / "audit").exists()
