"""Bad inputs replayed against the data layer: each is refused (or warned about) naming the culprit."""

import gzip
import json
import logging
import os
import re
import resource
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from factories import BRATS2021, MSD, save, write_case
from medseg_diff.data.check import (
    background_offset,
    check_manifest,
    ensure_checksums,
    label_value_problems,
    verify_checksums,
)
from medseg_diff.data.discovery import discover
from medseg_diff.data.io import read_array, read_image
from medseg_diff.data.manifest import CASE_ID_PATTERN, build_manifest, load_manifest, write_manifest
from medseg_diff.errors import DataError, ManifestError

CASE = "BraTS2021_00000"


def _huge_header(path: Path, side: int) -> Path:
    """A NIfTI whose header claims ``side``³ float32 voxels, with 64 bytes of data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((side,) * 3)
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + b"\0" * 64
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


# --- 1. header sanity before any allocation ------------------------------------------------------------


@pytest.mark.parametrize("name", ["huge.nii.gz", "huge.nii"])
@pytest.mark.parametrize("side", [10000, 1000])
def test_header_claiming_more_voxels_than_the_file_holds_is_refused_fast(tmp_path, name, side):
    path = _huge_header(tmp_path / name, side)
    assert path.stat().st_size < 500
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(DataError) as err:
            read_array(path)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    message = str(err.value)
    assert message.startswith(str(path))
    assert f"header claims {side}x{side}x{side} = {side ** 3:,} voxels" in message
    assert "but the file holds at most" in message
    assert seconds < 0.5, seconds
    assert peak < 50e6, peak
    assert rss_growth_mb < 50, rss_growth_mb


def test_mha_header_claiming_too_much_is_refused(tmp_path):
    import SimpleITK as sitk

    small = tmp_path / "small.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 4, 4), np.float32)), str(small), True)
    huge = tmp_path / "huge.mha"
    huge.write_bytes(small.read_bytes().replace(b"DimSize = 4 4 4", b"DimSize = 1000 1000 1000"))
    assert read_array(small)[0].shape == (4, 4, 4)
    with pytest.raises(DataError, match=r"huge\.mha: header claims 1000x1000x1000 .* zlib bytes"):
        read_image(huge)


def test_highly_compressible_volume_is_not_refused(tmp_path):
    """An all-zero volume compresses ~1029:1 with gzip -9, still inside the deflate bound."""
    raw = save(np.zeros((128, 128, 128), np.float32), tmp_path / "zeros.nii").read_bytes()
    path = tmp_path / "zeros.nii.gz"
    path.write_bytes(gzip.compress(raw, compresslevel=9))
    assert path.stat().st_size * 1000 < len(raw)  # the ratio is close to the bound
    assert read_array(path)[0].shape == (128, 128, 128)


def test_check_reports_the_huge_header_instead_of_a_memory_error(tmp_path):
    root = tmp_path / "d"
    folder = write_case(root, CASE, BRATS2021)
    m = build_manifest(root)
    t1 = _huge_header(folder / f"{CASE}_t1.nii.gz", 10000)
    problems = check_manifest(m, continue_on_error=True, verify_checksums=False)
    assert any(p.file == str(t1) and "header claims" in p.message for p in problems), [str(p) for p in problems]


@pytest.mark.parametrize(
    "srows,message",
    [
        ([[2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0]], r"voxel size must be > 0, got \(2, 0, 2\)"),
        ([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], "affine is singular"),
        ([[1, 0, 0, 0], [0, np.nan, 0, 0], [0, 0, 1, 0]], "NaN/Inf"),
    ],
)
def test_singular_or_zero_voxel_affines_are_refused(tmp_path, srows, message):
    raw = bytearray(save(np.ones((4, 4, 4), np.float32), tmp_path / "ok.nii", np.eye(4)).read_bytes())
    raw[252:256] = np.array([0, 1], np.int16).tobytes()  # qform_code 0, sform_code 1: the srows are the affine
    raw[280:328] = np.asarray(srows, np.float32).tobytes()
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"bad\.nii\.gz: .*" + message):
        read_image(path)


def test_negative_dimension_is_refused(tmp_path):
    path = save(np.ones((4, 4, 4), np.float32), tmp_path / "neg.nii")
    raw = bytearray(path.read_bytes())
    raw[42:44] = np.int16(-4).tobytes()  # dim[1]
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"neg\.nii: header claims shape \(-4, 4, 4\)"):
        read_image(path)


# --- 2. check rules -------------------------------------------------------------------------------------


@pytest.fixture
def one_case(tmp_path):
    root = tmp_path / "d"
    folder = write_case(root, CASE, BRATS2021)
    return root, folder


def test_manifest_entry_without_a_modality_key_is_refused(one_case, tmp_path):
    root, _ = one_case
    path = write_manifest(build_manifest(root), tmp_path / "m.json")
    doc = json.loads(path.read_text())
    del doc["cases"][0]["images"]["flair"]
    doc["cases"][0]["images"]["FLAIR"] = f"{CASE}/{CASE}_flair.nii.gz"
    path.write_text(json.dumps(doc))
    m = load_manifest(path)
    assert m.missing_images(m.cases[0]) == ["flair"]
    problems = check_manifest(m, continue_on_error=True)
    assert [p.case for p in problems] == [CASE, CASE]
    assert all(p.file == str(path) for p in problems)
    assert "no image for 'flair'" in problems[0].message
    assert "unknown image key(s) 'FLAIR'" in problems[1].message


def _set_label(folder, value, dtype=np.float32):
    seg = folder / f"{CASE}_seg.nii.gz"
    data = np.asarray(nib.load(str(seg)).dataobj).astype(dtype)
    data[0, 0, 0] = value
    save(data, seg)
    return seg


@pytest.mark.parametrize(
    "value,dtype,message",
    [
        (1.5, np.float32, r"non-integral label values \[1\.5\]"),
        (1.0000001, np.float64, r"non-integral label values \[1\]; a label map holds integers"),
        (7, np.uint8, r"unknown label values \[7\]; brats2021 allows \[0, 1, 2, 4\]"),
    ],
)
def test_labels_must_be_integral_and_of_the_convention_blaming_the_seg(one_case, value, dtype, message):
    root, folder = one_case
    m = build_manifest(root)
    seg = _set_label(folder, value, dtype)
    problems = check_manifest(m, continue_on_error=True, verify_checksums=False)
    assert len(problems) == 1, [str(p) for p in problems]
    assert problems[0].case == CASE and problems[0].file == str(seg)
    assert re.search(message, problems[0].message), problems[0].message


def test_label_value_problems_lists_both_kinds():
    found = label_value_problems(np.array([0, 1, 2.5, 4, 7, 9]), BRATS2021)
    assert found[0].startswith("non-integral label values [2.5]")
    assert found[1].startswith("unknown label values [7, 9]")
    assert label_value_problems(np.array([0, 1, 2, 4]), BRATS2021) == []


def _head(shape=(16, 16, 16)):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return np.sqrt(((grid - np.array(shape)[:, None, None, None] / 2 + 0.5) ** 2).sum(0)) < 6


def test_background_offset_detects_a_constant_offset_only():
    head = _head()
    brain = np.where(head, 100.0 + np.random.default_rng(0).normal(0, 3, head.shape), 0.0)
    assert background_offset(brain) is None  # BraTS: zero outside the head
    assert background_offset(np.where(head, brain, 0.0219)) == pytest.approx(0.0219)
    assert background_offset(np.where(head, brain / 1000, 0.0219)) == pytest.approx(0.0219)
    noisy = np.where(head, brain, np.abs(np.random.default_rng(1).normal(0, 5, head.shape)))
    assert background_offset(noisy) is None  # a noise floor is not a constant offset
    assert background_offset(np.full((16, 16, 16), 3.0)) is None  # constant volume: check reports it
    touching = np.where(head, brain, 0.5)
    low = touching[:, :, :5]
    low[low == 0.5] = 80.0  # tissue touches the frame over a third of the volume
    assert background_offset(touching) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="3D"):
        background_offset(np.zeros((4, 4)))


def test_check_warns_about_a_background_offset_without_failing(one_case, caplog):
    root, folder = one_case
    flair = folder / f"{CASE}_flair.nii.gz"
    data = np.asarray(nib.load(str(flair)).dataobj)
    save(np.where(data == 0, 0.0219, data).astype(np.float32), flair)
    m = build_manifest(root)
    warnings = []
    assert check_manifest(m, on_warning=warnings.append) == []
    assert len(warnings) == 1 and warnings[0].is_warning
    assert warnings[0].case == CASE and warnings[0].file == str(flair)
    assert "constant background 0.0219" in warnings[0].message and "preprocessing subtracts it" in warnings[0].message
    assert "warning: flair: constant background" in str(warnings[0])
    with caplog.at_level(logging.WARNING, logger="medseg_diff.data.check"):
        assert check_manifest(m) == []  # default: logged
    assert "constant background 0.0219" in caplog.text and str(flair) in caplog.text


# --- 3. unambiguous manifests ---------------------------------------------------------------------------


def test_same_case_id_in_two_site_folders_is_refused_naming_both(tmp_path):
    root = tmp_path / "d"
    a = write_case(root / "siteA", CASE, BRATS2021, seed=0)
    b = write_case(root / "siteB", CASE, BRATS2021, seed=1)
    with pytest.raises(DataError) as err:
        build_manifest(root)
    message = str(err.value)
    assert f"case {CASE}" in message and str(a.resolve()) in message and str(b.resolve()) in message
    assert "two patients" in message
    assert len(build_manifest(root / "siteA").cases) == 1  # one site alone is fine


def test_two_files_for_one_modality_are_refused(one_case):
    root, folder = one_case
    (folder / f"{CASE}_t2.nii").write_bytes(gzip.decompress((folder / f"{CASE}_t2.nii.gz").read_bytes()))
    with pytest.raises(DataError, match=rf"case {CASE}: .*: two files for t2: {CASE}_t2.nii and {CASE}_t2.nii.gz"):
        discover(root)


def test_msd_case_in_images_tr_and_ts_is_refused(tmp_path):
    write_case(tmp_path, "BRATS_001", MSD)
    (tmp_path / "imagesTs").mkdir()
    os.link(tmp_path / "imagesTr" / "BRATS_001.nii.gz", tmp_path / "imagesTs" / "BRATS_001.nii.gz")
    with pytest.raises(DataError, match=r"case BRATS_001: .*imagesTr/BRATS_001.nii.gz: .*also .*imagesTs/BRATS_001"):
        discover(tmp_path)


def test_symlinked_file_outside_the_root_needs_follow_symlinks(one_case, tmp_path):
    root, folder = one_case
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / "t1.nii.gz"
    (folder / f"{CASE}_t1.nii.gz").rename(target)
    link = folder / f"{CASE}_t1.nii.gz"
    link.symlink_to(target)
    with pytest.raises(DataError) as err:
        build_manifest(root)
    assert str(link) in str(err.value) and "resolves outside the data root" in str(err.value)
    assert "follow_symlinks=True" in str(err.value)
    m = build_manifest(root, follow_symlinks=True)
    assert m.cases[0].images["t1"] == f"{CASE}/{CASE}_t1.nii.gz"  # the path under the root, not the target
    path = write_manifest(m, tmp_path / "m.json")
    loaded = load_manifest(path)
    assert loaded.follow_symlinks and check_manifest(loaded) == []
    # a manifest built without it reports the link when it later leaves the root
    loaded.follow_symlinks = False
    problems = check_manifest(loaded, verify_checksums=False)
    assert [(p.file, "resolves outside the data root" in p.message) for p in problems] == [(str(link), True)]


def test_symlinked_folder_outside_the_root_needs_follow_symlinks(tmp_path):
    root, outside = tmp_path / "d", tmp_path / "elsewhere"
    write_case(root, "BraTS2021_00001", BRATS2021)
    write_case(outside, CASE, BRATS2021)
    (root / CASE).symlink_to(outside / CASE, target_is_directory=True)
    with pytest.raises(DataError, match=rf"{root / CASE}: symlinked folder resolves outside the data root"):
        build_manifest(root)
    m = build_manifest(root, follow_symlinks=True)
    assert [c.id for c in m.cases] == [CASE, "BraTS2021_00001"]
    assert check_manifest(m) == []


def test_symlinks_inside_the_root_are_fine(one_case):
    root, folder = one_case
    (root / "alias").symlink_to(folder, target_is_directory=True)  # the same case reached twice
    m = build_manifest(root)
    assert [c.id for c in m.cases] == [CASE] and m.cases[0].images["t1"].startswith(f"{CASE}/")


@pytest.mark.parametrize("case_id", ["Case 01", "Café_001", "Case\\01", "-Case01"])
def test_case_ids_the_writers_cannot_use_are_refused_naming_the_folder(tmp_path, case_id):
    root = tmp_path / "d"
    folder = write_case(root, case_id, BRATS2021)
    with pytest.raises(ManifestError) as err:
        build_manifest(root)
    message = str(err.value)
    assert message.startswith(str(folder.resolve())) and "cannot be used as a file name" in message


def test_case_ids_equal_but_for_letter_case_are_refused(tmp_path):
    root = tmp_path / "d"
    write_case(root, "Case01", BRATS2021)
    write_case(root, "CASE01", BRATS2021)
    with pytest.raises(ManifestError, match="'CASE01' and 'Case01' differ only in letter case"):
        build_manifest(root)


@pytest.mark.parametrize("case_id", ["../evil", "a/b", ""])
def test_loaded_manifest_with_unusable_case_id_is_refused(one_case, tmp_path, case_id):
    root, _ = one_case
    path = write_manifest(build_manifest(root), tmp_path / "m.json")
    doc = json.loads(path.read_text())
    doc["cases"][0]["id"] = case_id
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=rf"m\.json: case id {re.escape(repr(case_id))} cannot be used"):
        load_manifest(path)


def test_loaded_manifest_with_duplicate_ids_names_the_id(tmp_path):
    root = tmp_path / "d"
    write_case(root, CASE, BRATS2021)
    write_case(root, "BraTS2021_00001", BRATS2021)
    path = write_manifest(build_manifest(root), tmp_path / "m.json")
    doc = json.loads(path.read_text())
    doc["cases"][1]["id"] = CASE
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=rf"case {CASE}: .*m\.json: duplicate case id"):
        load_manifest(path)


@pytest.mark.parametrize("key,value,message", [
    ("modalities", ["t1", "t2", "t1ce", "flair"], "modalities must be"),
    ("image_layout", "5d", "image_layout '5d' is not one of"),
])
def test_loaded_manifest_with_other_channels_is_refused(one_case, tmp_path, key, value, message):
    root, _ = one_case
    path = write_manifest(build_manifest(root), tmp_path / "m.json")
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)


def test_case_id_rule_is_the_writers_rule():
    from medseg_diff.data.names import SAFE_NAME as _SAFE_NAME

    assert CASE_ID_PATTERN.pattern == _SAFE_NAME.pattern


# --- 4. checksums ----------------------------------------------------------------------------------------


def test_verify_and_ensure_checksums(tmp_path):
    root = tmp_path / "d"
    for i in range(3):
        write_case(root, f"BraTS2021_{i:05d}", BRATS2021, seed=i)
    m = build_manifest(root)
    seen = []
    assert verify_checksums(m, on_case=lambda c, p: seen.append((c.id, p))) == []
    assert [s[0] for s in seen] == [c.id for c in m.cases] and all(not s[1] for s in seen)
    changed = root / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz"
    save(np.ones((16, 16, 16), np.float32), changed)
    (root / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz").unlink()
    problems = verify_checksums(m)
    assert [(p.case, Path(p.file).name) for p in problems] == [
        ("BraTS2021_00001", changed.name), ("BraTS2021_00002", "BraTS2021_00002_seg.nii.gz")]
    assert "SHA-256 mismatch" in problems[0].message and problems[1].message == "file not found"
    assert verify_checksums(m, cases=[m.cases[0]]) == []
    ensure_checksums(m, cases=m.cases[:1])
    with pytest.raises(ManifestError) as err:
        ensure_checksums(m)
    assert str(err.value).startswith(f"case BraTS2021_00001: {changed}: checksum changed")
    assert "and 1 more" in str(err.value)
