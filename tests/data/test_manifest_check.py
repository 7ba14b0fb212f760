import json

import nibabel as nib
import numpy as np
import pytest

from factories import BRATS2021, BRATS2023, LPS_AFFINE, save, write_case
from medseg_diff.cli import main
from medseg_diff.data.check import check_manifest
from medseg_diff.data.manifest import build_manifest, load_manifest, sha256_file, write_manifest
from medseg_diff.errors import ManifestError


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        write_case(root, f"BraTS2021_{i:05d}", BRATS2021, seed=i)
    write_case(root, "BraTS2021_99999", BRATS2021, label=False)
    return root


def test_manifest_paths_checksums_and_splits(dataset, tmp_path):
    m = build_manifest(dataset, folds=3, test_fraction=0.34, seed=1)
    assert m.convention == "brats2021" and len(m.cases) == 7
    case = m.cases[0]
    assert case.images["t1"] == "BraTS2021_00000/BraTS2021_00000_t1.nii.gz"
    assert case.sha256[case.images["t1"]] == sha256_file(dataset / case.images["t1"])
    subsets = [c.subset for c in m.cases]
    assert subsets.count("test") == 2 and subsets.count("unlabelled") == 1 and subsets.count("train") == 4
    train, val, test = m.split(fold=0)
    assert len(train) + len(val) == 4 and len(test) == 2
    assert {c.id for c in train}.isdisjoint({c.id for c in val})
    # the same seed gives the same split; another seed may not
    again = build_manifest(dataset, folds=3, test_fraction=0.34, seed=1)
    assert [(c.id, c.fold, c.subset) for c in again.cases] == [(c.id, c.fold, c.subset) for c in m.cases]


def test_manifest_roundtrip_with_relative_root(dataset, tmp_path):
    m = build_manifest(dataset, name="tiny")
    path = write_manifest(m, tmp_path / "manifests" / "tiny.json")
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["root"] == "../data" and doc["schema_version"] == 1
    loaded = load_manifest(path)
    assert loaded.root == dataset.resolve()
    assert [c.id for c in loaded.cases] == [c.id for c in m.cases]
    assert loaded.content_hash() == m.content_hash()


def test_content_hash_covers_the_split(dataset):
    """Moving a held-out case into training (or to another fold) changes the hash MLflow records."""
    m = build_manifest(dataset, folds=3, test_fraction=0.34, seed=1)
    before = m.content_hash()
    test_case = next(c for c in m.cases if c.subset == "test")
    test_case.subset, test_case.fold = "train", 0
    moved = m.content_hash()
    assert moved != before
    test_case.fold = 1
    assert m.content_hash() not in (before, moved)
    test_case.subset, test_case.fold = "test", None
    assert m.content_hash() == before


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "a/../../b.nii.gz"])
def test_paths_escaping_the_root_are_rejected(dataset, tmp_path, bad):
    path = write_manifest(build_manifest(dataset), tmp_path / "m.json")
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["cases"][0]["images"]["t1"] = bad
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="escapes the data root|absolute"):
        load_manifest(path)


def test_missing_modality_fails_manifest_naming_the_case(dataset):
    (dataset / "BraTS2021_00003" / "BraTS2021_00003_flair.nii.gz").unlink()
    with pytest.raises(ManifestError, match="BraTS2021_00003.*missing modality flair"):
        build_manifest(dataset)


def test_good_manifest_checks_clean(dataset):
    assert check_manifest(build_manifest(dataset)) == []


def _break(dataset, case, suffix, how):
    path = dataset / case / f"{case}_{suffix}.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    if how == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "nan":
        data[3, 3, 3] = np.nan
        save(data.astype(np.float32), path)
    elif how == "shape":
        save(data[:-2], path)
    elif how == "affine":
        affine = LPS_AFFINE.copy()
        affine[0, 3] += 1.5
        save(data, path, affine)
    elif how == "empty":
        save(np.zeros_like(data), path)
    elif how == "labels":
        data[0, 0, 0] = 7
        save(data.astype(np.uint8), path)
    return path


@pytest.mark.parametrize(
    "suffix,how,message",
    [
        ("t2", "truncate", "unreadable|truncated"),
        ("flair", "nan", "NaN/Inf"),
        ("t1ce", "shape", r"shape \(14, 16, 16\) differs"),
        ("flair", "affine", "affine differs .* by up to 1.5"),
        ("t2", "empty", "empty volume"),
        ("seg", "labels", r"unknown label values \[7\]"),
    ],
)
def test_bad_inputs_are_named(dataset, suffix, how, message):
    m = build_manifest(dataset)
    path = _break(dataset, "BraTS2021_00002", suffix, how)
    problems = check_manifest(m, continue_on_error=True, verify_checksums=False)
    assert problems, "the broken file was not detected"
    assert all(p.case == "BraTS2021_00002" for p in problems)
    assert any(p.file == str(path) for p in problems)
    assert any(__import__("re").search(message, p.message) for p in problems), [str(p) for p in problems]


def test_checksum_change_is_detected(dataset):
    m = build_manifest(dataset)
    path = dataset / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz"
    data = np.asarray(nib.load(str(path)).dataobj) + 1.0
    save(data.astype(np.float32), path)
    problems = check_manifest(m)
    assert [(p.case, p.file) for p in problems] == [("BraTS2021_00001", str(path))]
    assert "checksum changed" in problems[0].message


def test_continue_on_error_lists_every_problem(dataset):
    m = build_manifest(dataset)
    _break(dataset, "BraTS2021_00001", "flair", "nan")
    _break(dataset, "BraTS2021_00004", "seg", "labels")
    assert {p.case for p in check_manifest(m, verify_checksums=False)} == {"BraTS2021_00001"}
    all_problems = check_manifest(m, continue_on_error=True, verify_checksums=False)
    assert {p.case for p in all_problems} == {"BraTS2021_00001", "BraTS2021_00004"}


def test_cli_manifest_and_check(dataset, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["manifest", str(dataset), "--out", str(out), "--folds", "2"]) == 0
    assert main(["check", str(out)]) == 0
    _break(dataset, "BraTS2021_00005", "t1", "nan")
    capsys.readouterr()
    assert main(["check", str(out), "--continue-on-error"]) == 1
    err = capsys.readouterr().err
    assert "BraTS2021_00005_t1.nii.gz" in err and "checksum changed" in err and "NaN/Inf" in err
    assert main(["check", str(tmp_path / "nope.json")]) == 2
    assert "manifest not found" in capsys.readouterr().err


def test_brats2023_label_3_is_valid_and_4_is_not(tmp_path):
    root = tmp_path / "d"
    folder = write_case(root, "BraTS-GLI-00000-000", BRATS2023)
    m = build_manifest(root)
    assert check_manifest(m) == []
    seg = folder / "BraTS-GLI-00000-000-seg.nii.gz"
    data = np.asarray(nib.load(str(seg)).dataobj).copy()
    data[data == 3] = 4
    save(data, seg)
    problems = check_manifest(m, verify_checksums=False)
    assert "unknown label values [4]" in problems[0].message


def test_real_cases_manifest_and_check(real_data, tmp_path):
    m = build_manifest(real_data)
    assert m.convention == "brats2023" and len(m.cases) == 3
    assert check_manifest(m, continue_on_error=True) == []
