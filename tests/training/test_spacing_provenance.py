"""A model always sees the voxel size it was trained at, and says what it was trained on, from its checkpoint alone.

A checkpoint records ``spacing_mm`` (``data.spacing``, or the training data's own voxel size when that is null, which
must then be one size) and ``training_data`` (data set, synthetic or not, cases, voxel size, manifest hash); loading
it makes inference resample every input to that grid; older checkpoints get it from their training manifest, or are
refused with the command that records it.
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from factories import tiny_config, write_case
from medseg_diff.checkpoint import _main as checkpoint_main
from medseg_diff.checkpoint import load_checkpoint, save_checkpoint
from medseg_diff.data.manifest import build_manifest, write_manifest
from medseg_diff.errors import ConfigError, DataError
from medseg_diff.export.report import SYNTHETIC_NOTE
from medseg_diff.inference.loading import load_model as load_checkpoint_model
from medseg_diff.inference.provenance import model_provenance
from medseg_diff.stages.export import export_predictions
from medseg_diff.stages.models import load_model
from medseg_diff.stages.options import Sampling
from medseg_diff.stages.predict import predict_cases
from medseg_diff.training.run import train

FAST = dict(data={"max_val_cases": 0}, train={"epochs": 1, "steps_per_epoch": 1})


@pytest.fixture(scope="module")
def native(phantoms, tmp_path_factory):
    """A tiny U-Net trained on the 5 mm phantoms with ``data.spacing: null`` (the demo's setting)."""
    out = tmp_path_factory.mktemp("native")
    train(tiny_config(phantoms, out, "unet", **FAST))
    return out / "best.pt"


def test_the_checkpoint_records_the_grid_and_the_data_it_was_trained_on(native):
    ckpt = load_checkpoint(native)
    assert ckpt["format"] == 4 and ckpt["spacing_mm"] == [5.0, 5.0, 5.0]
    record = ckpt["training_data"]
    assert record["dataset"] == "tiny-phantoms" and record["synthetic"] is True and record["voxel_mm"] == [5.0] * 3
    assert record["cases"] == 2 and record["validation_cases"] == 0  # fold 0 of the 4 labelled cases; no validation
    assert len(record["manifest_sha256"]) == 64


def test_an_input_at_another_voxel_size_is_predicted_at_the_trained_one(native, tmp_path, caplog):
    """The config said nothing (spacing null); the model still resamples a 2.5 mm case to its 5 mm, maps the result
    back onto the 2.5 mm grid, warns once that it never saw a real scan, and the report says so near the top."""
    affine = np.diag([-2.5, -2.5, 2.5, 1.0])
    write_case(tmp_path / "data", "FINE", shape=(40, 40, 24), affine=affine, seed=4)
    with caplog.at_level(logging.WARNING, logger="medseg_diff.stages.models"):
        model = load_model(native, "cpu")
    assert model.cfg.data.spacing == (5.0, 5.0, 5.0)
    assert [r for r in caplog.records if "trained only on synthetic phantoms" in r.getMessage()]
    predict_cases(native, tmp_path / "data", tmp_path / "pred", Sampling(device="cpu"), model=model)
    seg = nib.load(tmp_path / "pred" / "FINE" / "FINE_seg.nii.gz")
    assert seg.shape == (40, 40, 24) and np.allclose(seg.affine, affine)
    page = export_predictions([tmp_path / "pred" / "FINE"], tmp_path / "export").written[0].read_text("utf-8")
    assert page.index(SYNTHETIC_NOTE) < page.index("<h1>")


def test_provenance_comes_from_the_checkpoint_not_the_working_folder(native, tmp_path):
    """The training manifest moved away (the model used on another machine): the provenance still says what the
    model was trained on."""
    ckpt = load_checkpoint(native)
    ckpt["config"]["data"]["manifest"] = str(tmp_path / "gone" / "manifest.json")
    moved = save_checkpoint(ckpt, tmp_path / "moved.pt")
    provenance = model_provenance(load_checkpoint_model(moved))
    assert provenance.synthetic_training is True
    assert provenance.training_data.startswith("synthetic BraTS-like phantoms (medseg-diff synth), 5 mm voxels")
    assert "'tiny-phantoms', 2 training cases" in provenance.training_data


def test_an_older_checkpoint_measures_its_manifest_or_is_refused_with_the_fix(native, tmp_path, capsys):
    ckpt = load_checkpoint(native)
    old = {k: v for k, v in ckpt.items() if k not in ("spacing_mm", "training_data")} | {"format": 3}
    readable = save_checkpoint(old, tmp_path / "old.pt")
    assert load_checkpoint_model(readable).cfg.data.spacing == (5.0, 5.0, 5.0)  # measured from its manifest
    old["config"] = {**old["config"], "data": {**old["config"]["data"], "manifest": str(tmp_path / "gone.json")}}
    lost = save_checkpoint(old, tmp_path / "lost.pt")
    with pytest.raises(DataError, match="records no voxel size") as err:
        load_checkpoint_model(lost)
    assert f"python -m medseg_diff.checkpoint --set-spacing {lost} X Y Z" in str(err.value)
    assert checkpoint_main(["--set-spacing", str(lost), "5", "5", "5"]) == 0
    assert load_checkpoint_model(lost).cfg.data.spacing == (5.0, 5.0, 5.0)
    assert checkpoint_main(["--set-spacing", str(lost), "5", "-1", "5"]) == 2
    assert "3 positive numbers" in capsys.readouterr().err


def test_training_cases_of_different_voxel_sizes_are_refused_by_name(tmp_path):
    """With ``data.spacing: null`` there is no one scale to learn: refused before any work, naming two cases."""
    for i, size in enumerate((5.0, 5.0, 4.0)):
        write_case(tmp_path / "data", f"C{i}", shape=(16, 16, 16), affine=np.diag([size, size, size, 1.0]), seed=i)
    manifest = write_manifest(build_manifest(tmp_path / "data", name="mixed", folds=0, test_fraction=0.0),
                              tmp_path / "manifest.json")
    cfg = tiny_config(manifest, tmp_path / "run", "unet", **FAST)
    with pytest.raises(ConfigError, match=r"data\.spacing.*C0 5 mm, C2 4 mm"):
        train(cfg, check_data=False)
    assert not (tmp_path / "run" / "last.pt").exists()
