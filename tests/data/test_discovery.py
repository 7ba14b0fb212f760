import pytest

from factories import BRATS2021, BRATS2023, MSD, write_case
from medseg_diff.data.discovery import discover
from medseg_diff.errors import DataError


def test_brats2021_layout_detected(tmp_path):
    for i in range(3):
        write_case(tmp_path, f"BraTS2021_{i:05d}", BRATS2021)
    conv, cases = discover(tmp_path)
    assert conv.name == "brats2021"
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    case = cases[0]
    assert list(case.images) == ["t1", "t1ce", "t2", "flair"]
    assert case.images["t1"].name == "BraTS2021_00000_t1.nii.gz"  # t1 is not confused with t1ce
    assert case.images["t1ce"].name == "BraTS2021_00000_t1ce.nii.gz"
    assert case.label.name == "BraTS2021_00000_seg.nii.gz"


def test_brats2023_layout_detected_nested_and_unlabelled(tmp_path):
    write_case(tmp_path / "TrainingData", "BraTS-GLI-00000-000", BRATS2023)
    write_case(tmp_path / "ValidationData", "BraTS-GLI-00001-000", BRATS2023, label=False)
    conv, cases = discover(tmp_path)
    assert conv.name == "brats2023" and conv.enhancing == 3
    assert [c.label is not None for c in cases] == [True, False]
    assert cases[0].images["flair"].name == "BraTS-GLI-00000-000-t2f.nii.gz"
    assert cases[0].images["t1ce"].name == "BraTS-GLI-00000-000-t1c.nii.gz"


def test_msd_layout_detected_and_mac_junk_ignored(tmp_path):
    write_case(tmp_path, "BRATS_001", MSD)
    write_case(tmp_path, "BRATS_002", MSD)
    (tmp_path / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00resource fork")
    conv, cases = discover(tmp_path)
    assert conv.name == "msd"
    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002"]
    assert list(cases[0].images) == ["4d"] and cases[0].label.parent.name == "labelsTr"


def test_convention_can_be_forced(tmp_path):
    write_case(tmp_path, "BraTS2021_00000", BRATS2021)
    conv, _ = discover(tmp_path, convention="brats2021")
    assert conv.name == "brats2021"
    with pytest.raises(DataError, match="no brats2023 cases found"):
        discover(tmp_path, convention="brats2023")


def test_missing_modality_is_reported_not_dropped(tmp_path):
    folder = write_case(tmp_path, "BraTS2021_00000", BRATS2021)
    (folder / "BraTS2021_00000_t2.nii.gz").unlink()
    _, cases = discover(tmp_path)
    assert cases[0].missing == ["t2"]


def test_mixed_layouts_are_an_error(tmp_path):
    write_case(tmp_path, "BraTS2021_00000", BRATS2021)
    write_case(tmp_path, "BraTS-GLI-00000-000", BRATS2023)
    with pytest.raises(DataError, match="mixed layouts"):
        discover(tmp_path)


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no BraTS or MSD cases found"):
        discover(tmp_path)


def test_real_cases_are_brats2023(real_data):
    conv, cases = discover(real_data)
    assert conv.name == "brats2023"
    assert [c.case_id for c in cases] == ["BraTS-GLI-00001-000", "BraTS-GLI-99999-000", "BraTS-MET-00110-000"]
    assert [c.label is not None for c in cases] == [False, True, False]
