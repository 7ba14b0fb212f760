"""DICOM out: the SEG and parametric maps of a prediction folder are valid (dciodvfy: no error), reference the source
series and its Frame of Reference, carry the segment metadata, and convert back with dcmqi to our NIfTI voxel for
voxel (compared in world space); the same input gives the same bytes."""

import json
import os

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_support import SHAPE, dciodvfy, dcmqi, study_volumes, write_prediction_folder
from factories import BRATS2021
from medseg_diff import __version__
from medseg_diff.data.io import read_array
from medseg_diff.data.dicom import read_study
from medseg_diff.dicom import write_dicom_outputs, write_phantom_study
from medseg_diff.data.dicom.geometry import resample_exact
from medseg_diff.errors import DataError
from medseg_diff.data.vocabulary import label_entries

MAPS = ("uncertainty", "variance", "attention_cross", "attention_self")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A phantom study, a prediction folder on its t1 grid (with every map), and its DICOM outputs."""
    root = tmp_path_factory.mktemp("dicom_out")
    study = read_study(write_phantom_study(study_volumes(), root / "study", layout="flat"))
    pred = root / "pred" / study.case_id
    arrays = write_prediction_folder(pred, study.case_id, study.series["t1"].reference, variance=True)
    paths = write_dicom_outputs(pred, study, BRATS2021)
    return study, pred, arrays, {p.name[len(study.case_id) + 1:-len(".dcm")]: p for p in paths}


def test_every_output_is_written(written):
    study, pred, _, paths = written
    assert list(paths) == ["seg", *MAPS]
    assert all(p.parent == pred / "dicom" for p in paths.values())
    assert not [p for p in (pred / "dicom").iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("kind", ["seg", *MAPS])
def test_dciodvfy_finds_no_error(written, kind):
    errors, warnings = dciodvfy(written[3][kind])
    assert errors == [], "\n".join(errors)
    allowed = ("Unrecognized defined term <QUANTITY> for value 4 of attribute <Image Type>",
               "Unrecognized defined term <QUANTITY> for value 4 of attribute <Frame Type>")
    assert [w for w in warnings if not w.endswith(allowed)] == []


@pytest.mark.parametrize("kind", ["seg", *MAPS])
def test_outputs_reference_the_source_series_and_share_its_frame_of_reference(written, kind):
    study, _, _, paths = written
    ds = pydicom.dcmread(paths[kind])
    t1 = study.series["t1"]
    source = t1.datasets[0]
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.StudyInstanceUID == study.study_uid and ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID not in {s.series_uid for s in study.listing}
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == t1.series_uid
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == \
        {d.SOPInstanceUID for d in t1.datasets}
    assert ds.SoftwareVersions == __version__ and ds.Manufacturer == "medseg-diff"
    assert ds.SeriesNumber >= 100


def test_segments_carry_names_codes_colours_and_algorithm(written):
    seg = hd.seg.segread(written[3]["seg"])
    assert seg.SegmentationType == "BINARY"
    entries = label_entries(BRATS2021)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["NCR", "ED", "ET"]
    assert [s.SegmentDescription for s in seg.SegmentSequence] == [e.description for e in entries]
    types = [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence]
    assert types == ["Necrosis", "Edema", "Neoplasm"]
    for item, entry in zip(seg.SegmentSequence, entries):
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
        assert hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb() == entry.rgb
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "medseg-diff" and algorithm.AlgorithmVersion == __version__
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert item.SegmentAlgorithmType == "AUTOMATIC"


def test_seg_pixels_sit_on_the_source_frames(written):
    """Read back with highdicom per source instance: frame k of the SEG is slice k of our NIfTI (transposed)."""
    study, _, arrays, paths = written
    seg = hd.seg.segread(paths["seg"])
    t1 = study.series["t1"]
    pixels = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in t1.datasets], combine_segments=True,
                                                skip_overlap_checks=True)  # [F, rows, columns] segment numbers
    values = np.array([0] + [e.value for e in label_entries(BRATS2021)], dtype=np.uint8)
    np.testing.assert_array_equal(values[pixels].transpose(2, 1, 0), arrays["seg"])


def _world_equal(ours: np.ndarray, our_affine, theirs: np.ndarray, their_affine) -> None:
    """``theirs`` on our grid (through the affines, no interpolation) equals ``ours``; nothing of theirs is lost."""
    on_ours = resample_exact(theirs, their_affine, our_affine, ours.shape)
    np.testing.assert_array_equal(on_ours, ours)
    assert np.count_nonzero(theirs) == np.count_nonzero(on_ours)


def test_seg_converts_back_with_dcmqi_voxel_for_voxel(written, tmp_path):
    study, pred, arrays, paths = written
    ours, affine = read_array(pred / f"{study.case_id}_seg.nii.gz")
    [merged] = dcmqi("segimage2itkimage", paths["seg"], tmp_path / "merged", "--mergeSegments")
    meta = json.loads((tmp_path / "merged" / "meta.json").read_text())
    numbers = {a["labelID"]: a["SegmentLabel"] for a in meta["segmentAttributes"][0]}
    assert numbers == {1: "NCR", 2: "ED", 3: "ET"}
    image = nib.load(str(merged))
    values = np.array([0] + [e.value for e in label_entries(BRATS2021)])
    theirs = values[np.rint(np.asarray(image.dataobj)).astype(int)]
    _world_equal(ours, affine, theirs, image.affine)
    # one file per segment, too
    for number, path in enumerate(dcmqi("segimage2itkimage", paths["seg"], tmp_path / "each"), start=1):
        image = nib.load(str(path))
        label = label_entries(BRATS2021)[int(path.name.split(".")[0]) - 1].value
        theirs = (np.asarray(image.dataobj) > 0).astype(np.uint8)  # a segment's file holds its number
        _world_equal((ours == label).astype(np.uint8), affine, theirs, image.affine)


@pytest.mark.parametrize("kind", MAPS)
def test_parametric_maps_convert_back_with_dcmqi(written, tmp_path, kind):
    study, pred, arrays, paths = written
    [out] = dcmqi("paramap2itkimage", paths[kind], tmp_path)
    image = nib.load(str(out))
    theirs = np.asarray(image.dataobj, dtype=np.float32)
    _, affine = read_array(pred / f"{study.case_id}_{kind}.nii.gz")
    on_ours = resample_exact(theirs, image.affine, affine, SHAPE, fill=np.nan)
    np.testing.assert_allclose(on_ours, arrays[kind], rtol=1e-6, atol=0)
    ds = pydicom.dcmread(paths[kind])
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodingSchemeDesignator, unit.CodeValue) == ("UCUM", "{nat}" if kind == "uncertainty" else "1")
    # the display window (VOI LUT): an attention map's robust 0-1 (its hottest voxels above 1 kept, shown at the top
    # of the window), the other maps their own minimum to maximum
    voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    low, high = (0.0, 1.0) if kind.startswith("attention") else (float(arrays[kind].min()), float(arrays[kind].max()))
    assert float(voi.WindowCenter) == pytest.approx((low + high) / 2, abs=1e-4)
    assert float(voi.WindowWidth) == pytest.approx(max(high - low, 1e-6), abs=1e-4)


def test_the_same_prediction_gives_the_same_bytes(written, tmp_path):
    study, pred, _, paths = written
    before = {k: p.read_bytes() for k, p in paths.items()}
    again = write_dicom_outputs(pred, study, "brats2021")
    assert {p.name[len(study.case_id) + 1:-4]: p.read_bytes() for p in again} == before


def test_another_model_or_run_never_reuses_the_uids_of_identical_voxels(written, tmp_path):
    """Two runs that predict the same voxels (an empty SEG is the easy case) must not share SOP Instance UIDs: a
    PACS keeps the first copy of a UID and would show one model's result under the other's name."""
    import json
    import shutil

    study, pred, _, paths = written
    uids = {}
    for run in ("run-a", "run-b"):
        copy = tmp_path / run / pred.name
        shutil.copytree(pred, copy, copy_function=shutil.copy2)  # same voxels, same modification times
        shutil.rmtree(copy / "dicom")
        (copy / "prediction.json").write_text(json.dumps({"case_id": study.case_id, "model": "diffusion",
                                                          "run_id": run}))
        out = write_dicom_outputs(copy, study, BRATS2021)
        uids[run] = {pydicom.dcmread(p).SOPInstanceUID for p in out}
        assert len(uids[run]) == len(out)
    assert not uids["run-a"] & uids["run-b"]


def test_voxel_order_of_the_nifti_does_not_matter(written, tmp_path):
    """The seg saved in RAS (``as_closest_canonical``: axes flipped) gives the same SEG pixels."""
    study, pred, _, paths = written
    other = tmp_path / study.case_id
    other.mkdir()
    image = nib.as_closest_canonical(nib.load(str(pred / f"{study.case_id}_seg.nii.gz")))
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    nib.save(image, str(other / f"{study.case_id}_seg.nii.gz"))
    os.utime(other / f"{study.case_id}_seg.nii.gz", ns=(0, (pred / f"{study.case_id}_seg.nii.gz").stat().st_mtime_ns))
    [path] = write_dicom_outputs(other, study, BRATS2021)
    assert pydicom.dcmread(path).PixelData == pydicom.dcmread(paths["seg"]).PixelData


def test_bad_predictions_are_named(written, tmp_path):
    study, pred, arrays, _ = written
    case = study.case_id
    with pytest.raises(DataError, match=f"holds no {case}_seg.nii.gz"):
        write_dicom_outputs(tmp_path, study, BRATS2021)
    _, affine = read_array(pred / f"{case}_seg.nii.gz")
    bad = arrays["seg"].copy()
    bad[0, 0, 0] = 3  # not a brats2021 label
    nib.save(nib.Nifti1Image(bad, affine), str(tmp_path / f"{case}_seg.nii.gz"))
    with pytest.raises(DataError, match=r"label values \[3\] are not brats2021 labels"):
        write_dicom_outputs(tmp_path, study, BRATS2021)
    shifted = affine.copy()
    shifted[:3, 3] += 1.0  # half a voxel (2 mm voxels)
    nib.save(nib.Nifti1Image(arrays["seg"], shifted), str(tmp_path / f"{case}_seg.nii.gz"))
    with pytest.raises(DataError, match="cannot be written over series #2 'AX T1': the grids are shifted") as err:
        write_dicom_outputs(tmp_path, study, BRATS2021)
    assert f"{case}_seg.nii.gz" in str(err.value)
    nib.save(nib.Nifti1Image(arrays["seg"], affine), str(tmp_path / f"{case}_seg.nii.gz"))
    nan = arrays["uncertainty"].copy()
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), str(tmp_path / f"{case}_uncertainty.nii.gz"))
    with pytest.raises(DataError, match="uncertainty map has NaN/Inf values"):
        write_dicom_outputs(tmp_path, study, BRATS2021)


def test_written_objects_are_ignored_when_the_study_is_read_again(written, tmp_path):
    study, _, _, paths = written
    import shutil

    for path in paths.values():
        shutil.copy(path, study.folder / path.name)
    try:
        again = read_study(study.folder)
        assert {m: s.series_uid for m, s in again.series.items()} == {m: s.series_uid for m, s in study.series.items()}
        assert sum(not s.is_image for s in again.listing) == len(paths)
    finally:
        for path in paths.values():
            (study.folder / path.name).unlink()


@pytest.mark.parametrize("name", ["brats2023", "msd"])
def test_other_conventions_keep_their_label_values(written, tmp_path, name):
    from factories import tiny_label
    from medseg_diff.data.conventions import get_convention

    study, pred, _, _ = written
    conv = get_convention(name)
    _, affine = read_array(pred / f"{study.case_id}_seg.nii.gz")
    labels = tiny_label(SHAPE, conv, seed=2)
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / f"{study.case_id}_seg.nii.gz"))
    [path] = write_dicom_outputs(tmp_path, study, conv)
    assert dciodvfy(path)[0] == []
    seg = hd.seg.segread(path)
    entries = label_entries(conv)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [e.short for e in entries]
    pixels = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in study.series["t1"].datasets],
                                                combine_segments=True, skip_overlap_checks=True)
    values = np.array([0] + [e.value for e in entries], dtype=np.uint8)
    np.testing.assert_array_equal(values[pixels].transpose(2, 1, 0), labels)


def test_an_empty_prediction_is_a_valid_empty_seg(written, tmp_path):
    study, pred, arrays, _ = written
    _, affine = read_array(pred / f"{study.case_id}_seg.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), affine), str(tmp_path / f"{study.case_id}_seg.nii.gz"))
    [path] = write_dicom_outputs(tmp_path, study, BRATS2021)
    assert dciodvfy(path)[0] == []
    [merged] = dcmqi("segimage2itkimage", path, tmp_path / "out", "--mergeSegments")
    assert not np.asarray(nib.load(str(merged)).dataobj).any()
