"""End to end: ``medseg-diff predict --input STUDY_FOLDER`` on a DICOM study (and a folder of studies), then the
prediction folder written back as a SEG and parametric maps over the source series."""

import json

import numpy as np
import pydicom
import pytest

from dicom_support import dciodvfy, study_volumes
from factories import tiny_config
from medseg_diff.cli import main
from medseg_diff.data.io import read_array
from medseg_diff.data.dicom import read_study
from medseg_diff.dicom import write_dicom_outputs, write_phantom_study

pytestmark = pytest.mark.slow  # trains a tiny model first


@pytest.fixture(scope="module")
def model(phantoms, tmp_path_factory):
    from medseg_diff.training.run import train

    out = tmp_path_factory.mktemp("dicom_model")
    train(tiny_config(phantoms, out, "diffusion", train={"epochs": 1, "steps_per_epoch": 1},
                      data={"max_val_cases": 0}))
    return out / "best.pt"


def test_predict_a_folder_of_dicom_studies_and_write_dicom_back(model, tmp_path):
    root = tmp_path / "pacs"
    write_phantom_study(study_volumes(), root / "one", patient_id="P1", layout="flat")
    write_phantom_study(study_volumes(seed=1), root / "two", patient_id="P2", layout="nested")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(model), "--input", str(root), "--out", str(out), "--steps", "1",
                 "--ensemble", "2", "--device", "cpu"]) == 0
    for folder_name in ("one", "two"):
        study = read_study(root / folder_name)
        case = out / study.case_id
        meta = json.loads((case / "prediction.json").read_text())
        assert study.modality_of(meta["reference"]) == "t1"
        labels, affine = read_array(case / f"{study.case_id}_seg.nii.gz")
        _, t1_affine = read_array(study.series["t1"].reference)
        np.testing.assert_allclose(affine, t1_affine, atol=1e-5)
        paths = sorted((case / "dicom").glob("*.dcm"), key=lambda p: not p.name.endswith("_seg.dcm"))  # by predict
        written = {p.name: p.read_bytes() for p in paths}
        assert {p.name: p.read_bytes() for p in write_dicom_outputs(case, study, meta["convention"])} == written
        assert paths[0].name == f"{study.case_id}_seg.dcm" and len(paths) >= 2
        for path in paths:
            errors, _ = dciodvfy(path)
            assert errors == [], f"{path.name}:\n" + "\n".join(errors)
            assert pydicom.dcmread(path).FrameOfReferenceUID == study.series["t1"].datasets[0].FrameOfReferenceUID
