"""``export-nnunet``: a manifest as nnU-Net v2's raw data set on the manifest's folds, and nnU-Net's label values back
in ``evaluate --predictions``. The last tests run nnU-Net's own code (its Dataset137 label conversion and its data set
integrity check) when nnunetv2 is installed."""

import csv
import importlib.util
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from factories import BRATS2021, BRATS2023, MSD, run_cli, tiny_images, tiny_label, write_case
from medseg_diff.data.conventions import MODALITIES, get_convention
from medseg_diff.data.manifest import build_manifest, load_manifest, write_manifest
from medseg_diff.data.nnunet import (DATASET_JSON_KEY, SPLITS_FILE, convert_labels, export_nnunet, from_nnunet,
                                     labels_back, to_nnunet)
from medseg_diff.errors import DataError, ManifestError
from medseg_diff.evaluation.sources import read_case
from medseg_diff.stages.evaluate import evaluate
from medseg_diff.stages.options import Scoring, Tracking

HAS_NNUNET = importlib.util.find_spec("nnunetv2") is not None
NEEDS_NNUNET = pytest.mark.skipif(not HAS_NNUNET, reason="nnunetv2 is not installed (pip install nnunetv2): nnU-Net's "
                                                         "own label conversion and integrity check cannot be run")
#: nnU-Net's region-based BraTS labels, as nnunetv2/dataset_conversion/Dataset137_BraTS21.py writes them.
DATASET137_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def _data_set(tmp_path, conv=BRATS2021, cases=6, folds=2, test_fraction=0.34, ext=".nii.gz"):
    """``cases`` tiny cases of ``conv`` and their manifest; returns the manifest's path."""
    root = tmp_path / "data"
    prefix = {"brats2021": "BraTS2021_", "brats2023": "BraTS-GLI-", "msd": "BRATS_"}[conv.name]
    for i in range(cases):
        write_case(root, f"{prefix}{i:05d}", conv, seed=i, ext=ext)
    manifest = build_manifest(root, name="tiny set", convention=conv.name, folds=folds, test_fraction=test_fraction)
    return write_manifest(manifest, tmp_path / "manifest.json")


def _export(manifest_path, out, **kwargs):
    return export_nnunet(load_manifest(manifest_path), out, **kwargs)


@pytest.mark.parametrize("conv", [BRATS2021, BRATS2023], ids=lambda c: c.name)
def test_layout_dataset_json_and_splits_are_the_manifests(tmp_path, conv):
    manifest_path = _data_set(tmp_path, conv)
    manifest = load_manifest(manifest_path)
    result = _export(manifest_path, tmp_path / "raw", dataset_id=42, name="BraTSx")
    folder = tmp_path / "raw" / "Dataset042_BraTSx"
    assert result.folder == folder and sorted(p.name for p in (tmp_path / "raw").iterdir()) == [folder.name]
    train = [c for c in manifest.cases if c.subset == "train"]
    test = [c for c in manifest.cases if c.subset == "test"]
    assert len(train) == 4 and len(test) == 2
    channels = [f"_{i:04d}.nii.gz" for i in range(4)]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == sorted(c.id + s for c in train for s in channels)
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == sorted(f"{c.id}.nii.gz" for c in train)
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == sorted(c.id + s for c in test for s in channels)
    assert {p.name for p in folder.iterdir()} == {"imagesTr", "labelsTr", "imagesTs", "dataset.json", SPLITS_FILE}
    doc = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert doc["labels"] == DATASET137_LABELS and list(doc["labels"]) == list(DATASET137_LABELS)  # order matters
    assert doc["regions_class_order"] == [1, 2, 3]
    assert doc["numTraining"] == 4 and doc["file_ending"] == ".nii.gz"
    assert len(doc["channel_names"]) == 4 and list(doc["channel_names"]) == ["0", "1", "2", "3"]
    assert doc[DATASET_JSON_KEY]["convention"] == conv.name
    assert doc[DATASET_JSON_KEY]["nnunet_to_convention"] == {"0": 0, "1": conv.edema, "2": conv.core,
                                                             "3": conv.enhancing}
    splits = json.loads((folder / SPLITS_FILE).read_text(encoding="utf-8"))
    assert len(splits) == manifest.folds == 2
    for fold, split in enumerate(splits):
        fold_train, fold_val, _ = manifest.split(fold)
        assert split == {"train": [c.id for c in fold_train], "val": [c.id for c in fold_val]}
    for case in test + train:  # channel i is MODALITIES[i], byte for byte (copied, not linked)
        where = "imagesTs" if case.subset == "test" else "imagesTr"
        for i, modality in enumerate(MODALITIES):
            exported = folder / where / f"{case.id}_{i:04d}.nii.gz"
            assert not exported.is_symlink()
            assert exported.read_bytes() == manifest.path_of(case.images[modality]).read_bytes()


@pytest.mark.parametrize("conv", [BRATS2021, BRATS2023, MSD], ids=lambda c: c.name)
def test_exported_labels_are_nnunets_and_convert_back_to_the_originals(tmp_path, conv):
    manifest_path = _data_set(tmp_path, conv, cases=3, test_fraction=0.0)
    manifest = load_manifest(manifest_path)
    folder = _export(manifest_path, tmp_path / "raw").folder
    for case in manifest.cases:
        original = nib.load(str(manifest.path_of(case.label)))
        exported = nib.load(str(folder / "labelsTr" / f"{case.id}.nii.gz"))
        truth = np.asarray(original.dataobj)
        values = np.asarray(exported.dataobj)
        assert exported.get_data_dtype() == np.uint8
        np.testing.assert_allclose(exported.affine, original.affine)
        assert values.shape == truth.shape and set(np.unique(values)) == {0, 1, 2, 3}
        # nnU-Net's values mean edema 1, core 2, enhancing 3 (Dataset137_BraTS21.py)
        for role, value in (("edema", 1), ("core", 2), ("enhancing", 3)):
            np.testing.assert_array_equal(values == value, truth == getattr(conv, role))
        back = convert_labels(values, from_nnunet(conv), "x", "nnU-Net labels")
        np.testing.assert_array_equal(back, truth)


def test_the_label_maps_are_nnunets_dataset137_conversion():
    assert to_nnunet(BRATS2021) == {0: 0, 1: 2, 2: 1, 4: 3}
    assert to_nnunet(BRATS2023) == {0: 0, 1: 2, 2: 1, 3: 3}
    assert to_nnunet(MSD) == {0: 0, 1: 1, 2: 2, 3: 3}
    for conv in (BRATS2021, BRATS2023, MSD):
        assert from_nnunet(conv) == {v: k for k, v in to_nnunet(conv).items()}


def test_msd_4d_images_become_four_channels_in_modality_order(tmp_path):
    manifest_path = _data_set(tmp_path, MSD, cases=3, test_fraction=0.0)
    folder = _export(manifest_path, tmp_path / "raw").folder
    manifest = load_manifest(manifest_path)
    for seed, case in enumerate(sorted(manifest.cases, key=lambda c: c.id)):
        source = nib.load(str(manifest.path_of(case.images["4d"])))
        expected = tiny_images(tiny_label(convention=MSD, seed=seed), MSD, seed=seed)
        for i, modality in enumerate(MODALITIES):
            img = nib.load(str(folder / "imagesTr" / f"{case.id}_{i:04d}.nii.gz"))
            assert img.shape == source.shape[:3]
            np.testing.assert_allclose(img.affine, source.affine)
            np.testing.assert_array_equal(np.asarray(img.dataobj), expected[modality])


def test_other_formats_are_written_as_nifti_and_links_are_links(tmp_path):
    manifest_path = _data_set(tmp_path, BRATS2021, cases=4, test_fraction=0.0, ext=".nii")
    manifest = load_manifest(manifest_path)
    folder = _export(manifest_path, tmp_path / "raw", link="symlink").folder
    case = manifest.cases[0]
    source = nib.load(str(manifest.path_of(case.images["flair"])))
    written = folder / "imagesTr" / f"{case.id}_0003.nii.gz"
    assert not written.is_symlink()  # .nii is not the data set's file ending: written, not linked
    img = nib.load(str(written))
    assert img.get_data_dtype() == source.get_data_dtype()
    np.testing.assert_allclose(img.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(source.dataobj))

    gz = _data_set(tmp_path / "gz", BRATS2021, cases=4, test_fraction=0.0)
    folder = _export(gz, tmp_path / "raw_gz", link="hardlink").folder
    case = load_manifest(gz).cases[0]
    source = load_manifest(gz).path_of(case.images["t1"])
    assert os.path.samefile(folder / "imagesTr" / f"{case.id}_0000.nii.gz", source)


def test_an_nnunet_prediction_folder_scores_as_the_labels_in_the_convention(tmp_path):
    """BraTS 2023: nnU-Net's values are valid 2023 labels too (1 and 2 swapped), so only the conversion through the
    folder's dataset.json makes the scores right."""
    manifest_path = _data_set(tmp_path, BRATS2023)
    manifest = load_manifest(manifest_path)
    raw = _export(manifest_path, tmp_path / "raw").folder
    reference, nnunet = tmp_path / "reference", tmp_path / "nnunet"
    reference.mkdir()
    nnunet.mkdir()
    shutil.copy(raw / "dataset.json", nnunet / "dataset.json")  # what nnUNetv2_predict writes beside its maps
    test = [c for c in manifest.cases if c.subset == "test"]
    for case in test:  # an imperfect prediction: the reference shifted by one voxel
        img = nib.load(str(manifest.path_of(case.label)))
        shifted = np.roll(np.asarray(img.dataobj).astype(np.uint8), 1, axis=0)
        nib.save(nib.Nifti1Image(shifted, img.affine), str(reference / f"{case.id}.nii.gz"))
        values = convert_labels(shifted, to_nnunet(BRATS2023), "x", "BraTS 2023 labels")
        nib.save(nib.Nifti1Image(values, img.affine), str(nnunet / f"{case.id}.nii.gz"))
    evaluate(manifest_path, tmp_path / "eval", predictions={"reference": reference, "nnunet": nnunet},
             tracking=Tracking(enabled=False), scoring=Scoring(n_boot=100))
    rows = list(csv.DictReader((tmp_path / "eval" / "per_case.csv").open(encoding="utf-8")))
    dice = {(r["model"], r["case"], r["region"]): float(r["dice"]) for r in rows}
    assert len(dice) == 2 * len(test) * 3
    for (model, case, region), value in dice.items():
        if model == "nnunet":
            assert value == pytest.approx(dice[("reference", case, region)])
            assert 0.3 < value < 1.0
    # without its dataset.json the same folder reads as BraTS 2023 labels with NCR and edema swapped
    (nnunet / "dataset.json").unlink()
    wrong = read_case(nnunet, test[0].id, manifest.path_of(test[0].label), BRATS2023)
    right = read_case(reference, test[0].id, manifest.path_of(test[0].label), BRATS2023)
    assert not np.array_equal(wrong.labels, right.labels)


def test_an_nnunet_map_with_a_value_outside_its_labels_is_refused_naming_the_file(tmp_path):
    manifest_path = _data_set(tmp_path, BRATS2021)
    manifest = load_manifest(manifest_path)
    raw = _export(manifest_path, tmp_path / "raw").folder
    folder = tmp_path / "nnunet"
    folder.mkdir()
    shutil.copy(raw / "dataset.json", folder / "dataset.json")
    case = next(c for c in manifest.cases if c.subset == "test")
    img = nib.load(str(manifest.path_of(case.label)))
    data = np.asarray(img.dataobj).astype(np.uint8)  # BraTS 2021 values: 4 is no nnU-Net label
    nib.save(nib.Nifti1Image(data, img.affine), str(folder / f"{case.id}.nii.gz"))
    with pytest.raises(DataError, match=rf"{case.id}\.nii\.gz: label values \[4\] are not the nnU-Net labels"):
        read_case(folder, case.id, manifest.path_of(case.label), BRATS2021)


def test_which_dataset_json_converts_back():
    conv = get_convention("brats2021")
    documented = {"labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3},
                  "regions_class_order": [1, 2, 3]}
    label_based = {"labels": {"background": 0, "edema": 1, "non_enhancing_and_necrosis": 2, "enhancing_tumor": 3}}
    for doc in (documented, label_based, {"labels": DATASET137_LABELS, "regions_class_order": [1, 2, 3]}):
        assert labels_back(doc, conv, "dataset.json") == {0: 0, 1: 2, 2: 1, 3: 4}
    dataset226 = {"labels": {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4}}  # BraTS 2023+ values as they are
    assert labels_back(dataset226, conv, "dataset.json") is None
    assert labels_back(None, conv, "dataset.json") is None
    reordered = {"labels": DATASET137_LABELS, "regions_class_order": [3, 2, 1]}
    with pytest.raises(DataError, match=r"dataset.json: nnU-Net region-based labels .* are not nnU-Net's BraTS"):
        labels_back(reordered, conv, "dataset.json")
    with pytest.raises(DataError, match="exported by medseg-diff, but its labels"):
        labels_back({**reordered, DATASET_JSON_KEY: {}}, conv, "dataset.json")


def test_refusals_name_the_problem_and_write_nothing(tmp_path, capsys):
    manifest_path = _data_set(tmp_path, BRATS2021)
    raw = tmp_path / "raw"
    for args, message in [(["--dataset-id", "0"], "dataset id must be an integer in 1..999"),
                          (["--dataset-id", "1000"], "dataset id must be an integer in 1..999"),
                          (["--name", "my set"], "dataset name 'my set' must be"),
                          (["--name", "../up"], "dataset name '../up' must be")]:
        rc, out = run_cli(capsys, "export-nnunet", manifest_path, "--out", raw, *args)
        assert rc == 2 and message in out, out
    assert not raw.exists()
    rc, out = run_cli(capsys, "export-nnunet", manifest_path, "--out", raw, "--name", "A")
    assert rc == 0 and "Dataset137_A" in out and "nnUNet_preprocessed/Dataset137_A/splits_final.json" in out
    before = (raw / "Dataset137_A" / "dataset.json").stat().st_mtime_ns
    rc, out = run_cli(capsys, "export-nnunet", manifest_path, "--out", raw, "--name", "A")
    assert rc == 2 and "Dataset137_A: already holds files; pass --overwrite" in out
    rc, out = run_cli(capsys, "export-nnunet", manifest_path, "--out", raw, "--name", "B")
    assert rc == 2 and "Dataset137_A: has dataset id 137 too" in out
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset137_A"]
    assert (raw / "Dataset137_A" / "dataset.json").stat().st_mtime_ns == before
    (raw / "Dataset137_A" / "imagesTr" / "stale_0000.nii.gz").write_bytes(b"old")
    rc, out = run_cli(capsys, "export-nnunet", manifest_path, "--out", raw, "--name", "A", "--overwrite")
    assert rc == 0 and not (raw / "Dataset137_A" / "imagesTr" / "stale_0000.nii.gz").exists()


def test_a_manifest_without_folds_or_with_a_bad_label_is_refused(tmp_path):
    no_folds = _data_set(tmp_path / "a", BRATS2021, folds=0)
    with pytest.raises(ManifestError, match=r"manifest.json: has no cross-validation folds \(splits.folds is 0\)"):
        _export(no_folds, tmp_path / "raw")
    bad = _data_set(tmp_path / "b", BRATS2021, test_fraction=0.0)
    manifest = load_manifest(bad)
    case = manifest.cases[-1]
    img = nib.load(str(manifest.path_of(case.label)))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 3  # no BraTS 2021 label
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(manifest.path_of(case.label)))
    with pytest.raises(DataError, match=rf"case {case.id}: .*_seg\.nii\.gz: label values \[3\] are not brats2021"):
        _export(bad, tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []  # the half-built data set was removed


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """nnU-Net's three folders (its ``nnunetv2.paths`` reads them when first imported)."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    return tmp_path / "nnUNet_raw"


@NEEDS_NNUNET
def test_nnunets_own_dataset137_conversion_gives_the_same_labels(tmp_path, nnunet_env):
    from nnunetv2.dataset_conversion.Dataset137_BraTS21 import (convert_labels_back_to_BraTS,
                                                                copy_BraTS_segmentation_and_convert_labels_to_nnUNet)

    manifest_path = _data_set(tmp_path, BRATS2021, cases=3, test_fraction=0.0)
    manifest = load_manifest(manifest_path)
    folder = _export(manifest_path, nnunet_env).folder
    for case in manifest.cases:
        theirs = tmp_path / f"{case.id}_nnunet.nii.gz"
        copy_BraTS_segmentation_and_convert_labels_to_nnUNet(str(manifest.path_of(case.label)), str(theirs))
        ours = np.asarray(nib.load(str(folder / "labelsTr" / f"{case.id}.nii.gz")).dataobj)
        np.testing.assert_array_equal(ours, np.asarray(nib.load(str(theirs)).dataobj))
        np.testing.assert_array_equal(convert_labels(ours, from_nnunet(BRATS2021), "x", "nnU-Net labels"),
                                      convert_labels_back_to_BraTS(ours))


@NEEDS_NNUNET
def test_nnunets_dataset_integrity_check_passes_on_the_export(tmp_path, nnunet_env, capfd):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    manifest_path = _data_set(tmp_path, BRATS2023)
    folder = _export(manifest_path, nnunet_env, dataset_id=901, name="Phantoms").folder
    verify_dataset_integrity(str(folder), num_processes=1)  # raises on a missing file, a bad label, a grid mismatch
    out = capfd.readouterr().out
    assert "verify_dataset_integrity Done" in out
    assert "Error" not in out and "Warning" not in out, out  # nnU-Net only prints an affine / origin mismatch
