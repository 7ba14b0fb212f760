"""Input that looks valid but is wrong -- or right in a way the pipeline used to get wrong -- through the command a
user would run (``check``, ``predict``):

1. intensities of any sign and type: a z-scored copy, a copy shifted by -10000 and an int8-rescaled copy of a case
   are segmented as the case itself, and every integer / float NIfTI voxel type is read the same way;
2. images with several values per voxel (RGB24, a vector intent, a 4D image where one modality is expected, a
   multi-component MetaImage) are refused by name;
3. geometry the model cannot use is refused by name: too few slices (in the file or on the model's grid), sform and
   qform that disagree, voxels far coarser than the model's.

Refusals: a non-zero exit status (``check``: 1, problems found; ``predict``: 2), one line naming the file and the
problem, no traceback.
"""

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from factories import REAL_DATA, save, tiny_config, write_case, run_cli as run
from medseg_diff.data.conventions import BRATS2021, MODALITIES
from medseg_diff.data.manifest import build_manifest, write_manifest

SUFFIXES = dict(zip(MODALITIES, BRATS2021.modality_suffixes))


def _line(text: str, path: Path, only: bool = True) -> str:
    """The line of ``text`` that names ``path``: the only one (``only``), else the first (``--continue-on-error``
    names a failed case twice: as it fails, and in the summary at the end)."""
    lines = [line for line in text.splitlines() if str(path) in line]
    assert len(lines) == 1 if only else lines, text
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny U-Net (2 mm, 16³ windows) trained for 16 steps on four 16³ cases (about a second; enough for
    probabilities that are mostly decisive, so that labels can be compared): its checkpoint."""
    from medseg_diff.training.run import train

    root = tmp_path_factory.mktemp("intensity_model")
    for i in range(4):
        write_case(root / "data", f"C{i}", seed=i)
    manifest = write_manifest(build_manifest(root / "data", folds=2, test_fraction=0.25, seed=0),
                              root / "data" / "manifest.json")
    train(tiny_config(manifest, root / "run", "unet", train={"epochs": 4, "steps_per_epoch": 4, "lr": 1e-2},
                      data={"max_val_cases": 0}))
    return root / "run" / "best.pt"


def _predict(capsys, checkpoint: Path, data: Path, out: Path, *extra) -> tuple[int, str]:
    return run(capsys, "predict", "--checkpoint", checkpoint, "--input", data, "--out", out, "--device", "cpu", *extra)


def _outputs(out: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(nib.load(str(out / case / f"{case}_seg.nii.gz")).dataobj)
    probs = np.asarray(nib.load(str(out / case / f"{case}_probabilities.nii.gz")).dataobj, dtype=np.float32)
    return labels, probs


def _modality_files(folder: Path, case: str) -> dict[str, Path]:
    return {m: folder / f"{case}_{s}.nii.gz" for m, s in SUFFIXES.items()}


def _rewrite(folder: Path, case: str, change, modalities=MODALITIES) -> None:
    """Replace each modality ``m`` of ``modalities`` by ``change(values float64)`` (its dtype is kept as returned)."""
    for m, path in _modality_files(folder, case).items():
        if m in modalities:
            img = nib.load(str(path))
            values = change(np.asarray(img.dataobj, dtype=np.float64))
            nib.save(nib.Nifti1Image(values, img.affine), str(path))


def _integer_case(root: Path, case: str, shape=(32, 32, 32)) -> Path:
    """A case whose modalities hold integers in 0..127 (exactly representable in every voxel type), zero outside
    the head, as a skull-stripped BraTS case."""
    folder = write_case(root, case, shape=shape, seed=3)
    _rewrite(folder, case, lambda v: np.rint(v * 127.0 / v.max()).astype(np.int16))
    return folder


# --- 1. intensities of any sign and type ----------------------------------------------------------------------


def _copy_case(src: Path, root: Path, case: str) -> Path:
    folder = root / case
    folder.mkdir(parents=True)
    old = src.name
    for path in src.iterdir():
        (folder / path.name.replace(old, case)).write_bytes(path.read_bytes())
    return folder


def test_zscored_shifted_and_int8_copies_are_segmented_as_the_case(model, tmp_path, capsys):
    """A z-scored copy (background < 0), a copy shifted by -10000 (was: refused as "t1 image is empty inside the
    head") and a copy rescaled to int8 (-128 ... 127; was: a different segmentation) give the same segmentation and
    probabilities as the case itself: the background is the dominant border value, of either sign, and the head
    what differs from it."""
    data = tmp_path / "data"
    ref = write_case(data, "REF", shape=(32, 32, 32), seed=3)  # float32, background exactly 0
    _rewrite(_copy_case(ref, data, "ZSC"), "ZSC", lambda v: ((v - v.mean()) / v.std()).astype(np.float32))
    _rewrite(_copy_case(ref, data, "SHIFT"), "SHIFT", lambda v: (v - 10000.0).astype(np.float32))
    _rewrite(_copy_case(ref, data, "INT8"), "INT8",
             lambda v: np.rint((v - v.min()) / (v.max() - v.min()) * 255.0 - 128.0).astype(np.int8))
    _rewrite(_copy_case(ref, data, "T1INT8"), "T1INT8",
             lambda v: np.rint((v - v.min()) / (v.max() - v.min()) * 255.0 - 128.0).astype(np.int8), ("t1",))
    assert nib.load(str(data / "INT8" / "INT8_t1.nii.gz")).get_data_dtype() == np.int8
    assert np.asarray(nib.load(str(data / "INT8" / "INT8_t1.nii.gz")).dataobj).min() == -128
    rc, err = _predict(capsys, model, data, tmp_path / "out")
    assert rc == 0, err
    labels, probs = _outputs(tmp_path / "out", "REF")
    assert (labels > 0).sum() > 100 and probs.max() > 0.5  # a segmentation worth comparing
    # int8 keeps 256 levels: the rounding moves probabilities by < 0.01 and may flip a voxel that sits on 0.5
    for case, atol in (("ZSC", 1e-4), ("SHIFT", 1e-4), ("INT8", 0.01), ("T1INT8", 0.01)):
        other_labels, other_probs = _outputs(tmp_path / "out", case)
        assert (other_labels == labels).mean() >= 0.999, case
        np.testing.assert_allclose(other_probs, probs, atol=atol, err_msg=case)
    for case in ("ZSC", "SHIFT"):  # float copies: the same labels, voxel for voxel
        np.testing.assert_array_equal(_outputs(tmp_path / "out", case)[0], labels, err_msg=case)


def test_every_integer_and_float_voxel_type_is_read_the_same_way(model, tmp_path, capsys):
    """The same integer values stored as int8, uint8, int16, uint16, int32, float32 and float64 -- and an int8 copy
    shifted to -128 ... -1 -- give identical outputs."""
    data = tmp_path / "data"
    ref = _integer_case(data, "REF")
    dtypes = (np.int8, np.uint8, np.uint16, np.int32, np.float32, np.float64)
    for dtype in dtypes:
        case = f"T{np.dtype(dtype).name.upper()}"
        _rewrite(_copy_case(ref, data, case), case, lambda v, d=dtype: v.astype(d))
        assert nib.load(str(data / case / f"{case}_t1.nii.gz")).get_data_dtype() == dtype
    _rewrite(_copy_case(ref, data, "SIGNED"), "SIGNED", lambda v: (v - 128).astype(np.int8))
    rc, err = _predict(capsys, model, data, tmp_path / "out")
    assert rc == 0, err
    labels, probs = _outputs(tmp_path / "out", "REF")
    assert (labels > 0).sum() > 100
    for case in [f"T{np.dtype(d).name.upper()}" for d in dtypes] + ["SIGNED"]:
        other_labels, other_probs = _outputs(tmp_path / "out", case)
        np.testing.assert_array_equal(other_labels, labels, err_msg=case)
        np.testing.assert_allclose(other_probs, probs, atol=1e-5, err_msg=case)


def test_zscored_noisy_air_gives_the_same_head_as_the_original():
    """Noisy air (Rayleigh, σ 2) that z-scoring pushes below 0: the same head mask and normalised image as the
    original, whose air is >= 0. A clean case with a few negative voxels inside the head stays untouched."""
    import torch

    from medseg_diff.data.transforms import HEAD, IMAGE, SuppressBackgroundd, head_mask

    rng = np.random.default_rng(0)
    shape = (32, 30, 28)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    head = (((grid - np.array([15.0, 14.0, 13.5])[:, None, None, None])
             / np.array([9.0, 8.0, 7.0])[:, None, None, None]) ** 2).sum(0) < 1
    air = np.hypot(rng.normal(0, 2, (4, *shape)), rng.normal(0, 2, (4, *shape)))
    tissue = 100.0 + 30 * np.arange(4)[:, None, None, None] + rng.normal(0, 4, (4, *shape))
    channels = np.where(head, tissue, air).astype(np.float32)
    zscored = np.stack([(c - c.mean()) / c.std() for c in channels]).astype(np.float32)
    assert (zscored[:, ~head] < 0).mean() > 0.9
    step = SuppressBackgroundd(mask_key=HEAD)
    a, b = step({IMAGE: torch.as_tensor(channels)}), step({IMAGE: torch.as_tensor(zscored)})
    np.testing.assert_array_equal(a[HEAD], head)
    np.testing.assert_array_equal(b[HEAD], head)
    for x, y in zip(np.asarray(a[IMAGE]), np.asarray(b[IMAGE])):
        inside_x, inside_y = x[head], y[head]
        np.testing.assert_allclose((inside_y - inside_y.mean()) / inside_y.std(),
                                   (inside_x - inside_x.mean()) / inside_x.std(), atol=1e-3)
        assert (y[~head] == 0).all()
    clean = np.where(head, tissue, 0.0).astype(np.float32)
    clean[:, 15, 14, 13] = -3.0  # interpolation undershoot inside a skull-stripped brain
    out = SuppressBackgroundd()({IMAGE: clean})
    assert out[IMAGE] is clean and head_mask(clean).sum() == head.sum()


def test_a_constant_modality_is_named_as_constant(model, tmp_path, capsys):
    data = tmp_path / "data"
    folder = write_case(data, "K1", seed=1)
    flair = folder / "K1_flair.nii.gz"
    save(np.full((16, 16, 16), -10000.0, np.float32), flair)
    rc, err = _predict(capsys, model, data, tmp_path / "out")
    assert rc == 2 and "is constant (every voxel is -10000)" in _line(err, flair)


# --- 2. one scalar value per voxel ----------------------------------------------------------------------------


def _rgb(path: Path) -> None:
    img = nib.load(str(path))
    values = np.clip(np.asarray(img.dataobj), 0, 255).astype(np.uint8)
    rgb = np.zeros(values.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for c in "RGB":
        rgb[c] = values
    nib.save(nib.Nifti1Image(rgb, img.affine), str(path))


def _vector_intent(path: Path) -> None:
    img = nib.load(str(path))
    out = nib.Nifti1Image(np.stack([np.asarray(img.dataobj)] * 3, -1)[..., None, :], img.affine)
    out.header.set_intent("vector")
    nib.save(out, str(path))


def _four_d(path: Path) -> None:
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.stack([np.asarray(img.dataobj)] * 3, -1), img.affine), str(path))


def _mha_vector(folder: Path) -> Path:
    """The case as MetaImages, its T1 with 3 components per voxel; returns the T1 file."""
    import SimpleITK as sitk

    for path in sorted(folder.glob("*.nii.gz")):
        values = np.transpose(np.asarray(nib.load(str(path)).dataobj), (2, 1, 0))
        if path.name.endswith("_t1.nii.gz"):
            image = sitk.GetImageFromArray(np.stack([values] * 3, -1), isVector=True)
        else:
            image = sitk.GetImageFromArray(values)
        sitk.WriteImage(image, str(path).replace(".nii.gz", ".mha"))
        path.unlink()
    return next(folder.glob("*_t1.mha"))


MULTI = "multi-component (RGB/vector) image; expected one scalar value per voxel"


@pytest.mark.parametrize("kind, detail", [("rgb24", "data type RGB24"), ("vector", "intent 'vector'"),
                                          ("4d", "a 4D image of 3 volumes"), ("mha", "3 components per voxel")])
def test_predict_refuses_a_multi_component_image_by_name(model, tmp_path, capsys, kind, detail):
    """Was: ``internal error: DTypePromotionError`` (RGB24) or "could not load the case (ValueError: all the input
    arrays must have same number of dimensions ...)" (4D, vector MetaImage)."""
    data = tmp_path / "data"
    write_case(data, "G1", seed=1)
    folder = write_case(data, "V1", seed=2)
    t1 = folder / "V1_t1.nii.gz"
    if kind == "mha":
        t1 = _mha_vector(folder)
    else:
        {"rgb24": _rgb, "vector": _vector_intent, "4d": _four_d}[kind](t1)
    rc, err = _predict(capsys, model, data, tmp_path / "out", "--continue-on-error")
    line = _line(err, t1, only=False)
    assert rc in (1, 2) and MULTI in line and detail in line, err
    if rc == 1:  # the case failed, the other one was predicted
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["G1"]


@pytest.mark.parametrize("kind", ["rgb24", "vector", "4d"])
def test_check_refuses_a_multi_component_image_by_name(tmp_path, capsys, kind):
    data = tmp_path / "data"
    for i in range(2):
        write_case(data, f"C{i}", seed=i)
    t1 = data / "C1" / "C1_t1.nii.gz"
    {"rgb24": _rgb, "vector": _vector_intent, "4d": _four_d}[kind](t1)
    manifest = write_manifest(build_manifest(data, folds=2, test_fraction=0.0, seed=0), data / "manifest.json")
    rc, err = run(capsys, "check", manifest, "--continue-on-error")
    line = _line(err, t1)
    assert rc == 1 and "C1" in line
    assert MULTI in line if kind != "4d" else "expected a 3D image" in line  # check's own rule for a 4D modality


def test_an_msd_4d_image_still_predicts(model, tmp_path, capsys):
    """The MSD layout's one 4D file of four modalities is not a multi-component image: it is predicted."""
    from factories import MSD

    write_case(tmp_path / "msd", "BRATS_001", MSD)
    rc, err = _predict(capsys, model, tmp_path / "msd", tmp_path / "out")
    assert rc == 0, err


# --- 3. geometry the model cannot use --------------------------------------------------------------------------


def _regrid(folder: Path, crop=None, affine=None) -> None:
    """Every file of the case: cropped to ``crop`` (a tuple of slices) and/or given ``affine``."""
    for path in sorted(folder.glob("*.nii.gz")):
        img = nib.load(str(path))
        values = np.asarray(img.dataobj)
        if crop is not None:
            values = values[crop].copy()
        save(values, path, img.affine if affine is None else affine)


@pytest.mark.parametrize("slices", [1, 2])
def test_predict_refuses_too_few_slices(model, tmp_path, capsys, slices):
    """Was: a 1- or 2-slice volume ran through the 3D model and gave garbage."""
    data = tmp_path / "data"
    folder = write_case(data, "S1", seed=1)
    _regrid(folder, crop=(slice(None), slice(None), slice(6, 6 + slices)))
    rc, err = _predict(capsys, model, data, tmp_path / "out")
    line = _line(err, folder / "S1_t1.nii.gz")
    assert rc == 2 and f"{slices} slice{'s' if slices > 1 else ''} along axis 3 (k)" in line
    assert "the model needs at least 4" in line


def test_predict_refuses_a_slab_thinner_than_four_voxels_of_the_model(model, tmp_path, capsys):
    """Enough slices in the file (8), but 8 x 0.25 mm = 2 mm is one voxel of the 2 mm model."""
    data = tmp_path / "data"
    folder = write_case(data, "S2", seed=1)
    _regrid(folder, crop=(slice(None), slice(None), slice(4, 12)), affine=np.diag([2.0, 2.0, 0.25, 1.0]))
    rc, err = _predict(capsys, model, data, tmp_path / "out")
    line = _line(err, folder / "S2_t1.nii.gz")
    assert rc == 2 and "2 mm along axis 3 (k) (8 slices of 0.25 mm) is only 1 voxel at the model's 2 mm" in line
    assert "the model needs at least 4" in line


def test_a_small_real_volume_still_predicts(model, tmp_path, capsys):
    """4 slices (the minimum) of a 16x16 case at the model's own 2 mm: predicted, on its own grid."""
    data = tmp_path / "data"
    folder = write_case(data, "S3", seed=1)
    _regrid(folder, crop=(slice(None), slice(None), slice(6, 10)))
    rc, err = _predict(capsys, model, data, tmp_path / "out")
    assert rc == 0, err
    assert nib.load(str(tmp_path / "out" / "S3" / "S3_seg.nii.gz")).shape == (16, 16, 4)


def _disagreeing_forms(path: Path, shift=40.0, flip=True) -> None:
    img = nib.load(str(path))
    qform = img.affine.copy()
    if flip:
        qform[:3, 0] *= -1
    qform[:3, 3] += [shift, 0.0, 0.0]
    out = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    out.set_sform(img.affine, code=1)
    out.set_qform(qform, code=1)
    nib.save(out, str(path))


QFORM = "sform and qform disagree (origin differs by 40.0 mm, axis 1 (i) flipped"


def test_check_and_predict_refuse_sform_and_qform_that_disagree(model, tmp_path, capsys):
    """Was: accepted silently; a viewer that reads the qform shows the image (and the segmentation) elsewhere."""
    data = tmp_path / "data"
    for i in range(2):
        write_case(data, f"Q{i}", seed=i)
    t2 = data / "Q1" / "Q1_t2.nii.gz"
    _disagreeing_forms(t2)
    manifest = write_manifest(build_manifest(data, folds=2, test_fraction=0.0, seed=0), data / "manifest.json")
    rc, err = run(capsys, "check", manifest, "--continue-on-error")
    assert rc == 1 and QFORM in _line(err, t2) and "fix the header" in _line(err, t2).lower()
    rc, err = _predict(capsys, model, data, tmp_path / "out", "--continue-on-error")
    assert rc == 1 and QFORM in _line(err, t2, only=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Q0"]


def test_sform_and_qform_that_differ_only_by_rounding_are_accepted(tmp_path):
    """The qform is a float32 quaternion: it cannot hold a shear or direction cosines that are orthogonal only to
    1e-6 (DICOM's 6 decimals). Such a pair, written from one oblique matrix, loads; so does every real case."""
    from medseg_diff.data.io import qform_sform_problem, read_image

    angle = np.deg2rad(17.3)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.9375, 0.9375, 1.2]) + 1e-6 * np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    affine[:3, 3] = [-118.3, -131.7, -87.25]
    img = nib.Nifti1Image(np.zeros((256, 256, 150), np.int16), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    path = tmp_path / "oblique.nii.gz"
    nib.save(img, str(path))
    loaded = nib.load(str(path))
    assert not np.array_equal(loaded.get_sform(), loaded.get_qform())  # they do differ, by rounding
    assert qform_sform_problem(loaded) is None
    read_image(path)
    for real in sorted(REAL_DATA.glob("*/*.nii.gz")):  # absent in a user's clone: nothing to do
        read_image(real)


def test_predict_refuses_voxels_far_coarser_than_the_models(model, tmp_path, capsys):
    """2x2x20 mm voxels under a 2 mm model: 10 times coarser along k, 9 of every 10 slices would be invented."""
    data = tmp_path / "data"
    folder = write_case(data, "A1", seed=1)
    _regrid(folder, affine=np.diag([2.0, 2.0, 20.0, 1.0]))
    rc, err = _predict(capsys, model, data, tmp_path / "out")
    line = _line(err, folder / "A1_t1.nii.gz")
    assert rc == 2 and "voxels of 2x2x20 mm are 10 times the model's 2x2x2 mm along axis 3 (k)" in line
    assert "9 of every 10 slices" in line and "at most 8 times" in line


def test_predict_refuses_a_2d_acquisition_whose_slices_are_far_coarser_than_the_models(model, tmp_path, capsys):
    """0.7x0.7x7 mm (10:1) under a 2 mm model: slices 3.5 times the model's; 0.5x0.5x5 (10:1, 2.5x) still predicts."""
    data = tmp_path / "data"
    folder = write_case(data, "A3", seed=1)
    _regrid(folder, affine=np.diag([0.7, 0.7, 7.0, 1.0]))
    rc, err = _predict(capsys, model, data, tmp_path / "out")
    line = _line(err, folder / "A3_t1.nii.gz")
    assert rc == 2 and "slices 10 times thicker than the in-plane voxels" in line
    assert "3.5 times the model's 2x2x2 mm along axis 3 (k)" in line
    _regrid(folder, affine=np.diag([0.5, 0.5, 5.0, 1.0]))
    assert _predict(capsys, model, data, tmp_path / "out2")[0] == 0


def test_moderately_thick_slices_predict_with_a_warning(model, tmp_path, capsys):
    """2x2x8 mm under a 2 mm model (4x, as a 1x1x4 mm clinical scan under a 1 mm model): predicted, with a warning."""
    data = tmp_path / "data"
    folder = write_case(data, "A2", seed=1)
    _regrid(folder, affine=np.diag([2.0, 2.0, 8.0, 1.0]))
    rc, err = _predict(capsys, model, data, tmp_path / "out")
    assert rc == 0, err
    assert re.search(r"warning: voxels of 2x2x8 mm are 4 times the model's 2x2x2 mm along axis 3 \(k\)",
                     _line(err, folder / "A2_t1.nii.gz"))
