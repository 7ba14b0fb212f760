"""``medseg-diff predict``: outputs on the input's exact grid (real LPS and RAS BraTS cases), BraTS labels of
the input's convention, bad cases skipped and named (``--continue-on-error``), nothing already written lost,
and external mask priors (``prior_source: external`` + ``--prior-dir``)."""

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from factories import LPS_AFFINE, REAL_DATA, save, tiny_config, write_case
from medseg_diff.cli import main
from medseg_diff.config import config_from_dict
from medseg_diff.data.conventions import BRATS2021, BRATS2023
from medseg_diff.stages.options import Cases, Sampling, Writing
from medseg_diff.stages.predict import predict_cases
from medseg_diff.training.run import train
from medseg_diff.errors import ConfigError, DataError

REAL_CASES = {"BraTS-GLI-00001-000": ("L", "P", "S"), "BraTS-GLI-99999-000": ("L", "P", "S"),
              "BraTS-MET-00110-000": ("R", "A", "S")}
OUTPUTS = ("seg", "uncertainty", "variance", "attention_self", "attention_cross", "probabilities")
FAST = ["--steps", "1", "--ensemble", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(phantoms, tmp_path_factory) -> dict[str, Path]:
    """best.pt of three tiny models trained once on the phantoms, resampling to 5 mm (``data.spacing`` is
    stored in the checkpoint, so a 240x240x155 volume is predicted on a 48x48x31 grid):
    the diffusion model, the U-Net baseline, and a diffusion model with ``prior_source: external``."""
    root = tmp_path_factory.mktemp("predict_models")
    sections = dict(data={"spacing": [5.0, 5.0, 5.0], "max_val_cases": 0}, train={"epochs": 1, "steps_per_epoch": 1},
                    infer={"roi_size": [32, 32, 32], "sw_batch_size": 2})
    external = tiny_config(phantoms, root / "external", "diffusion", **sections).to_dict()
    external["model"]["denoiser"]["prior_source"] = "external"
    configs = {
        "diffusion": tiny_config(phantoms, root / "diffusion", "diffusion", **sections),
        "unet": tiny_config(phantoms, root / "unet", "unet", **sections),
        "external": config_from_dict(external),
    }
    for cfg in configs.values():
        train(cfg)
    return {name: root / name / "best.pt" for name in configs}


# --- real cases: exact grid, 2023 labels --------------------------------------------------------------


@pytest.fixture(scope="module")
def real_predictions(models, tmp_path_factory) -> Path:
    """The three real cases predicted once by the tiny diffusion model through the CLI."""
    if not (REAL_DATA / "BraTS-GLI-99999-000").is_dir():
        pytest.skip(f"real BraTS cases not found at {REAL_DATA} (../shared is absent in a user's clone)")
    out = tmp_path_factory.mktemp("real_predictions")
    assert main(["predict", "--checkpoint", str(models["diffusion"]), "--input", str(REAL_DATA), "--out", str(out),
                 "--steps", "1", "--ensemble", "1", "--device", "cpu"]) == 0
    return out


def _bounding_box(mask: np.ndarray) -> np.ndarray:
    return np.array([(int(i.min()), int(i.max())) for i in np.nonzero(mask)])  # [3, (first, last)]


@pytest.mark.real_data
@pytest.mark.parametrize("case", sorted(REAL_CASES))
def test_real_case_outputs_have_the_input_grid(real_data, real_predictions, case):
    """Every output has exactly the shape, affine, sform/qform (matrices and codes) of the input, for the LPS
    (BraTS-GLI) and the RAS (BraTS-MET) case alike, and the maps cover the head, not a mirror image of it."""
    ref = nib.load(real_data / case / f"{case}-t1c.nii.gz")
    assert nib.aff2axcodes(ref.affine) == REAL_CASES[case]
    folder = real_predictions / case
    for name in OUTPUTS:
        out = nib.load(folder / f"{case}_{name}.nii.gz")
        assert out.shape == ref.shape + ((3,) if name == "probabilities" else ()), name
        np.testing.assert_array_equal(out.affine, ref.affine, err_msg=name)
        np.testing.assert_array_equal(out.header.get_sform(), ref.header.get_sform(), err_msg=name)
        np.testing.assert_allclose(out.header.get_qform(), ref.header.get_qform(), atol=1e-5, err_msg=name)
        for code in ("sform_code", "qform_code"):
            assert int(out.header[code]) == int(ref.header[code]), (name, code)
    # outputs are zero outside the foreground crop: their support is the head's box (one 5 mm voxel of slack)
    head = np.stack([np.asanyarray(nib.load(p).dataobj) for p in sorted((real_data / case).glob(f"{case}-t*"))]) > 0
    support = nib.load(folder / f"{case}_uncertainty.nii.gz").get_fdata() > 0
    np.testing.assert_allclose(_bounding_box(support), _bounding_box(head.any(axis=0)), atol=6)


@pytest.mark.real_data
@pytest.mark.parametrize("case", sorted(REAL_CASES))
def test_real_case_labels_follow_the_2023_convention(real_data, real_predictions, case):
    folder = real_predictions / case
    seg = nib.load(folder / f"{case}_seg.nii.gz")
    labels = np.asanyarray(seg.dataobj)
    probs = np.moveaxis(nib.load(folder / f"{case}_probabilities.nii.gz").get_fdata(dtype=np.float32), -1, 0)
    assert seg.get_data_dtype() == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(labels, BRATS2023.from_regions(probs > 0.5))  # ET is written as 3, not 4
    assert probs.min() >= 0 and probs.max() <= 1
    uncertainty = nib.load(folder / f"{case}_uncertainty.nii.gz").get_fdata()
    assert np.isfinite(uncertainty).all() and uncertainty.min() >= 0 and uncertainty.max() <= 3 * np.log(2) + 1e-4
    for name in ("self", "cross"):
        image = nib.load(folder / f"{case}_attention_{name}.nii.gz")
        attention = image.get_fdata()
        # 1 = the map's 99.5th percentile in the head; its hottest voxels keep their values above 1, and the file's
        # display window is 0-1
        assert attention.min() >= 0 and attention.max() >= 1.0
        assert (float(image.header["cal_min"]), float(image.header["cal_max"])) == (0.0, 1.0)
    meta = json.loads((folder / "prediction.json").read_text(encoding="utf-8"))
    assert meta["convention"] == "brats2023" and meta["model_kind"] == "diffusion"
    assert ("label" in meta["inputs"]) == (real_data / case / f"{case}-seg.nii.gz").exists()


def test_lps_and_ras_copies_of_a_case_give_the_same_world_space_prediction(models, tmp_path):
    """The same scan stored LPS and RAS: the predictions differ only by the voxel order of their inputs."""
    lps = write_case(tmp_path / "data", "scan_lps", shape=(24, 24, 20), seed=4)
    for path in lps.iterdir():  # cut slabs off the head: a mirrored output could not pass for a right one
        image = nib.load(path)
        data = image.get_fdata(dtype=np.float32)
        data[:9] = 0
        data[:, :6] = 0
        save(data.astype(image.get_data_dtype()), path)
    ras = tmp_path / "data" / "scan_ras"
    ras.mkdir()
    for path in lps.iterdir():
        canonical = nib.as_closest_canonical(nib.load(path))
        nib.save(canonical, ras / path.name.replace("scan_lps", "scan_ras"))
    out = tmp_path / "out"
    predict_cases(models["diffusion"], tmp_path / "data", out, sampling=Sampling(device="cpu", sample_steps=1, ensemble=2))
    for name in ("uncertainty", "attention_self", "seg"):
        from_lps = nib.as_closest_canonical(nib.load(out / "scan_lps" / f"scan_lps_{name}.nii.gz"))
        from_ras = nib.load(out / "scan_ras" / f"scan_ras_{name}.nii.gz")
        np.testing.assert_array_equal(from_lps.affine, from_ras.affine)
        np.testing.assert_allclose(from_lps.get_fdata(), from_ras.get_fdata(), atol=1e-5, err_msg=name)
    support = nib.load(out / "scan_ras" / "scan_ras_uncertainty.nii.gz").get_fdata() > 0  # the foreground crop
    head = np.stack([nib.load(p).get_fdata() for p in sorted(ras.glob("scan_ras_t*"))]).any(axis=0)
    np.testing.assert_allclose(_bounding_box(support), _bounding_box(head), atol=3)  # 5 mm model grid, 2 mm input
    assert not np.array_equal(support, np.flip(support, axis=(0, 1)))


def test_prediction_folder_holds_variance_provenance_and_where_dice_came_from(models, tmp_path):
    """The diffusion model's member variance reaches the prediction folder (on the input grid) and the export; the
    folder records the checkpoint, its training data and the sampler; Dice says it was computed against the label
    file, not by an evaluation. The U-Net writes no variance and records no sampler."""
    from medseg_diff.predictions.folder import read_prediction
    from medseg_diff.stages.export import export_predictions, read_for_export

    data = tmp_path / "data"
    write_case(data, "V1", seed=15)
    predict_cases(models["diffusion"], data, tmp_path / "pred", sampling=Sampling(device="cpu", sample_steps=1, ensemble=2, seed=5))
    folder = tmp_path / "pred" / "V1"
    variance, reference = nib.load(folder / "V1_variance.nii.gz"), nib.load(data / "V1" / "V1_t1.nii.gz")
    assert variance.shape == reference.shape and np.array_equal(variance.affine, reference.affine)
    values = variance.get_fdata()
    assert values.min() >= 0 and values.max() <= 0.25  # population variance of probabilities
    meta = json.loads((folder / "prediction.json").read_text(encoding="utf-8"))
    provenance = meta["provenance"]
    assert provenance["model_kind"] == "diffusion" and provenance["checkpoint"] == str(models["diffusion"].absolute())
    assert (provenance["sample_steps"], provenance["ensemble"], provenance["seed"]) == (1, 2, 5)
    assert provenance["overlap"] == 0.25 and provenance["roi_size"] == [32, 32, 32]
    assert isinstance(provenance["epoch"], int) and provenance["training_manifest"]
    assert provenance["training_data"].startswith("synthetic BraTS-like phantoms (medseg-diff synth), 5 mm voxels")
    assert "'tiny-phantoms', 2 training cases" in provenance["training_data"]
    label = data / "V1" / "V1_seg.nii.gz"
    assert meta["dice_source"] == f"computed at predict time against the case's label file {label}"
    assert set(meta["dice"]) == {"TC", "WT", "ET"}
    overlay = read_for_export(folder)  # with Dice against the label file, as the export shows it
    np.testing.assert_allclose(overlay.variance, values)
    assert overlay.provenance.ensemble == 2 and str(label) in overlay.dice_source
    page = export_predictions([folder], tmp_path / "export").written[0].read_text(encoding="utf-8")
    assert (tmp_path / "export" / "V1" / "V1_variance.nii.gz").is_file()
    assert "evaluation" not in page.split("<h2>Agreement with ground truth</h2>")[1].split("<h2>")[0].replace(
        "not taken from an evaluation run", "")
    assert "<h2>Provenance</h2>" in page and "tiny-phantoms" in page and "DDIM, 1 step, 2 ensemble members" in page
    predict_cases(models["unet"], data, tmp_path / "unet", sampling=Sampling(device="cpu"))
    assert not (tmp_path / "unet" / "V1" / "V1_variance.nii.gz").exists()
    overlay, meta = read_prediction(tmp_path / "unet" / "V1")
    assert overlay.variance is None and meta.variance is False
    assert overlay.provenance.model_kind == "unet" and overlay.provenance.ensemble is None


# --- bad cases ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> tuple[Path, dict[str, tuple[Path, str]]]:
    """A data folder with one good case (first in order) and six bad ones: case -> (file to name, problem)."""
    data = tmp_path_factory.mktemp("bad") / "data"
    write_case(data, "A_good", seed=1)
    bad = {}
    folder = write_case(data, "B_truncated", seed=2)
    path = folder / "B_truncated_t2.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    bad["B_truncated"] = (path, "truncated or corrupt")
    folder = write_case(data, "C_missing", seed=3)
    (folder / "C_missing_flair.nii.gz").unlink()
    bad["C_missing"] = (folder, "missing modality flair")
    folder = write_case(data, "D_shape", seed=4)
    bad["D_shape"] = (save(np.ones((16, 16, 12), np.float32), folder / "D_shape_t1ce.nii.gz"),
                      r"shape \(16, 16, 12\) differs")
    folder = write_case(data, "E_affine", seed=5)
    shifted = LPS_AFFINE + np.array([[0, 0, 0, 4.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    path = folder / "E_affine_t2.nii.gz"
    bad["E_affine"] = (save(nib.load(path).get_fdata().astype(np.float32), path, shifted), "affine differs")
    folder = write_case(data, "F_nan", seed=6)
    bad["F_nan"] = (save(np.full((16, 16, 16), np.nan, np.float32), folder / "F_nan_t2.nii.gz"), "NaN")
    folder = write_case(data, "G_empty", seed=7)
    bad["G_empty"] = (save(np.zeros((16, 16, 16), np.float32), folder / "G_empty_flair.nii.gz"), r"empty \(all zero\)")
    return data, bad


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_continue_on_error_skips_and_names_each_bad_case(models, bad_folder, tmp_path, capsys):
    data, bad = bad_folder
    out = tmp_path / "out"
    (out / "Z_other").mkdir(parents=True)  # files from an earlier run are kept
    (out / "Z_other" / "Z_other_seg.nii.gz").write_bytes(b"from an earlier run")
    (out / "notes.txt").write_text("a radiologist's notes")
    before = _files(out)
    rc = main(["predict", "--checkpoint", str(models["diffusion"]), "--input", str(data), "--out", str(out),
               "--continue-on-error", *FAST])
    captured = capsys.readouterr()
    stdout = captured.out + captured.err  # per-case lines are logged on stderr, the summary printed on stdout
    assert rc == 1
    assert re.search(r"^ok   A_good ", stdout, re.M)
    for name in OUTPUTS:
        assert (out / "A_good" / f"A_good_{name}.nii.gz").is_file()
    for case, (path, problem) in bad.items():
        line = next((ln for ln in stdout.splitlines() if ln.startswith(f"FAIL {case}:")), None)
        assert line is not None, f"{case} not reported:\n{stdout}"
        assert str(path) in line and re.search(problem, line), line
    assert f"1 case(s) written, {len(bad)} failed" in stdout
    assert {p.name for p in out.iterdir()} == {"A_good", "Z_other", "notes.txt"}  # no staging folder left
    assert {k: v for k, v in _files(out).items() if not k.startswith("A_good/")} == before


def test_without_continue_on_error_the_first_bad_case_stops_the_run(models, bad_folder, tmp_path, capsys):
    data, bad = bad_folder
    truncated, _ = bad["B_truncated"]
    out = tmp_path / "out"
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        predict_cases(models["unet"], data, out, sampling=Sampling(device="cpu"))
    assert err.value.path == str(truncated) and err.value.case == "B_truncated"
    assert sorted(p.name for p in out.iterdir()) == ["A_good"]  # written before; nothing after the bad case
    rc = main(["predict", "--checkpoint", str(models["unet"]), "--input", str(data), "--out", str(tmp_path / "cli")])
    stderr = capsys.readouterr().err
    assert rc == 2 and f"case B_truncated: {truncated}: truncated or corrupt" in stderr
    assert "Traceback" not in stderr


def test_a_failed_case_leaves_its_earlier_outputs_untouched(models, tmp_path):
    """Predicting a case again after one of its files went bad fails, and loses nothing already written."""
    data = tmp_path / "data"
    folder = write_case(data, "P1", seed=8)
    out = tmp_path / "out"
    predict_cases(models["unet"], data, out, sampling=Sampling(device="cpu"))
    before = _files(out)
    assert "P1/P1_seg.nii.gz" in before and "P1/prediction.json" in before
    t2 = folder / "P1_t2.nii.gz"
    t2.write_bytes(t2.read_bytes()[:200])
    with pytest.raises(DataError, match=re.escape(str(t2))):
        predict_cases(models["unet"], data, out, sampling=Sampling(device="cpu"))
    report = predict_cases(models["unet"], data, out, sampling=Sampling(device="cpu"), writing=Writing(continue_on_error=True))
    assert report.written == [] and list(report.failed) == ["P1"]
    assert _files(out) == before  # same names (no temporaries left) and same bytes


def test_another_models_prediction_is_refused_unless_overwrite_which_replaces_the_folder_whole(models, tmp_path):
    """The U-Net predicting into a folder that holds a diffusion prediction is refused, naming the folder; with
    --overwrite the case folder is replaced whole, so the diffusion model's attention maps do not stay behind."""
    from medseg_diff.predictions.folder import read_prediction

    write_case(tmp_path / "data", "R1", seed=12)
    out = tmp_path / "out"
    predict_cases(models["diffusion"], tmp_path / "data", out, sampling=Sampling(device="cpu", sample_steps=1, ensemble=1))
    assert read_prediction(out / "R1")[0].attention.keys() == {"self", "cross"}
    before = _files(out)
    with pytest.raises(DataError, match=r"R1: already holds a prediction of another model or run .*--overwrite"):
        predict_cases(models["unet"], tmp_path / "data", out, sampling=Sampling(device="cpu"))
    assert _files(out) == before  # refused before anything was written
    # the same model again is no conflict (a rerun after an interruption)
    predict_cases(models["diffusion"], tmp_path / "data", out, sampling=Sampling(device="cpu", sample_steps=1, ensemble=1))
    predict_cases(models["unet"], tmp_path / "data", out, sampling=Sampling(device="cpu"), writing=Writing(overwrite=True))
    overlay, meta = read_prediction(out / "R1")
    assert meta.model_kind == "unet" and overlay.attention == {}
    assert not list((out / "R1").glob("*attention*")) and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_folder_of_foreign_files_and_the_input_folder_are_refused(models, tmp_path, capsys):
    data = tmp_path / "data"
    write_case(data, "F1", seed=13)
    out = tmp_path / "out"
    (out / "F1").mkdir(parents=True)
    (out / "F1" / "notes.txt").write_text("not ours")
    with pytest.raises(DataError, match=r"F1: already holds files that are not a medseg-diff prediction"):
        predict_cases(models["unet"], data, out, sampling=Sampling(device="cpu"))
    assert (out / "F1" / "notes.txt").read_text() == "not ours"
    with pytest.raises(DataError, match="holds this case's input files"):  # --out = the data folder itself
        predict_cases(models["unet"], data, data, sampling=Sampling(device="cpu"), writing=Writing(overwrite=True))
    assert sorted(p.name for p in (data / "F1").iterdir()) == sorted(
        f"F1_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))


def test_what_a_killed_run_left_is_removed_by_the_next_one(models, tmp_path):
    write_case(tmp_path / "data", "K1", seed=14)
    out = tmp_path / "out"
    (out / ".K1.partial-deadbeef").mkdir(parents=True)  # a case folder being staged when the run was killed
    (out / ".K1.partial-deadbeef" / "K1_seg.nii.gz").write_bytes(b"half")
    (out / "K0").mkdir()
    (out / "K0" / ".K0_seg.nii.gz.1234.partial").write_bytes(b"half")  # a file being staged
    (out / "K0" / "keep.txt").write_text("kept")
    predict_cases(models["unet"], tmp_path / "data", out, sampling=Sampling(device="cpu"))
    assert sorted(p.name for p in out.iterdir()) == ["K0", "K1"]
    assert sorted(p.name for p in (out / "K0").iterdir()) == ["keep.txt"]


# --- external mask priors -----------------------------------------------------------------------------


def test_external_prior_model_without_prior_dir_fails_clearly(models, tmp_path, capsys):
    write_case(tmp_path / "data", "X1", seed=9)
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(models["external"]), "--input", str(tmp_path / "data"),
               "--out", str(out), "--continue-on-error", *FAST])
    stderr = capsys.readouterr().err
    assert rc == 2 and "prior_source=external" in stderr and "--prior-dir" in stderr
    assert str(models["external"]) in stderr
    assert not out.exists()
    with pytest.raises(DataError, match="takes no external prior"):  # and the converse: a prior for a U-Net
        predict_cases(models["unet"], tmp_path / "data", out, sampling=Sampling(device="cpu"), cases=Cases(prior_dir=tmp_path / "data"))


def test_external_prior_from_the_baselines_prediction_folders(models, tmp_path):
    """``--prior-dir`` pointing at the baseline's predictions: each case's ``CASE/CASE_seg.nii.gz`` is the
    prior, and the cross-attention follows it (another outline moves it)."""
    data = tmp_path / "data"
    write_case(data, "X1", shape=(24, 24, 20), seed=10)
    write_case(data, "X2", shape=(24, 24, 20), seed=11)
    baseline = tmp_path / "unet_predictions"
    assert main(["predict", "--checkpoint", str(models["unet"]), "--input", str(data), "--out", str(baseline),
                 "--device", "cpu"]) == 0
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(models["external"]), "--input", str(data), "--out", str(out),
                 "--prior-dir", str(baseline), *FAST]) == 0
    for case in ("X1", "X2"):
        meta = json.loads((out / case / "prediction.json").read_text(encoding="utf-8"))
        assert meta["inputs"]["prior"] == str(baseline / case / f"{case}_seg.nii.gz")
        seg = nib.load(out / case / f"{case}_seg.nii.gz")
        np.testing.assert_array_equal(seg.affine, nib.load(data / case / f"{case}_t1.nii.gz").affine)
        assert set(np.unique(np.asanyarray(seg.dataobj))) <= set(BRATS2021.labels)
    # another outline for X1 (its reference segmentation, in a flat folder of CASE_seg.nii.gz); none for X2
    others = tmp_path / "reference_priors"
    others.mkdir()
    shutil.copy(data / "X1" / "X1_seg.nii.gz", others / "X1_seg.nii.gz")
    report = predict_cases(models["external"], data, tmp_path / "out_other", sampling=Sampling(device="cpu", sample_steps=1, ensemble=2), cases=Cases(prior_dir=others), writing=Writing(continue_on_error=True))
    assert [p.name for p in report.written] == ["X1"]
    assert "no prior for this case" in report.failed["X2"] and str(others) in report.failed["X2"]
    baseline_mask = nib.load(baseline / "X1" / "X1_seg.nii.gz").get_fdata()
    assert not np.array_equal(baseline_mask, nib.load(others / "X1_seg.nii.gz").get_fdata())
    cross = nib.load(out / "X1" / "X1_attention_cross.nii.gz").get_fdata()
    cross_other = nib.load(tmp_path / "out_other" / "X1" / "X1_attention_cross.nii.gz").get_fdata()
    # the other outline reaches the cross-attention map: the difference is far above float32 rounding (~1e-7),
    # though small for a model trained one step, whose attention weights hardly depend on the tokens yet (1e-4)
    assert np.abs(cross - cross_other).max() > 1e-5


def test_post_processing_is_applied_to_the_labels_only_and_recorded(models, tmp_path):
    """``--min-lesion-mm3`` larger than any lesion empties the label map; the probabilities stay exactly what the
    model gave, and prediction.json says what was done."""
    import json

    data = tmp_path / "data"
    write_case(data, "Q1", seed=21)
    plain, cleaned = tmp_path / "plain", tmp_path / "cleaned"
    predict_cases(models["unet"], data, plain, Sampling(device="cpu"))
    predict_cases(models["unet"], data, cleaned, Sampling(device="cpu", min_lesion_mm3=1e12))
    seg = nib.load(cleaned / "Q1" / "Q1_seg.nii.gz").get_fdata()
    assert not seg.any() and nib.load(plain / "Q1" / "Q1_seg.nii.gz").get_fdata().any()
    for name in ("Q1_probabilities.nii.gz", "Q1_uncertainty.nii.gz"):
        assert (plain / "Q1" / name).read_bytes() == (cleaned / "Q1" / name).read_bytes()
    done = json.loads((cleaned / "Q1" / "prediction.json").read_text())["postprocess"]
    assert done["min_lesion_mm3"] == 1e12 and done["lesions_removed"] >= 1 and done["voxels_removed"] > 0
    with pytest.raises(ConfigError, match="--min-enhancing-mm3"):
        predict_cases(models["unet"], data, tmp_path / "bad", Sampling(device="cpu", min_enhancing_mm3=-1))
