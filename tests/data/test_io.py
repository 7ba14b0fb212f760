import locale

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from factories import LPS_AFFINE, save
from medseg_diff.data.io import read_array, read_image
from medseg_diff.errors import DataError


def _sitk_from(array_xyz, affine_ras):
    """A SimpleITK image with the same world geometry as a NIfTI (array x-y-z, RAS affine)."""
    img = sitk.GetImageFromArray(np.transpose(array_xyz, (2, 1, 0)))
    lps = np.diag([-1, -1, 1, 1]) @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    return img


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_sitk_formats_keep_geometry(tmp_path, suffix):
    data = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    path = tmp_path / f"x{suffix}"
    sitk.WriteImage(_sitk_from(data, LPS_AFFINE), str(path))
    array, affine = read_array(path)
    np.testing.assert_allclose(affine, LPS_AFFINE, atol=1e-6)
    np.testing.assert_array_equal(array, data)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")


def test_dicom_series_folder(tmp_path):
    locale_before = locale.setlocale(locale.LC_ALL)
    data = (np.random.default_rng(1).uniform(0, 1000, size=(6, 7, 5))).astype(np.int16)
    volume = _sitk_from(data, LPS_AFFINE)
    folder = tmp_path / "CASE_t1"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.GetDepth()):
        sl = volume[:, :, z]
        origin = volume.TransformIndexToPhysicalPoint((0, 0, z))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in origin))
        sl.SetMetaData("0020|0037", "\\".join(f"{v:.6f}" for v in list(volume.GetDirection()[0:7:3]) + list(volume.GetDirection()[1:8:3])))
        sl.SetMetaData("0020|0013", str(z))
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        sl.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)
    locale.setlocale(locale.LC_ALL, locale_before)  # GDCM's writer sets it to "C" (its reader does not)
    array, affine = read_array(folder)
    assert array.shape == data.shape
    np.testing.assert_array_equal(array, data.astype(np.float32))
    np.testing.assert_allclose(affine, LPS_AFFINE, atol=1e-4)


def test_missing_and_truncated_files_are_named(tmp_path):
    with pytest.raises(DataError, match="nope.nii.gz: file not found"):
        read_image(tmp_path / "nope.nii.gz")
    path = save(np.ones((8, 8, 8), np.float32), tmp_path / "t.nii.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataError, match=r"t\.nii\.gz: (unreadable|truncated)"):
        read_array(path)
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        read_image(bad)


def test_monai_reader_is_thread_safe(tmp_path):
    """CacheDataset loads cases from several threads through one reader: images and labels must not mix."""
    from concurrent.futures import ThreadPoolExecutor

    from monai.transforms import LoadImaged

    from factories import BRATS2021, write_case
    from medseg_diff.data.conventions import MODALITIES
    from medseg_diff.data.discovery import discover
    from medseg_diff.data.io import MedsegReader

    for i in range(4):
        write_case(tmp_path, f"BraTS2021_{i:05d}", BRATS2021, seed=i)
    _, cases = discover(tmp_path)
    load = LoadImaged(keys=["image", "label"], reader=MedsegReader(), image_only=True)
    records = [{"image": [str(c.images[m]) for m in MODALITIES], "label": str(c.label)} for c in cases] * 25
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(load, records))
    for d, rec in zip(loaded, records):
        assert tuple(d["image"].shape) == (4, 16, 16, 16) and tuple(d["label"].shape) == (16, 16, 16)
        assert d["image"].meta["filename_or_obj"] == rec["image"][0]
        assert d["label"].meta["filename_or_obj"] == rec["label"]
