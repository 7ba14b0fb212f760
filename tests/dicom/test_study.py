"""DICOM study folders in: series mapped to modalities, the same arrays and geometry as the NIfTI they were written
from, clear errors listing the study's series, and discovery of study folders as cases."""

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_support import SHAPE, study_volumes
from factories import BRATS2021, LPS_AFFINE, RAS_AFFINE, tiny_images, tiny_label
from medseg_diff.data.conventions import MODALITIES
from medseg_diff.data.discovery import discover
from medseg_diff.data.io import dicom_series_files, read_array, read_image
from medseg_diff.data.dicom import SeriesRule, is_dicom_study, read_study
from medseg_diff.dicom import write_phantom_study
from medseg_diff.data.dicom.geometry import position, resample_exact
from medseg_diff.errors import DataError
from medseg_diff.predictions.types import check_name


@pytest.mark.parametrize("layout,suffix", [("series", ""), ("flat", ""), ("nested", ".dcm")])
def test_study_reads_as_the_nifti_it_was_written_from(tmp_path, layout, suffix):
    volumes = study_volumes()
    folder = write_phantom_study(volumes, tmp_path / "study", layout=layout, suffix=suffix)
    assert is_dicom_study(folder)
    study = read_study(folder)
    assert list(study.series) == list(MODALITIES)
    assert {m: s.description for m, s in study.series.items()} == {
        "t1": "AX T1", "t1ce": "T1 POST GD", "t2": "AX T2", "flair": "T2 FLAIR"}
    check_name(study.case_id, "case id", None)
    assert study.case_id.startswith("PHANTOM-001_20240101_")
    assert study.case_id == read_study(folder).case_id  # the same on every read
    for modality, series in study.series.items():
        z = [position(ds)[2] for ds in series.datasets]
        assert z == sorted(z) and len(series.files) == SHAPE[2]  # slice order (the names are opaque hashes)
        assert all("PixelData" not in ds for ds in series.datasets)
        assert dicom_series_files(series.reference) == series.files  # what data.io reads: the same files
        array, affine = read_array(series.reference)
        np.testing.assert_array_equal(array, volumes[modality][0])
        np.testing.assert_allclose(affine, LPS_AFFINE, atol=1e-5)


def test_float_volumes_on_a_ras_affine(tmp_path):
    """Non-integral values go through RescaleSlope/Intercept: equal to half a quantisation step."""
    images = tiny_images(tiny_label(SHAPE, BRATS2021), BRATS2021)
    study = read_study(write_phantom_study({m: (a, RAS_AFFINE) for m, a in images.items()}, tmp_path / "s"))
    for modality, series in study.series.items():
        array, affine = read_array(series.reference)
        step = (images[modality].max() - images[modality].min()) / 65535
        np.testing.assert_allclose(array, images[modality], atol=step / 2 + 1e-3)
        np.testing.assert_allclose(affine, RAS_AFFINE, atol=1e-5)
        assert nib.aff2axcodes(affine) == ("R", "A", "S")


def test_a_radiological_nifti_comes_back_on_the_same_world_grid(tmp_path):
    """A NIfTI with a negative determinant: DICOM readers sort the frames along the slice normal, so the third axis
    comes back reversed -- the same voxels at the same world positions."""
    affine = np.diag([-2.0, 2.0, -3.0, 1.0])
    affine[:3, 3] = [20, -15, 30]
    volumes = {m: (a, affine) for m, (a, _) in study_volumes().items()}
    study = read_study(write_phantom_study(volumes, tmp_path / "s"))
    array, read_affine = read_array(study.series["t2"].reference)
    assert np.linalg.det(read_affine[:3, :3]) > 0
    back = resample_exact(array, read_affine, affine, SHAPE)
    np.testing.assert_array_equal(back, volumes["t2"][0])


def _listing_checks(err, folder, descriptions):
    text = str(err.value)
    assert str(folder) in text
    assert "number, description, modality, instances" in text
    for number, description in descriptions:
        assert f"#{number}" in text and repr(description) in text
    assert f"{SHAPE[2]} images" in text and " MR " in text


def test_two_series_for_one_modality_is_an_error_listing_the_series(tmp_path):
    volumes = study_volumes()
    volumes["t1ce_sag"] = volumes["t1ce"]
    folder = write_phantom_study(volumes, tmp_path / "s", descriptions={"t1ce_sag": "SAG T1 C+"}, layout="flat")
    with pytest.raises(DataError, match=r"2 series match t1ce \(#3 'T1 POST GD', #6 'SAG T1 C\+'\)") as err:
        read_study(folder)
    _listing_checks(err, folder, [(2, "AX T1"), (3, "T1 POST GD"), (4, "AX T2"), (5, "T2 FLAIR"), (6, "SAG T1 C+")])
    # a rule file resolves it
    rule = tmp_path / "rule.yaml"
    rule.write_text("t1ce: ['^SAG T1']\n")
    assert read_study(folder, SeriesRule.from_file(rule)).series["t1ce"].number == 6


def test_one_series_matching_two_modalities_is_an_error(tmp_path):
    folder = write_phantom_study(study_volumes(), tmp_path / "s")
    rule = tmp_path / "rule.json"
    rule.write_text('{"t2": "T2"}')
    with pytest.raises(DataError, match="series #5 'T2 FLAIR' matches t2 and flair") as err:
        read_study(folder, SeriesRule.from_file(rule))
    _listing_checks(err, folder, [(2, "AX T1"), (5, "T2 FLAIR")])
    assert str(rule) in str(err.value)


def test_a_missing_modality_is_an_error_listing_the_series(tmp_path):
    volumes = study_volumes()
    volumes["loc"] = volumes.pop("flair")
    folder = write_phantom_study(volumes, tmp_path / "s", descriptions={"loc": "3-PLANE LOC"})
    with pytest.raises(DataError, match="no series matches flair") as err:
        read_study(folder)
    _listing_checks(err, folder, [(2, "AX T1"), (5, "3-PLANE LOC")])
    assert "(matches no modality)" in str(err.value)


def _copy_with(source: pydicom.Dataset, path, sop_class: str, modality: str, series_uid: str, number: int):
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = modality, series_uid, number, "T1 x"
    ds.save_as(path, enforce_file_format=True)


def test_non_image_series_and_other_files_are_ignored(tmp_path):
    folder = write_phantom_study(study_volumes(), tmp_path / "s", layout="flat")
    first = read_study(folder).series["t1"].files[0]
    _copy_with(first, folder / "seg", "1.2.840.10008.5.1.4.1.1.66.4", "SEG", generate_uid(), 90)
    _copy_with(first, folder / "pmap", "1.2.840.10008.5.1.4.1.1.30", "MR", generate_uid(), 91)  # a map labelled MR
    (folder / "notes.txt").write_text("not DICOM")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4)), str(folder / "x.nii.gz"))
    study = read_study(folder)
    assert {s.description for s in study.series.values()} == {"AX T1", "T1 POST GD", "AX T2", "T2 FLAIR"}
    ignored = [s for s in study.listing if not s.is_image]
    assert sorted(s.number for s in ignored) == [90, 91]
    assert "ignored" in ignored[0].line()


def test_several_studies_in_one_folder_are_named(tmp_path):
    folder = tmp_path / "mixed"
    write_phantom_study(study_volumes(), folder, layout="flat", patient_id="P1")
    write_phantom_study(study_volumes(seed=1), folder, layout="flat", patient_id="P2")
    assert not is_dicom_study(folder)
    with pytest.raises(DataError, match="holds 2 DICOM studies") as err:
        read_study(folder)
    assert "patient P1" in str(err.value) and "patient P2" in str(err.value)
    with pytest.raises(DataError, match="holds files of 2 DICOM studies"):
        discover(folder)


def test_a_folder_of_study_folders_is_a_data_set_of_cases(tmp_path):
    write_phantom_study(study_volumes(), tmp_path / "root" / "a", patient_id="P1")
    write_phantom_study(study_volumes(seed=1), tmp_path / "root" / "site" / "b", patient_id="P2", layout="nested")
    conv, cases = discover(tmp_path / "root")
    assert conv.name == "brats2021"
    assert [c.case_id[:3] for c in cases] == ["P1_", "P2_"]
    for case, study in zip(cases, ("a", "site")):  # the highest folder holding only that study
        assert case.folder.name == study and case.dicom is not None and case.label is None and not case.missing
        assert list(case.images) == list(MODALITIES)
        assert case.images["t1"] == case.dicom.series["t1"].reference
    np.testing.assert_array_equal(read_array(cases[1].images["flair"])[0], study_volumes(seed=1)["flair"][0])
    conv, forced = discover(tmp_path / "root", convention="brats2023")
    assert conv.name == "brats2023" and [c.case_id for c in forced] == [c.case_id for c in cases]


def test_series_folders_named_like_brats_files_are_read_as_a_study(tmp_path):
    folder = write_phantom_study(study_volumes(), tmp_path / "study")
    for old, new in (("SE0002", "AX_T1"), ("SE0003", "T1_POST_GD"), ("SE0004", "AX_T2"), ("SE0005", "T2_FLAIR")):
        (folder / old).rename(folder / new)
    conv, cases = discover(folder)
    assert len(cases) == 1 and cases[0].dicom is not None and not cases[0].missing


def test_a_brats_case_of_dicom_series_folders_keeps_its_names(tmp_path):
    case = tmp_path / "data" / "CASE1"
    for modality, volume in study_volumes().items():
        write_phantom_study({modality: volume}, case / f"CASE1_{modality}", layout="flat",
                            descriptions={modality: "series"})  # descriptions that map to nothing
    conv, cases = discover(tmp_path / "data")
    assert [c.case_id for c in cases] == ["CASE1"] and cases[0].dicom is None
    assert cases[0].images["t1ce"] == case / "CASE1_t1ce"


def test_inputs_of_predict_and_the_monai_loader(tmp_path):
    from monai.transforms import LoadImaged

    from medseg_diff.data.io import MedsegReader
    from medseg_diff.inference.case import check_grid
    from medseg_diff.stages.predict import input_records

    volumes = study_volumes()
    folder = write_phantom_study(volumes, tmp_path / "study", layout="flat")
    conv, records = input_records(folder)
    assert conv.name == "brats2021" and len(records) == 1
    record = records[0]
    check_grid(record, record["case_id"])
    loaded = LoadImaged(keys="image", reader=MedsegReader(), image_only=True)(record)["image"]
    assert tuple(loaded.shape) == (4, *SHAPE)
    for c, modality in enumerate(MODALITIES):
        np.testing.assert_array_equal(np.asarray(loaded[c]), volumes[modality][0])


def test_a_manifest_of_dicom_studies_builds_and_checks(tmp_path):
    from medseg_diff.data.check import check_manifest
    from medseg_diff.data.manifest import build_manifest, load_manifest, write_manifest

    root = tmp_path / "pacs"
    write_phantom_study(study_volumes(), root / "a", patient_id="P1", layout="flat")
    write_phantom_study(study_volumes(seed=1), root / "b", patient_id="P2")
    manifest = build_manifest(root, folds=0)
    assert [c.subset for c in manifest.cases] == ["unlabelled", "unlabelled"]
    assert all(len(set(c.images.values())) == 4 for c in manifest.cases)  # four distinct series
    write_manifest(manifest, root / "manifest.json")
    assert check_manifest(load_manifest(root / "manifest.json")) == []

    # predicting from the manifest also writes DICOM outputs: its records name their study folder
    from medseg_diff.stages.predict import input_records

    _, records = input_records(root / "manifest.json")
    assert sorted(read_study(r["dicom_study"]).case_id for r in records) == sorted(c.id for c in manifest.cases)

    # the checksum covers every slice of a series, not only the file the manifest names for it
    from medseg_diff.data.check import verify_checksums
    from medseg_diff.data.io import dicom_series_files

    case = manifest.cases[0]
    named = root / case.images["flair"]
    other = next(f for f in dicom_series_files(named) if f != named)
    ds = pydicom.dcmread(other)
    ds.PixelData = bytes(b ^ 1 for b in ds.PixelData)  # one changed slice, not the named file
    ds.save_as(other)
    problems = verify_checksums(load_manifest(root / "manifest.json"))
    assert [(p.case, p.file) for p in problems] == [(case.id, str(named))]


def test_bad_files_and_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="holds no DICOM image files"):
        read_study(tmp_path)
    folder = write_phantom_study(study_volumes(), tmp_path / "s")
    study = read_study(folder)
    broken = folder / "SE0003" / "BROKEN"
    broken.write_bytes(study.series["t1ce"].files[0].read_bytes()[:700])  # cut inside the header
    with pytest.raises(DataError, match="without StudyInstanceUID or SeriesInstanceUID \\(truncated") as err:
        read_study(folder)
    assert str(broken) in str(err.value)
    broken.unlink()

    gap = study.series["t2"].files[7]
    gap.unlink()
    with pytest.raises(DataError, match="series #4 'AX T2' cannot be read as one volume: its slices are not evenly"):
        read_study(folder)

    shutil.copytree(folder / "SE0002", folder / "copy")
    with pytest.raises(DataError, match="is the same instance"):
        read_study(folder)


def test_a_series_spread_over_sibling_folders_is_refused_by_discovery(tmp_path):
    folder = write_phantom_study(study_volumes(), tmp_path / "s")
    files = read_study(folder).series["flair"].files
    (folder / "SE0005" / "part2").mkdir()
    (folder / "SE0005" / "part1").mkdir()
    for i, path in enumerate(files):
        path.rename(folder / "SE0005" / ("part1" if i % 2 else "part2") / path.name)
    with pytest.raises(DataError, match="spread over several folders"):
        discover(folder)


def test_reference_file_reads_the_whole_series_with_a_dicom_suffix(tmp_path):
    folder = write_phantom_study(study_volumes(), tmp_path / "s", suffix=".dcm", layout="flat")
    series = read_study(folder).series["t1ce"]
    assert read_image(series.files[5]).shape == SHAPE  # any file of the series stands for all of it
