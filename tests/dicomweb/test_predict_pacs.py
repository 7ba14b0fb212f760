"""The PACS round trip, end to end through the CLI: a phantom study is uploaded to a real Orthanc (STOW-RS),
``medseg-diff predict --dicomweb URL --study UID`` fetches, segments and stores the SEG and parametric maps back,
and they are read back over QIDO-RS / WADO-RS: the same objects, on the source series' geometry, with the voxels of
the prediction's NIfTI."""

from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pydicom
import pytest

from factories import LPS_AFFINE, tiny_config, tiny_images, tiny_label
from medseg_diff.cli import main
from medseg_diff.data.conventions import BRATS2021
from medseg_diff.data.io import read_array
from medseg_diff.data.dicom import read_study
from medseg_diff.dicom import write_phantom_study
from medseg_diff.dicom.web import connect, find_results, store_instances
from medseg_diff.data.vocabulary import label_entries

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def model(phantoms, tmp_path_factory):
    from medseg_diff.training.run import train

    out = tmp_path_factory.mktemp("pacs_model")
    train(tiny_config(phantoms, out, "diffusion", train={"epochs": 1, "steps_per_epoch": 1},
                      data={"spacing": [5.0, 5.0, 5.0], "max_val_cases": 0},
                      infer={"roi_size": [32, 32, 32], "sw_batch_size": 2}))
    return out / "best.pt"


@pytest.fixture(scope="module")
def uploaded(orthanc, tmp_path_factory):
    """A 4-series phantom study in Orthanc: (study folder on disk, StudyInstanceUID)."""
    images = tiny_images(tiny_label((24, 24, 20), BRATS2021, seed=3), BRATS2021, seed=3)
    volumes = {m: (np.rint(a).astype(np.int16), LPS_AFFINE) for m, a in images.items()}
    folder = write_phantom_study(volumes, tmp_path_factory.mktemp("pacs_study") / "study", patient_id="PACS-1")
    study = read_study(folder)
    files = [path for series in study.series.values() for path in series.files]
    assert len(store_instances(connect(orthanc.dicomweb), files)) == len(files)
    return folder, study.study_uid


def test_predict_from_the_pacs_stores_seg_and_maps_back(model, orthanc, uploaded, tmp_path, capsys):
    source, study_uid = uploaded
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(model), "--dicomweb", orthanc.dicomweb, "--study", study_uid,
            "--out", str(out), "--steps", "1", "--ensemble", "2", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 case(s) written, 0 failed" in printed and "stored" in printed

    study = read_study(source)
    case = out / study.case_id
    local = sorted((case / "dicom").glob("*.dcm"))
    kinds = {p.name[len(study.case_id) + 1:-4] for p in local}
    assert {"seg", "uncertainty", "variance", "attention_self", "attention_cross"} <= kinds

    client = connect(orthanc.dicomweb)
    ours = {pydicom.dcmread(p).SeriesInstanceUID for p in local}
    [seg_meta] = [d for d in find_results(client, study_uid, "SEG") if d.SeriesInstanceUID in ours]
    sources = {s.series_uid for s in study.series.values()}
    results = [d for d in find_results(client, study_uid, None) if d.SeriesInstanceUID not in sources]
    assert ours <= {d.SeriesInstanceUID for d in results}
    results = [d for d in results if d.SeriesInstanceUID in ours]
    assert sum(int(d.NumberOfSeriesRelatedInstances) for d in results) == len(local)

    # WADO-RS: each stored object comes back as the file we wrote (same UIDs, same pixels)
    t1 = study.series["t1"]
    for path in local:
        ours = pydicom.dcmread(path)
        theirs = client.retrieve_instance(study_uid, ours.SeriesInstanceUID, ours.SOPInstanceUID)
        [pixels] = [k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ours]
        assert theirs[pixels].value == ours[pixels].value, path.name
        assert theirs.SOPClassUID == ours.SOPClassUID and ours.SOPClassUID in (SEGMENTATION, PARAMETRIC_MAP)
        assert theirs.FrameOfReferenceUID == t1.datasets[0].FrameOfReferenceUID
        referenced = {item.ReferencedSOPInstanceUID for ref in theirs.ReferencedSeriesSequence
                      for item in ref.ReferencedInstanceSequence}
        assert referenced == {d.SOPInstanceUID for d in t1.datasets}
    [seg_instance] = [pydicom.Dataset.from_json(i) for i in client.search_for_instances(
        study_uid, seg_meta.SeriesInstanceUID)]
    assert seg_instance.SOPInstanceUID == pydicom.dcmread(case / "dicom" / f"{study.case_id}_seg.dcm").SOPInstanceUID

    # the SEG read from the PACS, frame by source instance, equals the NIfTI seg (same geometry, same voxels)
    seg_ds = client.retrieve_instance(study_uid, seg_meta.SeriesInstanceUID, seg_instance.SOPInstanceUID)
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    pixels = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in t1.datasets], combine_segments=True,
                                                skip_overlap_checks=True)
    values = np.array([0] + [e.value for e in label_entries(BRATS2021)], dtype=np.uint8)
    labels, affine = read_array(case / f"{study.case_id}_seg.nii.gz")
    _, t1_affine = read_array(t1.reference)
    np.testing.assert_allclose(affine, t1_affine, atol=1e-5)
    np.testing.assert_array_equal(values[pixels].transpose(2, 1, 0), labels)
    # (a one-step model may segment nothing here; SEGs with every label are checked voxel for voxel through
    # dcmqi in tests/dicom/test_outputs.py and through Orthanc in test_web.py)

    meta = json.loads((case / "prediction.json").read_text())
    assert meta["inputs"]["dicom_study"] == str(out / ".dicomweb" / study_uid)


def test_credentials_in_the_url_are_never_printed(model, orthanc, uploaded, tmp_path, capsys):
    """``http://USER:PASSWORD@host/...`` works (this Orthanc ignores the credentials) and the password appears
    nowhere in what the command prints."""
    _, study_uid = uploaded
    before = [int(d.SeriesNumber) for d in find_results(connect(orthanc.dicomweb), study_uid, None)]
    url = orthanc.dicomweb.replace("http://", "http://alice:s3cret-pw@")
    assert main(["predict", "--checkpoint", str(model), "--dicomweb", url, "--study", study_uid,
                 "--out", str(tmp_path / "out"), "--steps", "1", "--ensemble", "1", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "s3cret-pw" not in captured.out + captured.err and "1 case(s) written" in captured.out
    assert f"to {orthanc.dicomweb}" in captured.out  # the stored line names the server, without credentials
    # the fetch skipped the results already in the PACS, but the new ones are numbered above them, not over them
    new = [pydicom.dcmread(p).SeriesNumber for p in (tmp_path / "out").glob("*/dicom/*.dcm")]
    assert new and min(new) > max(before)


def test_unknown_study_is_a_service_error_and_writes_no_case(model, orthanc, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(model), "--dicomweb", orthanc.dicomweb, "--study", "1.2.3.4.5",
                 "--out", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "1.2.3.4.5" in err and orthanc.dicomweb in err
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("extra, problem", [
    ([], "either --input"),
    (["--input", "x", "--dicomweb", "http://localhost:1/dicom-web", "--study", "1.2"], "either --input"),
    (["--dicomweb", "http://localhost:1/dicom-web"], "--study"),
    (["--input", "x", "--study", "1.2"], "go with --dicomweb"),
])
def test_predict_source_flags_are_checked(extra, problem, tmp_path, capsys):
    assert main(["predict", "--checkpoint", "ckpt.pt", "--out", str(tmp_path / "o"), *extra]) == 2
    assert problem in capsys.readouterr().err
