"""Bad input about *whose* data a case holds, case ids no file name can hold, and manifests that are not data.

One case is one patient with four different images: a file of a case that resolves into another case's folder, one
file given for two modalities, and a modality copied over another are refused, naming the files, through every
command that meets them (``manifest``, ``check``, ``train``, ``predict`` on a manifest or a folder, ``evaluate``).
Each ends with a non-zero status, one line naming the culprit and no traceback; nothing is written.
"""

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from factories import BRATS2021, MSD, save, tiny_config, write_case, run_cli as run
from medseg_diff.data.manifest import build_manifest, case_id_problem, load_manifest, write_manifest
from medseg_diff.errors import DataError


def _error_line(text: str) -> str:
    """The one ``medseg-diff CMD: error: ...`` line of a refused command."""
    lines = [line for line in text.splitlines() if ": error: " in line]
    assert len(lines) == 1, text
    return lines[0]


def _cases(root: Path, n: int = 4) -> Path:
    for i in range(n):
        write_case(root, f"C{i}", seed=i)
    return root


def _dataset(root: Path, n: int = 4) -> Path:
    _cases(root, n)
    return write_manifest(build_manifest(root, folds=2, test_fraction=0.25, seed=0), root / "manifest.json")


def _train_case(manifest: Path) -> str:
    return load_manifest(manifest).split(0)[0][0].id  # a case of the training folds (fold 0 validates)


def _edit(manifest: Path, change) -> Path:
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    change(doc)
    edited = manifest.with_name("edited.json")
    edited.write_text(json.dumps(doc), encoding="utf-8")
    return edited


def _case(doc: dict, case_id: str) -> dict:
    return next(c for c in doc["cases"] if c["id"] == case_id)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny U-Net trained for one step on four clean 16³ cases."""
    from medseg_diff.training.run import train

    root = tmp_path_factory.mktemp("patients")
    manifest = _dataset(root / "data")
    train(tiny_config(manifest, root / "run", "unet", train={"epochs": 1, "steps_per_epoch": 1},
                      data={"max_val_cases": 0}))
    return root / "run" / "best.pt"


def _every_command(capsys, tmp_path: Path, manifest: Path, checkpoint: Path) -> dict[str, tuple[int, str]]:
    """``check``, ``train``, ``predict`` and ``evaluate`` on ``manifest``; none may write anything."""
    cfg = tiny_config(manifest, tmp_path / "run", "unet", train={"epochs": 1, "steps_per_epoch": 1},
                      data={"max_val_cases": 0})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    results = {
        "check": run(capsys, "check", manifest),
        "train": run(capsys, "train", "--config", tmp_path / "c.yaml"),
        "predict": run(capsys, "predict", "--checkpoint", checkpoint, "--input", manifest, "--out",
                       tmp_path / "pred", "--device", "cpu"),
        "evaluate": run(capsys, "evaluate", "--manifest", manifest, "--predictions", f"x={tmp_path}", "--out",
                        tmp_path / "eval", "--no-tracking"),
    }
    assert not (tmp_path / "pred").exists() and not (tmp_path / "eval").exists()
    assert not (tmp_path / "run" / "last.pt").exists()
    return results


def _refused(results: dict[str, tuple[int, str]], *needles: str) -> None:
    for command, (rc, text) in results.items():
        line = _error_line(text)
        assert rc == 2 and all(n in line for n in needles), (command, text)


def _predict_folder(capsys, checkpoint: Path, data: Path, out: Path) -> tuple[int, str]:
    rc, text = run(capsys, "predict", "--checkpoint", checkpoint, "--input", data, "--out", out, "--device", "cpu",
                   "--continue-on-error")
    assert not out.exists()  # refused before any case is predicted
    return rc, text


# --- 1a. a modality that is another case's file ---------------------------------------------------------------


def test_a_symlink_into_another_cases_folder_is_refused_by_every_command(model, tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")
    root = manifest.parent
    link = root / "C1" / "C1_t2.nii.gz"
    link.unlink()
    os.symlink(Path("..") / "C2" / "C2_t2.nii.gz", link)  # inside the data root: no "outside the root" error
    needles = (str(link), "t2 resolves into case C2's folder", "case C1")
    # a manifest built before the link was made: every command that reads it
    _refused(_every_command(capsys, tmp_path, manifest, model), *needles)
    # the folder: manifest, and predict on the folder (discovery)
    rc, text = run(capsys, "manifest", root, "--out", tmp_path / "m.json")
    assert rc == 2 and all(n in _error_line(text) for n in needles) and not (tmp_path / "m.json").exists()
    rc, text = _predict_folder(capsys, model, root, tmp_path / "pred_folder")
    assert rc == 2 and all(n in _error_line(text) for n in needles)


def test_a_manifest_path_into_another_cases_folder_is_refused(model, tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")
    extra = manifest.parent / "C2" / "C2_t2_old.nii.gz"  # a file C2 does not use: only the folder tells
    shutil.copyfile(manifest.parent / "C2" / "C2_t2.nii.gz", extra)

    def point_into_c2(doc):
        case = _case(doc, "C1")
        case["sha256"][extra.relative_to(manifest.parent).as_posix()] = case["sha256"].pop(case["images"]["t2"])
        case["images"]["t2"] = extra.relative_to(manifest.parent).as_posix()

    edited = _edit(manifest, point_into_c2)
    _refused(_every_command(capsys, tmp_path, edited, model), str(extra), "t2 resolves into case C2's folder")


# --- 1b. one file for two modalities ---------------------------------------------------------------------------


def test_one_file_for_two_modalities_in_a_manifest_is_refused_by_every_command(model, tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")

    def same_file(doc):
        case = _case(doc, "C1")
        del case["sha256"][case["images"]["t1ce"]]
        case["images"]["t1ce"] = case["images"]["t1"]

    edited = _edit(manifest, same_file)
    _refused(_every_command(capsys, tmp_path, edited, model), "case C1", "C1_t1.nii.gz",
             "t1 and t1ce are the same file")


def test_a_modality_symlinked_to_another_of_its_case_is_refused_in_a_folder(model, tmp_path, capsys):
    root = _cases(tmp_path / "data")
    link = root / "C1" / "C1_t1ce.nii.gz"
    link.unlink()
    os.symlink("C1_t1.nii.gz", link)
    needles = (str(link), "t1 and t1ce are the same file", str(root / "C1" / "C1_t1.nii.gz"))
    rc, text = run(capsys, "manifest", root, "--out", tmp_path / "m.json")
    assert rc == 2 and all(n in _error_line(text) for n in needles) and not (tmp_path / "m.json").exists()
    rc, text = _predict_folder(capsys, model, root, tmp_path / "pred")
    assert rc == 2 and all(n in _error_line(text) for n in needles)


# --- 1c. a modality copied over another ------------------------------------------------------------------------


def test_a_byte_copy_of_another_modality_is_refused_by_every_command(model, tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")
    root = manifest.parent
    t1, t1ce = root / "C1" / "C1_t1.nii.gz", root / "C1" / "C1_t1ce.nii.gz"
    shutil.copyfile(t1, t1ce)
    # the folder: manifest (checksums) and predict on the folder (discovery compares files of equal size)
    rc, text = run(capsys, "manifest", root, "--out", tmp_path / "m.json")
    assert rc == 2 and not (tmp_path / "m.json").exists()
    assert all(n in _error_line(text) for n in ("case C1", str(t1ce), "t1ce has the same content as t1", str(t1)))
    rc, text = _predict_folder(capsys, model, root, tmp_path / "pred_folder")
    assert rc == 2 and all(n in _error_line(text) for n in (str(t1ce), "t1ce has the same content as t1", str(t1)))

    # a manifest that records the copy (equal SHA-256): refused when read, before any file is
    def record_the_copy(doc):
        case = _case(doc, "C1")
        case["sha256"][case["images"]["t1ce"]] = case["sha256"][case["images"]["t1"]]

    edited = _edit(manifest, record_the_copy)
    _refused(_every_command(capsys, tmp_path, edited, model), "case C1", str(t1ce), "t1ce has the same content as t1")


def test_a_resaved_copy_of_another_modality_is_found_by_its_voxels(tmp_path, capsys):
    root = _cases(tmp_path / "data")
    manifest = root / "manifest.json"
    case = "C1"
    t1, t1ce = root / case / f"{case}_t1.nii.gz", root / case / f"{case}_t1ce.nii.gz"
    img = nib.load(str(t1))
    save(np.asarray(img.dataobj, dtype=np.float64), t1ce, img.affine)  # other bytes, the same voxels
    assert run(capsys, "manifest", root, "--out", manifest, "--folds", "2", "--test-fraction", "0.25")[0] == 0
    rc, text = run(capsys, "check", manifest, "--continue-on-error")
    lines = [line for line in text.splitlines() if "same voxels" in line]
    assert rc == 1 and len(lines) == 1 and str(t1ce) in lines[0] and str(t1) in lines[0], text
    assert "t1ce has the same voxels as t1" in lines[0] and f"case {case}" in lines[0]
    case = _train_case(manifest)  # train: the pre-flight check refuses its training case
    t1, t1ce = root / case / f"{case}_t1.nii.gz", root / case / f"{case}_t1ce.nii.gz"
    img = nib.load(str(t1))
    save(np.asarray(img.dataobj, dtype=np.float64), t1ce, img.affine)
    manifest = write_manifest(build_manifest(root, folds=2, test_fraction=0.25, seed=0), manifest)
    cfg = tiny_config(manifest, tmp_path / "run", "unet", train={"epochs": 1, "steps_per_epoch": 1},
                      data={"max_val_cases": 0})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    rc, text = run(capsys, "train", "--config", tmp_path / "c.yaml")
    assert rc == 2 and case in _error_line(text) and not (tmp_path / "run" / "last.pt").exists()
    assert any(str(t1ce) in line and "same voxels as t1" in line for line in text.splitlines()), text


def test_predict_and_evaluate_refuse_a_resaved_copy_before_inference(model, tmp_path, capsys):
    """The manifest's checksums differ (other bytes), so it is the normalised images that give the copy away."""
    root = _cases(tmp_path / "data")
    case = "C1"
    t1, t1ce = root / case / f"{case}_t1.nii.gz", root / case / f"{case}_t1ce.nii.gz"
    img = nib.load(str(t1))
    save(np.asarray(img.dataobj, dtype=np.float64) * 3.0 + 7.0, t1ce, img.affine)  # re-saved and rescaled
    rc, text = run(capsys, "predict", "--checkpoint", model, "--input", root, "--out", tmp_path / "pred",
                   "--device", "cpu")
    line = _error_line(text)
    assert rc == 2 and f"case {case}" in line and str(t1ce) in line and str(t1) in line, text
    assert "t1ce holds the same image as t1" in line and not (tmp_path / "pred" / case).exists()
    manifest = write_manifest(build_manifest(root, folds=0, test_fraction=0.5, seed=0), root / "manifest.json")
    rc, text = run(capsys, "evaluate", "--manifest", manifest, "--model", f"m={model}", "--out", tmp_path / "eval",
                   "--no-tracking", "--subset", "all", "--device", "cpu")
    assert rc == 2 and "t1ce holds the same image as t1" in _error_line(text)


def test_a_volume_thinner_than_the_network_needs_is_named_by_check(tmp_path, capsys):
    root = _cases(tmp_path / "data")
    manifest = write_manifest(build_manifest(root, folds=2, test_fraction=0.25, seed=0), root / "manifest.json")
    for m in ("t1", "t1ce", "t2", "flair", "seg"):
        path = root / "C2" / f"C2_{m}.nii.gz"
        img = nib.load(str(path))
        save(np.asarray(img.dataobj)[:, :, :2], path, img.affine)
    manifest = write_manifest(build_manifest(root, folds=2, test_fraction=0.25, seed=0), manifest)
    rc, text = run(capsys, "check", manifest)
    assert rc == 1 and "2 slices along axis 3 (k); the model needs at least 4" in text and "case C2" in text


def test_two_identical_channels_of_an_msd_image_are_found(tmp_path, capsys):
    root = tmp_path / "msd"
    for i in range(2):
        write_case(root, f"M{i}", MSD, seed=i)
    path = root / "imagesTr" / "M1.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[..., 2] = data[..., 1]  # t1gd a copy of T1w
    save(data, path, img.affine)
    assert run(capsys, "manifest", root, "--out", tmp_path / "m.json")[0] == 0
    rc, text = run(capsys, "check", tmp_path / "m.json", "--continue-on-error")
    assert rc == 1 and any(str(path) in line and "channel 2 holds the same voxels as channel 1" in line
                           for line in text.splitlines()), text


def test_an_image_identical_to_another_cases_is_named_by_manifest_and_check(tmp_path, capsys):
    root = _cases(tmp_path / "data")
    original, copy = root / "C0" / "C0_flair.nii.gz", root / "C3" / "C3_flair.nii.gz"
    shutil.copyfile(original, copy)  # one patient's FLAIR in two cases
    rc, text = run(capsys, "manifest", root, "--out", tmp_path / "m.json")
    pair = [line for line in text.splitlines() if "case C3's" in line or "case C0's" in line]
    assert rc == 0 and len(pair) == 1 and str(copy) in pair[0] and str(original) in pair[0], text
    rc, text = run(capsys, "check", tmp_path / "m.json", "--continue-on-error")
    pair = [line for line in text.splitlines() if "same content as case C0's flair" in line]
    assert len(pair) == 1 and "warning" in pair[0] and str(copy) in pair[0] and str(original) in pair[0], text


# --- 2. case ids no file name can hold ----------------------------------------------------------------------------


def test_a_case_id_too_long_for_a_file_name_is_refused_before_any_inference(model, tmp_path, capsys):
    root = _cases(tmp_path / "data", 2)
    long_id = "A" * 240
    write_case(root, long_id, seed=5)
    rc, text = run(capsys, "manifest", root, "--out", tmp_path / "m.json")
    line = _error_line(text)
    assert rc == 2 and "240 characters long; at most 128" in line and str(root / long_id) in line
    rc, text = _predict_folder(capsys, model, root, tmp_path / "pred")
    assert rc == 2 and "240 characters long; at most 128" in _error_line(text)
    # a manifest that holds such an id: every command
    shutil.rmtree(root / long_id)
    manifest = write_manifest(build_manifest(root, folds=2, seed=0), root / "manifest.json")
    edited = _edit(manifest, lambda doc: doc["cases"][0].update(id=long_id))
    _refused(_every_command(capsys, tmp_path, edited, model), str(edited), "240 characters long; at most 128")


def test_the_case_id_length_rule_is_the_writers_rule():
    from medseg_diff.predictions.types import check_name

    assert case_id_problem("A" * 128) is None and "at most 128" in case_id_problem("A" * 129)
    check_name("A" * 128, "case id", None)
    with pytest.raises(DataError, match="129 characters long; at most 128"):
        check_name("A" * 129, "case id", None)


# --- 3. manifests validated as data -------------------------------------------------------------------------------


def _on(case_id: str, key: str, value, sub: str | None = None):
    """A change of the manifest document: case ``case_id``'s ``key`` (or ``key[sub]``) becomes ``value``."""
    def change(doc):
        case = _case(doc, case_id)
        (case[key] if sub else case)[sub or key] = value
    return change


def _first_train_fold(value):
    def change(doc):
        next(c for c in doc["cases"] if c["subset"] == "train")["fold"] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_on("C2", "subset", "tset"), "case C2: {MANIFEST}: cases[2].subset: 'tset' is not one of train, test, unlabelled"),
    (lambda doc: doc.update(cases={"C0": {}}), "cases: expected a list of cases, got an object"),
    (lambda doc: doc["cases"].__setitem__(1, "C1"), "cases[1]: expected an object (a case), got 'C1'"),
    (_on("C1", "images", ["C1/C1_t1.nii.gz"]), "cases[1].images: expected an object (modality -> path), got a list"),
    (_on("C1", "images", 3, sub="t1"), "cases[1].images.t1: expected a path string, got 3"),
    (_on("C1", "label", 5), "cases[1].label: expected a path string or null, got 5"),
    (_on("C1", "sha256", []), "cases[1].sha256: expected an object (path -> SHA-256), got a list"),
    (_first_train_fold(7), "].fold: 7 is not a fold; a train case needs one of 0..1 (splits.folds is 2)"),
    (_first_train_fold("1"), "].fold: expected an integer or null, got '1'"),
    (_first_train_fold(None), "].fold: null is not a fold; a train case needs one of 0..1"),
    (lambda doc: doc["splits"].update(folds="2"), "splits.folds: expected an integer, got '2'"),
    (lambda doc: doc["cases"][0].pop("id"), "cases[0].id: missing (expected a string)"),
])
def test_a_manifest_that_is_not_valid_data_names_the_key(model, tmp_path, capsys, change, message):
    edited = _edit(_dataset(tmp_path / "data"), change)
    _refused(_every_command(capsys, tmp_path, edited, model), f"{edited}: ", message.replace("{MANIFEST}", str(edited)))


def test_a_fold_on_a_held_out_case_is_named(tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")
    index = next(i for i, c in enumerate(json.loads(manifest.read_text())["cases"]) if c["subset"] == "test")
    edited = _edit(manifest, lambda doc: doc["cases"][index].update(fold=0))
    rc, text = run(capsys, "check", edited)
    assert rc == 2 and f"cases[{index}].fold: 0 given but only train cases are in folds, this is a test case; " \
                      "use null" in _error_line(text)


# --- what stays accepted ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["brats", "flat", "msd"])
def test_a_clean_data_set_still_passes_manifest_and_check(tmp_path, capsys, layout):
    root = tmp_path / "data"
    for i in range(4):
        write_case(root, f"C{i}", MSD if layout == "msd" else BRATS2021, seed=i)
    if layout == "flat":  # every case's files in the root: no folder belongs to one case
        for folder in [p for p in root.iterdir() if p.is_dir()]:
            for f in folder.iterdir():
                f.rename(root / f.name)
            folder.rmdir()
    rc, text = run(capsys, "manifest", root, "--out", tmp_path / "m.json", "--folds", "2")
    assert rc == 0 and "warning" not in text, text
    rc, text = run(capsys, "check", tmp_path / "m.json")
    assert rc == 0 and "4 cases ok" in text and "warning" not in text, text
