"""``evaluate --predictions NAME=DIR`` scores label maps of any tool against the manifest's labels."""

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest

from medseg_diff.cli import main
from medseg_diff.data.manifest import load_manifest
from medseg_diff.errors import DataError
from medseg_diff.stages.evaluate import evaluate
from medseg_diff.stages.options import Scoring, Tracking
from medseg_diff.evaluation.lesionwise import LESION_COLUMNS


def _test_cases(manifest_path):
    manifest = load_manifest(manifest_path)
    return manifest, [c for c in manifest.cases if c.subset == "test"]


def _nnunet_folder(manifest_path, folder, shift: int = 0):
    """nnU-Net / BraTS-submission layout (DIR/CASE.nii.gz): the reference labels, rolled by ``shift`` voxels."""
    manifest, cases = _test_cases(manifest_path)
    folder.mkdir(parents=True)
    for case in cases:
        img = nib.load(str(manifest.path_of(case.label)))
        data = np.roll(np.asarray(img.dataobj), shift, axis=0)
        nib.save(nib.Nifti1Image(data.astype(np.uint8), img.affine, img.header), str(folder / f"{case.id}.nii.gz"))
    return cases


def test_an_outside_folder_is_scored_like_our_own(phantoms, tmp_path):
    perfect = tmp_path / "perfect"
    cases = _nnunet_folder(phantoms, perfect)
    shifted = tmp_path / "shifted"
    _nnunet_folder(phantoms, shifted, shift=2)
    report = evaluate(phantoms, tmp_path / "eval", predictions={"perfect": perfect, "shifted": shifted},
                      tracking=Tracking(enabled=False), scoring=Scoring(n_boot=200))
    rows = list(csv.DictReader((tmp_path / "eval" / "per_case.csv").open(encoding="utf-8")))
    assert {r["case"] for r in rows} == {c.id for c in cases}
    assert list(rows[0])[:4] == ["case", "model", "region", "dice"]  # the columns of before come first
    assert set(LESION_COLUMNS) <= set(rows[0])
    for row in rows:
        if row["model"] == "perfect":
            assert float(row["dice"]) == 1.0 and float(row["hd95_mm"]) == 0.0
            assert float(row["lesion_dice"]) == 1.0 and float(row["fp_lesions"]) == 0
        else:
            assert float(row["dice"]) < 1.0
    assert "perfect_vs_shifted" in report.comparisons
    assert set(report.comparisons["perfect_vs_shifted"]) == {"dice", "hd95_mm", "lesion_dice"}
    assert "Lesion-wise" in report.summary_markdown


def test_a_prediction_off_the_case_grid_is_refused_naming_the_file(phantoms, tmp_path):
    folder = tmp_path / "preds"
    cases = _nnunet_folder(phantoms, folder)
    bad = folder / f"{cases[0].id}.nii.gz"
    img = nib.load(str(bad))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), str(bad))
    with pytest.raises(DataError, match=rf"{cases[0].id}\.nii\.gz: not on the case's grid: shape"):
        evaluate(phantoms, tmp_path / "eval", predictions={"tool": folder}, tracking=Tracking(enabled=False))


def test_labels_outside_the_convention_are_refused_and_continue_on_error_scores_the_rest(phantoms, tmp_path):
    folder = tmp_path / "preds"
    cases = _nnunet_folder(phantoms, folder)
    bad = folder / f"{cases[0].id}.nii.gz"
    img = nib.load(str(bad))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(bad))
    rc = main(["evaluate", "--manifest", str(phantoms), "--predictions", f"tool={folder}", "--out",
               str(tmp_path / "eval"), "--no-tracking", "--continue-on-error"])
    assert rc == 1  # a case failed, and was named
    rows = list(csv.DictReader((tmp_path / "eval" / "per_case.csv").open(encoding="utf-8")))
    assert {r["case"] for r in rows} == {c.id for c in cases[1:]}


def test_a_missing_case_names_the_layouts_it_looked_for(phantoms, tmp_path):
    folder = tmp_path / "preds"
    cases = _nnunet_folder(phantoms, folder)
    (folder / f"{cases[-1].id}.nii.gz").unlink()
    with pytest.raises(DataError, match=rf"case {cases[-1].id}: .*no prediction for this case .*{cases[-1].id}\.nii\.gz"):
        evaluate(phantoms, tmp_path / "eval", predictions={"tool": folder}, tracking=Tracking(enabled=False))


def test_our_prediction_folder_layout_is_found(phantoms, tmp_path):
    folder = tmp_path / "ours"
    flat = tmp_path / "flat"
    cases = _nnunet_folder(phantoms, flat)
    for case in cases:
        (folder / case.id).mkdir(parents=True)
        shutil.copy(flat / f"{case.id}.nii.gz", folder / case.id / f"{case.id}_seg.nii.gz")
    report = evaluate(phantoms, tmp_path / "eval", predictions={"ours": folder}, tracking=Tracking(enabled=False))
    assert all(float(r["dice"]) == 1.0 for r in report.rows)


def test_nothing_to_evaluate_and_an_empty_subset_say_what_to_do(phantoms, tmp_path):
    from medseg_diff.data.manifest import build_manifest, write_manifest

    with pytest.raises(DataError, match="nothing to evaluate"):
        evaluate(phantoms, tmp_path / "eval", tracking=Tracking(enabled=False))
    no_test = write_manifest(build_manifest(phantoms.parent, folds=2, test_fraction=0.0), tmp_path / "m.json")
    with pytest.raises(DataError, match=r"no labelled cases in subset 'test' .*'test': 0.*--test-fraction"):
        evaluate(no_test, tmp_path / "eval", predictions={"x": tmp_path}, tracking=Tracking(enabled=False))
    assert not (tmp_path / "eval").exists()  # refused before any output folder was made
