"""The bad-input corpus: one test per kind of bad input or fault, through the command a user would run.

Each must end with a non-zero exit status, no traceback, and a message that names the culprit (file, case or config
key); what was already written stays as it was. The README's "What happens on bad input" table lists these.
"""

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from factories import dead_pid, save, tiny_config, write_case, run_cli as run
from medseg_diff.checkpoint import load_checkpoint, save_checkpoint
from medseg_diff.cli import main
from medseg_diff.data.manifest import build_manifest, write_manifest


def _dataset(root: Path, n: int = 4) -> Path:
    for i in range(n):
        write_case(root, f"C{i}", seed=i)
    return write_manifest(build_manifest(root, folds=2, test_fraction=0.25, seed=0), root / "manifest.json")


def _config(manifest: Path, out: Path, path: Path, **sections) -> Path:
    cfg = tiny_config(manifest, out, "unet", **{"train": {"epochs": 1, "steps_per_epoch": 1},
                                                "data": {"max_val_cases": 0}, **sections})
    path.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    return path


def _train_case(manifest: Path) -> tuple[str, Path]:
    from medseg_diff.data.manifest import load_manifest

    m = load_manifest(manifest)
    case = m.split(0)[0][0]  # a case of the training folds (fold 0 validates)
    return case.id, m.root


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny U-Net trained for one step on four 16³ cases, and their manifest."""
    from medseg_diff.training.run import train

    root = tmp_path_factory.mktemp("bad_input")
    manifest = _dataset(root / "data")
    train(tiny_config(manifest, root / "run", "unet", train={"epochs": 1, "steps_per_epoch": 1},
                      data={"max_val_cases": 0}))
    return root / "run" / "best.pt", manifest


# --- train: the pre-flight data check ------------------------------------------------------------------------


def _corrupt(kind: str, case_dir: Path, case: str) -> Path:
    if kind == "truncated":
        path = case_dir / f"{case}_t2.nii.gz"
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "nan":
        path = case_dir / f"{case}_t2.nii.gz"
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        data[8, 8, 8] = np.nan
        save(data, path)
    elif kind in ("label7", "label1.5"):
        path = case_dir / f"{case}_seg.nii.gz"
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        data[8, 8, 8] = 7 if kind == "label7" else 1.5
        save(data, path)
    return path


@pytest.mark.parametrize("kind, problem", [
    ("truncated", "truncated|corrupt|unreadable"),
    ("nan", "NaN"),
    ("label7", r"unknown label values \[7\]"),
    ("label1.5", r"non-integral label values \[1\.5\]"),
])
def test_train_refuses_a_bad_training_case_before_any_work(tmp_path, capsys, kind, problem):
    manifest = _dataset(tmp_path / "data")
    case, root = _train_case(manifest)
    bad = _corrupt(kind, root / case, case)
    manifest = write_manifest(build_manifest(root, folds=2, test_fraction=0.25, seed=0), manifest)  # checksums ok
    rc, err = run(capsys, "train", "--config", _config(manifest, tmp_path / "run", tmp_path / "c.yaml"))
    assert rc == 2 and str(bad) in err and case in err
    assert any(__import__("re").search(problem, line) for line in err.splitlines() if str(bad) in line), err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_train_refuses_files_that_changed_since_the_manifest(tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")
    case, root = _train_case(manifest)
    bad = _corrupt("nan", root / case, case)  # after the manifest: its SHA-256 no longer matches
    rc, err = run(capsys, "train", "--config", _config(manifest, tmp_path / "run", tmp_path / "c.yaml"),
                  "--skip-data-check")
    assert rc == 2 and str(bad) in err and "checksum" in err


# --- manifest and check ------------------------------------------------------------------------------------


def test_manifest_refuses_one_case_id_in_two_folders(tmp_path, capsys):
    write_case(tmp_path / "data" / "siteA", "P1", seed=1)
    write_case(tmp_path / "data" / "siteB", "P1", seed=2)
    rc, err = run(capsys, "manifest", tmp_path / "data", "--out", tmp_path / "m.json")
    assert rc == 2 and "siteA" in err and "siteB" in err and not (tmp_path / "m.json").exists()


def test_manifest_refuses_a_case_id_no_file_name_can_hold(tmp_path, capsys):
    write_case(tmp_path / "data", "Case 01", seed=1)
    rc, err = run(capsys, "manifest", tmp_path / "data", "--out", tmp_path / "m.json")
    assert rc == 2 and "Case 01" in err


def test_manifest_refuses_a_symlink_out_of_the_root(tmp_path, capsys):
    folder = write_case(tmp_path / "data", "S1", seed=1)
    outside = tmp_path / "elsewhere" / "S1_flair.nii.gz"
    outside.parent.mkdir()
    shutil.move(folder / "S1_flair.nii.gz", outside)
    os.symlink(outside, folder / "S1_flair.nii.gz")
    rc, err = run(capsys, "manifest", tmp_path / "data", "--out", tmp_path / "m.json")
    assert rc == 2 and "S1_flair.nii.gz" in err and "outside" in err
    assert run(capsys, "manifest", tmp_path / "data", "--out", tmp_path / "m.json", "--follow-symlinks")[0] == 0


def test_check_names_a_manifest_entry_without_a_modality(tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")
    doc = yaml.safe_load(manifest.read_text(encoding="utf-8"))  # JSON is YAML
    del doc["cases"][0]["images"]["flair"]
    manifest.write_text(__import__("json").dumps(doc), encoding="utf-8")
    rc, err = run(capsys, "check", manifest, "--continue-on-error")
    assert rc == 1 and doc["cases"][0]["id"] in err and "'flair'" in err


def test_check_refuses_a_header_that_claims_more_voxels_than_the_file_holds(tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")
    case, root = _train_case(manifest)
    path = root / case / f"{case}_t1.nii.gz"
    img = nib.load(str(path))
    header = img.header.copy()
    header.set_data_shape((10000, 10000, 10000))
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + np.zeros(8, np.float32).tobytes()))
    rc, err = run(capsys, "check", manifest, "--continue-on-error", "--no-checksums")
    assert rc == 1 and str(path) in err and "header claims" in err


def test_check_refuses_a_zero_voxel_size(tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")
    case, root = _train_case(manifest)
    path = root / case / f"{case}_t1.nii.gz"
    img = nib.Nifti1Image(np.asarray(nib.load(str(path)).dataobj), None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(np.diag([2.0, 0.0, 2.0, 1.0]), code=1)  # the sform wins: its second axis has size 0
    nib.save(img, str(path))
    rc, err = run(capsys, "check", manifest, "--continue-on-error", "--no-checksums")
    assert rc == 1 and str(path) in err and "voxel size" in err


# --- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("train.lr=-0.1", "train.lr"),
    ("model.unet.dropout=2.0", "model.unet.dropout"),
    ("data.num_workers=-1", "data.num_workers"),
    ("infer.threshold=5", "infer.threshold"),
    ("tracking.uri=bogus://x", "tracking.uri"),
    ("data.roi_size=[32,32", "data.roi_size"),
    ("train.lrate=1", "train.lrate"),
])
def test_a_bad_config_value_is_named_by_its_key(tmp_path, capsys, override, key):
    manifest = _dataset(tmp_path / "data")
    rc, err = run(capsys, "train", "--config", _config(manifest, tmp_path / "run", tmp_path / "c.yaml"),
                  "--set", override)
    assert rc == 2 and f"config key '{key}'" in err
    assert not (tmp_path / "run").exists()


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")
    (tmp_path / "taken").write_text("a file")
    rc, err = run(capsys, "train", "--config", _config(manifest, tmp_path / "taken", tmp_path / "c.yaml"))
    assert rc == 2 and "experiment.output_dir" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_device_that_is_not_there_is_named(tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")
    rc, err = run(capsys, "train", "--config", _config(manifest, tmp_path / "run", tmp_path / "c.yaml"),
                  "--set", "train.device=cuda")
    assert rc == 2 and "train.device" in err and "no CUDA GPU" in err


# --- checkpoints, predict, evaluate -------------------------------------------------------------------------


def test_weights_that_do_not_fit_their_network_are_named(model, tmp_path, capsys):
    checkpoint, manifest = model
    ckpt = load_checkpoint(checkpoint)
    ckpt["network"]["kwargs"]["channels"] = [c * 2 for c in ckpt["network"]["kwargs"]["channels"]]
    bad = save_checkpoint(ckpt, tmp_path / "bad.pt")
    rc, err = run(capsys, "predict", "--checkpoint", bad, "--input", manifest, "--out", tmp_path / "out",
                  "--device", "cpu")
    assert rc == 2 and str(bad) in err and "do not fit" in err and not (tmp_path / "out").exists()


def test_predict_refuses_a_case_whose_files_changed_and_finishes_the_others(model, tmp_path, capsys):
    checkpoint, manifest = model
    data = tmp_path / "data"
    shutil.copytree(manifest.parent, data)
    case, root = _train_case(data / "manifest.json")
    bad = _corrupt("nan", root / case, case)
    rc, err = run(capsys, "predict", "--checkpoint", checkpoint, "--input", data / "manifest.json", "--out",
                  tmp_path / "out", "--device", "cpu", "--continue-on-error")
    assert rc == 1 and str(bad) in err and "checksum" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"C{i}" for i in range(4) if f"C{i}" != case)


def test_predict_refuses_to_mix_two_models_in_one_folder(model, tmp_path, capsys):
    checkpoint, manifest = model
    out = tmp_path / "out"
    assert run(capsys, "predict", "--checkpoint", checkpoint, "--input", manifest, "--out", out, "--device", "cpu")[0] == 0
    other = save_checkpoint({**load_checkpoint(checkpoint), "run_id": "another-run"}, tmp_path / "other.pt")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, err = run(capsys, "predict", "--checkpoint", other, "--input", manifest, "--out", out, "--device", "cpu")
    assert rc == 2 and "already holds a prediction of another model or run" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_evaluate_names_a_4d_prediction_and_scores_the_other_cases(model, tmp_path, capsys):
    _, manifest = model
    from medseg_diff.data.manifest import load_manifest

    m = load_manifest(manifest)
    folder = tmp_path / "preds"
    folder.mkdir()
    tests = [c for c in m.cases if c.subset == "test"] + [c for c in m.cases if c.subset == "train"][:1]
    for case in tests:
        img = nib.load(str(m.path_of(case.label)))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(folder / f"{case.id}.nii.gz"))
    bad = folder / f"{tests[0].id}.nii.gz"
    img = nib.load(str(bad))
    nib.save(nib.Nifti1Image(np.stack([np.asarray(img.dataobj)] * 2, -1), img.affine), str(bad))
    rc, err = run(capsys, "evaluate", "--manifest", manifest, "--predictions", f"tool={folder}", "--out",
                  tmp_path / "eval", "--no-tracking", "--subset", "all", "--continue-on-error")
    assert rc == 1 and str(bad) in err and "must be 3D" in err
    assert (tmp_path / "eval" / "per_case.csv").is_file()


def test_evaluate_on_a_manifest_without_test_cases_says_how_to_hold_cases_out(tmp_path, capsys):
    root = tmp_path / "data"
    for i in range(2):
        write_case(root, f"C{i}", seed=i)
    manifest = write_manifest(build_manifest(root, folds=2, test_fraction=0.0), root / "m.json")
    rc, err = run(capsys, "evaluate", "--manifest", manifest, "--predictions", f"x={root}", "--out",
                  tmp_path / "eval", "--no-tracking")
    assert rc == 2 and "--test-fraction" in err and str(manifest) in err and not (tmp_path / "eval").exists()


# --- faults -------------------------------------------------------------------------------------------------


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one_and_no_temporary(tmp_path, monkeypatch):
    import errno

    import medseg_diff.checkpoint as checkpoint

    good = save_checkpoint({"epoch": 1}, tmp_path / "best.pt")
    before = good.read_bytes()

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"epoch": 2}, tmp_path / "best.pt")
    assert good.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_a_full_disk_on_one_case_under_continue_on_error_finishes_the_others(model, tmp_path, capsys, monkeypatch):
    import errno

    import medseg_diff.stages.predict as predict_stage

    checkpoint, manifest = model
    real = predict_stage.write_prediction
    calls = []

    def full_once(pred, folder, *args, **kwargs):
        calls.append(pred.case_id)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "x.nii.gz"))
        return real(pred, folder, *args, **kwargs)

    monkeypatch.setattr(predict_stage, "write_prediction", full_once)
    rc, err = run(capsys, "predict", "--checkpoint", checkpoint, "--input", manifest, "--out", tmp_path / "out",
                  "--device", "cpu", "--continue-on-error")
    assert rc == 1 and f"FAIL {calls[0]}:" in err and "No space left on device" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(c for c in calls[1:])  # nothing staged left


def test_a_4d_label_map_in_a_data_folder_is_named_and_the_other_cases_are_predicted(model, tmp_path, capsys):
    checkpoint, _ = model
    data = tmp_path / "data"
    write_case(data, "G1", seed=1)
    folder = write_case(data, "G2", seed=2)
    seg = folder / "G2_seg.nii.gz"
    img = nib.load(str(seg))
    nib.save(nib.Nifti1Image(np.stack([np.asarray(img.dataobj)] * 2, -1), img.affine), str(seg))
    rc, err = run(capsys, "predict", "--checkpoint", checkpoint, "--input", data, "--out", tmp_path / "out",
                  "--device", "cpu", "--continue-on-error")
    assert rc == 1 and str(seg) in err and "must be 3D" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["G1"]


def test_an_unreachable_tracking_server_is_one_line_and_status_1(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manifest = _dataset(tmp_path / "data")
    cfg = _config(manifest, tmp_path / "run", tmp_path / "c.yaml", tracking={"enabled": True,
                                                                             "uri": f"http://127.0.0.1:{port}"})
    rc, err = run(capsys, "train", "--config", cfg)
    assert rc == 1 and f"127.0.0.1:{port} does not answer" in err and "tracking.uri" in err


# --- found by replaying bad inputs through the CLI -------------------------------------------------------------


def test_a_conflicting_folder_is_refused_before_any_case_is_written(model, tmp_path, capsys):
    checkpoint, manifest = model
    out = tmp_path / "out"
    assert run(capsys, "predict", "--checkpoint", checkpoint, "--input", manifest, "--subset", "test", "--out", out,
               "--device", "cpu")[0] == 0
    other = save_checkpoint({**load_checkpoint(checkpoint), "run_id": "another-run"}, tmp_path / "other.pt")
    before = sorted(p.name for p in out.iterdir())
    rc, err = run(capsys, "predict", "--checkpoint", other, "--input", manifest, "--out", out, "--device", "cpu")
    assert rc == 2 and "already holds a prediction" in err
    assert sorted(p.name for p in out.iterdir()) == before  # no case of the other model was written first


@pytest.mark.parametrize("flag, value, text", [("--steps", "0", "'--steps': must be >= 1"),
                                               ("--overlap", "1.5", "'--overlap': must be in [0, 1)"),
                                               ("--device", "banana", "'--device': unknown device 'banana'")])
def test_predict_flags_are_named(model, tmp_path, capsys, flag, value, text):
    checkpoint, manifest = model
    rc, err = run(capsys, "predict", "--checkpoint", checkpoint, "--input", manifest, "--out", tmp_path / "out",
                  flag, value)
    assert rc == 2 and text in err and not (tmp_path / "out").exists()


def test_export_blames_a_bad_label_on_the_prediction_not_the_input(model, tmp_path, capsys):
    checkpoint, manifest = model
    out = tmp_path / "preds"
    assert run(capsys, "predict", "--checkpoint", checkpoint, "--input", manifest, "--subset", "test", "--out", out,
               "--device", "cpu")[0] == 0
    seg = next(out.glob("*/*_seg.nii.gz"))
    img = nib.load(str(seg))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(seg))
    rc, err = run(capsys, "export", "--predictions", out, "--out", tmp_path / "ex")
    assert rc == 2 and str(seg) in err and "[7]" in err


def test_evaluate_names_a_test_case_without_a_label(model, tmp_path, capsys):
    _, manifest = model
    doc = __import__("json").loads(manifest.read_text(encoding="utf-8"))
    case = next(c for c in doc["cases"] if c["subset"] == "test")
    case["label"] = None
    edited = tmp_path / "m.json"
    doc["root"] = str(manifest.parent)
    edited.write_text(__import__("json").dumps(doc), encoding="utf-8")
    rc, err = run(capsys, "evaluate", "--manifest", edited, "--predictions", f"x={tmp_path}", "--out",
                  tmp_path / "ev", "--no-tracking")
    assert rc == 2 and case["id"] in err and "no label" in err


def test_synth_never_overwrites_and_checks_its_values_first(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep.txt").write_text("kept")
    rc, err = run(capsys, "synth", "--out", tmp_path / "s", "--cases", "1", "--spacing", "5")
    assert rc == 2 and "already holds files" in err and sorted(p.name for p in (tmp_path / "s").iterdir()) == ["keep.txt"]
    with pytest.raises(SystemExit) as exit_:  # argparse: status 2, names the option
        main(["synth", "--out", str(tmp_path / "t"), "--cases", "1", "--test-fraction", "2"])
    assert exit_.value.code == 2 and "--test-fraction" in capsys.readouterr().err and not (tmp_path / "t").exists()


# --- DICOM and DICOMweb -------------------------------------------------------------------------------


def _study(folder: Path, modalities=("t1", "t1ce", "t2", "flair")) -> Path:
    from factories import LPS_AFFINE, tiny_images, tiny_label
    from medseg_diff.data.conventions import BRATS2021
    from medseg_diff.dicom import write_phantom_study

    images = tiny_images(tiny_label((16, 16, 16), BRATS2021), BRATS2021)
    return write_phantom_study({m: (np.rint(images[m]).astype(np.int16), LPS_AFFINE) for m in modalities}, folder)


def test_dicom_study_with_a_modality_missing_lists_its_series(model, tmp_path, capsys):
    checkpoint, _ = model
    study = _study(tmp_path / "study", ("t1", "t1ce", "t2"))
    rc, text = run(capsys, "predict", "--checkpoint", checkpoint, "--input", study, "--out", tmp_path / "out")
    assert rc == 2 and str(study) in text and "no series matches flair" in text
    assert "'AX T1'" in text and "'T1 POST GD'" in text and "'AX T2'" in text  # the study's series, listed
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_bad_series_rule_file_is_named_before_the_model_loads(tmp_path, capsys):
    rule = tmp_path / "rule.yaml"
    rule.write_text("t1ce: ['(unclosed']\n")
    rc, text = run(capsys, "predict", "--checkpoint", tmp_path / "no-such.pt", "--input", tmp_path,
                   "--out", tmp_path / "out", "--series-rule", rule)
    assert rc == 2 and str(rule) in text and "no-such.pt" not in text


@pytest.mark.parametrize("args, problem", [
    (["--input", "IN", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", "1.2.3"], "either --input"),
    (["--dicomweb", "http://127.0.0.1:9/dicom-web"], "--dicomweb needs --study"),
])
def test_dicomweb_flags_that_do_not_go_together(args, problem, tmp_path, capsys):
    rc, text = run(capsys, "predict", "--checkpoint", tmp_path / "c.pt", "--out", tmp_path / "out", *args)
    assert rc == 2 and problem in text


def test_an_unreachable_pacs_is_named_with_the_study_and_nothing_is_written(model, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/dicom-web"
    checkpoint, _ = model
    out = tmp_path / "out"
    rc, text = run(capsys, "predict", "--checkpoint", checkpoint, "--dicomweb", url, "--study", "1.2.840.99.1",
                   "--out", out)
    assert rc == 1 and url in text and "1.2.840.99.1" in text
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


# --- one writer per output folder ---------------------------------------------------------------------------


def _lock_file(path: Path, pid: int) -> Path:
    import json
    import socket

    from medseg_diff.ownership import _process_start

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 1.7e9, "command": "evaluate …",
                                "process_start": _process_start(pid), "token": "theirs"}), encoding="utf-8")
    return path


def _evaluate(capsys, manifest, out):
    from medseg_diff.data.manifest import load_manifest

    m = load_manifest(manifest)
    preds = out.parent / "preds"
    preds.mkdir(exist_ok=True)
    for case in m.cases:
        img = nib.load(str(m.path_of(case.label)))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(preds / f"{case.id}.nii.gz"))
    return run(capsys, "evaluate", "--manifest", manifest, "--predictions", f"tool={preds}", "--out", out,
               "--no-tracking", "--subset", "all")


def test_a_second_evaluate_into_a_live_output_folder_is_refused_naming_the_holder(model, tmp_path, capsys,
                                                                                   live_pid):
    _, manifest = model
    out = tmp_path / "eval"
    assert _evaluate(capsys, manifest, out)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    lock = _lock_file(out / ".medseg-diff.lock", live_pid)
    rc, err = _evaluate(capsys, manifest, out)
    assert rc == 2 and f"pid {live_pid}" in err and "being written by another run" in err and str(out) in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p != lock} == before  # nothing replaced
    assert lock.is_file()  # the holder's lock stays


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_note(model, tmp_path, capsys, caplog):
    _, manifest = model
    out = tmp_path / "eval"
    _lock_file(out / ".medseg-diff.lock", dead_pid())
    rc, _ = _evaluate(capsys, manifest, out)
    assert rc == 0 and (out / "per_case.csv").is_file() and not (out / ".medseg-diff.lock").exists()
    assert any("is no longer running" in r.getMessage() for r in caplog.records)


def test_export_into_a_live_folder_is_refused(model, tmp_path, capsys, live_pid):
    checkpoint, manifest = model
    preds = tmp_path / "preds"
    assert run(capsys, "predict", "--checkpoint", checkpoint, "--input", manifest, "--subset", "test", "--out",
               preds, "--device", "cpu")[0] == 0
    _lock_file(tmp_path / "overlays" / ".medseg-diff.lock", live_pid)
    rc, err = run(capsys, "export", "--predictions", preds, "--out", tmp_path / "overlays")
    assert rc == 2 and f"pid {live_pid}" in err
    assert [p.name for p in (tmp_path / "overlays").iterdir()] == [".medseg-diff.lock"]


def test_predict_never_writes_a_case_another_live_run_holds_nor_removes_its_staging(model, tmp_path, capsys,
                                                                                   live_pid):
    from medseg_diff.data.manifest import load_manifest

    checkpoint, manifest = model
    out = tmp_path / "out"
    first = load_manifest(manifest).cases[0].id
    _lock_file(out / f".{first}.lock", live_pid)
    import socket

    from medseg_diff.ownership import _host_hash

    theirs = out / f".{first}.partial-{live_pid}-{_host_hash()}-0123abcd"  # a live run's staging
    theirs.mkdir()
    left = out / f".{first}.partial-{dead_pid()}-{_host_hash()}-4567abcd"  # a killed run's staging
    left.mkdir()
    rc, err = run(capsys, "predict", "--checkpoint", checkpoint, "--input", manifest, "--out", out, "--device", "cpu",
                  "--continue-on-error")
    assert rc == 1 and f"case {first}" in err and f"pid {live_pid}" in err
    assert theirs.is_dir() and not left.exists()
    assert not (out / first).exists() and sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        sorted(c.id for c in load_manifest(manifest).cases if c.id != first)
    assert socket.gethostname()  # the locks name this host


def test_of_runs_starting_together_exactly_one_gets_the_folder(tmp_path):
    """Eight processes race for one output folder: one holds it, seven are refused naming it (O_EXCL, no window)."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom medseg_diff.ownership import folder_lock, BusyError\n"
            "try:\n    lock = folder_lock(sys.argv[1]).acquire()\nexcept BusyError as e:\n    print('refused', e)\n"
            "else:\n    print('held')\n    time.sleep(3)\n    lock.release()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sum(o.startswith("held") for o in outs) == 1
    assert all("being written by another run" in o for o in outs if o.startswith("refused"))
    assert not (tmp_path / "out" / ".medseg-diff.lock").exists()  # released by its holder


def test_a_lock_its_writer_never_filled_is_taken_over_once_old(tmp_path, caplog):
    """A run killed between creating its lock file and writing it leaves it empty: refused while it may still be
    being written, taken over once it is older than ``UNWRITTEN_LOCK_S``."""
    from medseg_diff.errors import DataError
    from medseg_diff.ownership import FOLDER_LOCK, UNWRITTEN_LOCK_S, folder_lock

    lock = tmp_path / "out" / FOLDER_LOCK
    lock.parent.mkdir()
    lock.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="being written by another run"):
        folder_lock(tmp_path / "out").acquire()
    old = lock.stat().st_mtime - 2 * UNWRITTEN_LOCK_S
    os.utime(lock, (old, old))
    held = folder_lock(tmp_path / "out").acquire()
    assert any("left empty or unreadable" in r.getMessage() for r in caplog.records)
    held.release()
    assert not lock.exists()
