"""Patient-grouped splits: patient ids per case, GroupKFold-like assignment, refusal of leaking manifests, patient
mapping files, and synthetic follow-up scans (``synth --timepoints``).

Tiny volumes: 16³ factory cases and one 5 mm phantom set of 3 patients × 2 timepoints; the module takes ~15 s.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from factories import BRATS2021, BRATS2023, MSD, run_cli, write_case
from medseg_diff.cli import main
from medseg_diff.data.check import check_manifest
from medseg_diff.data.manifest import build_manifest, load_manifest, write_manifest
from medseg_diff.data.patients import grouped_splits
from medseg_diff.data.synth import synthesize
from medseg_diff.errors import ManifestError

SEEDS = (0, 1, 7)
FOLDS = (0, 2, 3, 5)
FRACTIONS = (0.0, 0.2, 0.34, 0.5)


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """``medseg-diff synth --layout brats2023 --timepoints 2``: 3 patients × 2 scans at 5 mm, and its manifest."""
    out = tmp_path_factory.mktemp("grouped") / "synth"
    rc = main(["synth", "--out", str(out), "--cases", "3", "--spacing", "5", "--layout", "brats2023",
               "--timepoints", "2", "--folds", "2", "--test-fraction", "0.34", "--seed", "0"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """BraTS 2023 layout, 16³ cases: 9 patients with 1, 2 or 3 labelled timepoints (18 cases) and an unlabelled
    follow-up of patient 1."""
    root = tmp_path_factory.mktemp("uneven") / "data"
    for p, scans in enumerate([3, 1, 2, 2, 1, 3, 2, 1, 3]):
        for t in range(scans):
            write_case(root, f"BraTS-GLI-{p:05d}-{t:03d}", BRATS2023, seed=10 * p + t)
    write_case(root, "BraTS-GLI-00001-001", BRATS2023, seed=99, label=False)
    return root


@pytest.fixture
def flat(tmp_path) -> Path:
    """BraTS 2021 layout (ids without timepoints): 6 labelled 16³ cases and one unlabelled."""
    root = tmp_path / "flat"
    for i in range(6):
        write_case(root, f"C{i}", BRATS2021, seed=i)
    write_case(root, "C9", BRATS2021, seed=9, label=False)
    return root


def patients_of(cases) -> dict[str, list]:
    found: dict[str, list] = {}
    for case in cases:
        found.setdefault(case.patient, []).append(case)
    return found


def assert_grouped(manifest, folds: int, test_fraction: float) -> None:
    """Every patient's labelled cases share one subset and fold; folds are balanced in cases; the test subset is
    as near ``test_fraction`` as whole patients allow."""
    labelled = [c for c in manifest.cases if c.subset != "unlabelled"]
    for patient, cases in patients_of(labelled).items():
        assert len({(c.subset, c.fold) for c in cases}) == 1, (patient, [(c.id, c.subset, c.fold) for c in cases])
    biggest = max(len(cases) for cases in patients_of(labelled).values())
    n_test = sum(c.subset == "test" for c in labelled)
    assert abs(n_test - round(test_fraction * len(labelled))) <= biggest - 1 or test_fraction == 0.0
    if round(test_fraction * len(labelled)) == 0:
        assert n_test == 0
    else:
        assert n_test > 0
    train = [c for c in labelled if c.subset == "train"]
    if folds >= 2:
        sizes = Counter(c.fold for c in train)
        assert set(sizes) <= set(range(folds))
        counts = [sizes.get(k, 0) for k in range(folds)]
        assert max(counts) - min(counts) <= biggest, counts
    else:
        assert all(c.fold is None for c in train)


# --- 1. patient ids -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention, case_id, patient", [
    (BRATS2023, "BraTS-GLI-00001-000", "BraTS-GLI-00001"),
    (BRATS2023, "BraTS-GLI-00001-001", "BraTS-GLI-00001"),
    (BRATS2023, "BraTS-MET-00110-000", "BraTS-MET-00110"),
    (BRATS2023, "BraTS-GLI-02073-101", "BraTS-GLI-02073"),
    (BRATS2023, "BraTS-GLI-00001", "BraTS-GLI-00001"),  # no timepoint: its own patient
    (BRATS2023, "Site-7-001", "Site-7-001"),  # not a BraTS id
    (BRATS2021, "BraTS2021_00001", "BraTS2021_00001"),
    (BRATS2021, "BraTS-GLI-00001-001", "BraTS-GLI-00001-001"),  # the 2021 convention has no timepoints
    (MSD, "BRATS_001", "BRATS_001"),
])
def test_the_convention_names_the_patient(convention, case_id, patient):
    assert convention.patient_id(case_id) == patient


def test_dicom_studies_of_one_patientid_are_one_patient():
    from types import SimpleNamespace

    from medseg_diff.data.dicom.study import case_id_of
    from medseg_diff.data.discovery import CaseFiles, patient_of

    def study(patient_id: str, uid: str) -> CaseFiles:
        case_id = case_id_of(patient_id, "20240101", uid)
        return CaseFiles(case_id, {}, dicom=SimpleNamespace(patient_id=patient_id, case_id=case_id))

    assert patient_of(study("P 001", "1.2.3"), BRATS2021) == patient_of(study("P 001", "1.2.4"), BRATS2021) == "P-001"
    anonymous = [study("", uid) for uid in ("1.2.3", "1.2.4")]  # no PatientID: no evidence of one patient
    assert [patient_of(c, BRATS2021) for c in anonymous] == [c.case_id for c in anonymous]
    assert len({c.case_id for c in anonymous}) == 2


def test_the_manifest_records_each_cases_patient(uneven, tmp_path):
    manifest = build_manifest(uneven, folds=3, test_fraction=0.2, seed=0)
    assert {c.id: c.patient for c in manifest.cases}["BraTS-GLI-00005-002"] == "BraTS-GLI-00005"
    assert all(c.patient == c.id[: -len("-000")] for c in manifest.cases)
    doc = json.loads(write_manifest(manifest, tmp_path / "m.json").read_text())
    assert [c["patient"] for c in doc["cases"]] == [c.patient for c in manifest.cases]
    loaded = load_manifest(tmp_path / "m.json")
    assert [(c.id, c.patient) for c in loaded.cases] == [(c.id, c.patient) for c in manifest.cases]


# --- 2. splits per patient -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_no_patient_is_in_two_subsets_or_folds(uneven, phantoms, seed):
    for root in (uneven, phantoms):
        for folds in FOLDS:
            for fraction in FRACTIONS:
                manifest = build_manifest(root, folds=folds, test_fraction=fraction, seed=seed)
                assert_grouped(manifest, folds, fraction)


def test_unlabelled_follow_up_stays_unlabelled(uneven):
    manifest = build_manifest(uneven, folds=3, test_fraction=0.3, seed=0)
    case = next(c for c in manifest.cases if c.label is None)
    assert (case.id, case.patient, case.subset, case.fold) == ("BraTS-GLI-00001-001", "BraTS-GLI-00001",
                                                              "unlabelled", None)


def test_folds_are_balanced_largest_patients_first():
    # sizes 3, 3, 2, 2, 1, 1, 1, 1 into 3 folds: 14 cases -> 5, 5, 4 whatever the shuffle
    sizes = [3, 3, 2, 2, 1, 1, 1, 1]
    cases = [(f"P{p}-{t}", f"P{p}") for p, n in enumerate(sizes) for t in range(n)]
    for seed in range(10):
        split = grouped_splits(cases, folds=3, test_fraction=0.0, seed=seed)
        counts = sorted(Counter(fold for _, fold in split.values()).values())
        assert counts == [4, 5, 5], (seed, counts)
    assert len({tuple(sorted(grouped_splits(cases, 3, 0.0, s).items())) for s in range(10)}) > 1  # the seed matters


def test_the_test_subset_is_whole_patients_near_the_fraction():
    cases = [(f"P{p}-{t}", f"P{p}") for p in range(10) for t in range(2)]  # 20 cases, 2 per patient
    for seed in SEEDS:
        split = grouped_splits(cases, folds=2, test_fraction=0.3, seed=seed)  # 6 cases: 3 patients
        assert sum(s == "test" for s, _ in split.values()) == 6
        test = {c.split("-")[0] for c, (s, _) in split.items() if s == "test"}
        assert len(test) == 3
    # 0.2 of 5 cases = 1: only patient Q (one case) fits, whatever the shuffle
    split = grouped_splits(cases[:4] + [("Q-0", "Q")], folds=2, test_fraction=0.2, seed=0)
    assert Counter(s for s, _ in split.values())["test"] == 1 and split["Q-0"][0] == "test"


def _previous_split(case_ids, folds, test_fraction, seed):
    """The per-case split of the versions before patients (its code, kept here as the reference)."""
    labelled = sorted(case_ids)
    random.Random(seed).shuffle(labelled)
    n_test = int(round(test_fraction * len(labelled)))
    split = {c: ("test", None) for c in labelled[:n_test]}
    split.update({c: ("train", i % folds if folds >= 2 else None) for i, c in enumerate(labelled[n_test:])})
    return split


@pytest.mark.parametrize("n", [1, 5, 13, 40])
def test_one_case_per_patient_keeps_the_previous_split(n):
    ids = [f"BraTS2021_{i:05d}" for i in range(n)]
    for seed in SEEDS:
        for folds in FOLDS:
            for fraction in FRACTIONS:
                assert grouped_splits([(c, c) for c in ids], folds, fraction, seed) == \
                    _previous_split(ids, folds, fraction, seed), (seed, folds, fraction)


def test_content_hash_covers_the_patients(uneven, flat, tmp_path):
    manifest = build_manifest(uneven, folds=3, seed=0)
    before = manifest.content_hash()
    manifest.cases[0].patient = "Someone-else"
    assert manifest.content_hash() != before
    # default patients (the case id, or the id without its timepoint) are not hashed: legacy manifests keep theirs
    path = write_manifest(build_manifest(flat, folds=2, seed=0), tmp_path / "flat.json")
    doc = json.loads(path.read_text())
    for case in doc["cases"]:
        del case["patient"]
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps(doc))
    assert load_manifest(legacy).content_hash() == load_manifest(path).content_hash()


# --- 3. refusal of a leaking manifest ------------------------------------------------------------------------------


def _edited(manifest: Path, out: Path, change) -> Path:
    doc = json.loads(manifest.read_text())
    change(doc)
    out.write_text(json.dumps(doc))
    return out


def _set(doc, case_id, subset, fold):
    case = next(c for c in doc["cases"] if c["id"] == case_id)
    case["subset"], case["fold"] = subset, fold


def test_check_refuses_a_patient_in_two_subsets(phantoms, tmp_path, capsys):
    def leak(doc):
        _set(doc, "BraTS-SYN-00001-000", "test", None)
        _set(doc, "BraTS-SYN-00001-001", "train", 1)
    edited = _edited(phantoms / "manifest.json", phantoms.parent / "leak_subsets.json", leak)
    rc, text = run_cli(capsys, "check", edited)
    assert rc == 2, text
    assert f"medseg-diff check: error: {edited}: patient BraTS-SYN-00001 is in two subsets: case " \
           "BraTS-SYN-00001-000 (test) and case BraTS-SYN-00001-001 (train, fold 1)" in text
    assert "ok  " not in text  # refused before any case was checked
    with pytest.raises(ManifestError, match="patient BraTS-SYN-00001 is in two subsets"):
        load_manifest(edited)


def test_check_refuses_a_patient_in_two_folds(phantoms, capsys):
    def leak(doc):
        _set(doc, "BraTS-SYN-00002-000", "train", 0)
        _set(doc, "BraTS-SYN-00002-001", "train", 1)
    edited = _edited(phantoms / "manifest.json", phantoms.parent / "leak_folds.json", leak)
    rc, text = run_cli(capsys, "check", edited, "--no-checksums")
    assert rc == 2 and "patient BraTS-SYN-00002 is in two folds: case BraTS-SYN-00002-000 (train, fold 0) and " \
                       "case BraTS-SYN-00002-001 (train, fold 1)" in text, text


def test_the_built_phantom_manifest_passes_check(phantoms, capsys):
    manifest = load_manifest(phantoms / "manifest.json")
    assert len(manifest.cases) == 6 and len(patients_of(manifest.cases)) == 3
    assert_grouped(manifest, 2, 0.34)
    rc, text = run_cli(capsys, "check", phantoms / "manifest.json", "--no-checksums")
    assert rc == 0 and "6 cases ok" in text, text


def test_check_manifest_reports_a_leak_made_in_memory(uneven):
    manifest = build_manifest(uneven, folds=2, seed=0)
    a, b = [c for c in manifest.cases if c.patient == "BraTS-GLI-00000"][:2]
    a.subset, a.fold = "test", None
    b.subset, b.fold = "train", 0
    problems = check_manifest(manifest, continue_on_error=True, verify_checksums=False)
    assert [p.case for p in problems] == [b.id, "BraTS-GLI-00000-002"]  # each against the patient's first case
    assert f"case {a.id} (test) and case {b.id} (train, fold 0)" in problems[0].message


def test_unlabelled_cases_are_not_part_of_the_rule(uneven, tmp_path):
    path = write_manifest(build_manifest(uneven, folds=2, test_fraction=0.3, seed=0), tmp_path / "m.json")
    doc = json.loads(path.read_text())
    labelled = next(c for c in doc["cases"] if c["patient"] == "BraTS-GLI-00001" and c["label"])
    unlabelled = next(c for c in doc["cases"] if c["patient"] == "BraTS-GLI-00001" and not c["label"])
    assert (unlabelled["subset"], unlabelled["fold"]) != (labelled["subset"], labelled["fold"])
    load_manifest(path)  # accepted: the unlabelled scan is never trained on nor scored


def test_a_legacy_manifest_without_patients_loads_and_its_timepoints_still_count(uneven, tmp_path):
    path = write_manifest(build_manifest(uneven, folds=2, seed=0), tmp_path / "m.json")

    def legacy(doc):
        for case in doc["cases"]:
            del case["patient"]
    old = _edited(path, tmp_path / "legacy.json", legacy)
    loaded = load_manifest(old)
    assert {c.id: c.patient for c in loaded.cases} == {c.id: c.patient for c in load_manifest(path).cases}
    assert loaded.content_hash() == load_manifest(path).content_hash()

    def legacy_leak(doc):
        legacy(doc)
        _set(doc, "BraTS-GLI-00000-002", "test", None)
    with pytest.raises(ManifestError, match="patient BraTS-GLI-00000 is in two subsets: case BraTS-GLI-00000-000 "
                                            r"\(train, fold \d\) and case BraTS-GLI-00000-002 \(test\)"):
        load_manifest(_edited(path, tmp_path / "legacy_leak.json", legacy_leak))


@pytest.mark.parametrize("value, message", [
    ("", "cases[0].patient: patient id '' is empty"),
    ("../P1", "cases[0].patient: patient id '../P1' is not usable"),
    (7, "cases[0].patient: expected a patient id string or null, got 7"),
])
def test_a_bad_patient_key_is_named(flat, tmp_path, value, message):
    path = write_manifest(build_manifest(flat, folds=2, seed=0), tmp_path / "m.json")
    edited = _edited(path, tmp_path / "bad.json", lambda doc: doc["cases"][0].update(patient=value))
    with pytest.raises(ManifestError, match=re.escape(message)):
        load_manifest(edited)


# --- 4. patient mapping files --------------------------------------------------------------------------------------


def _pairs(ids):
    """C0, C1 -> P0; C2, C3 -> P1; ...; C9 -> P4."""
    return {c: f"P{int(c[1:]) // 2}" for c in ids}


@pytest.mark.parametrize("form", ["csv", "json"])
def test_a_mapping_file_groups_the_cases(flat, tmp_path, capsys, form):
    mapping = _pairs(["C0", "C1", "C2", "C3", "C4", "C5", "C9"])
    path = tmp_path / f"patients.{form}"
    if form == "csv":
        path.write_text("\ufeffcase_id,patient_id,note\n" + "".join(f"{c}, {p},x\n" for c, p in mapping.items()) + "\n")
    else:
        path.write_text(json.dumps(mapping))
    for seed in SEEDS:
        manifest = build_manifest(flat, folds=2, test_fraction=0.34, seed=seed, patients=path)
        assert {c.id: c.patient for c in manifest.cases} == mapping
        assert_grouped(manifest, 2, 0.34)
    out = tmp_path / "m.json"
    rc, text = run_cli(capsys, "manifest", flat, "--out", out, "--folds", "2", "--patients", path)
    assert rc == 0 and "7 cases of 4 patients" in text, text
    assert {c.id: c.patient for c in load_manifest(out).cases} == mapping


@pytest.mark.parametrize("name, content, message", [
    ("p.csv", None, "patient mapping file not found"),
    ("p.csv", "", "the patient mapping is empty"),
    ("p.csv", "case,patient\nC0,P0\n", "line 1: header 'case,patient' lacks the column(s) case_id, patient_id"),
    ("p.csv", "case_id,patient_id\nC0\n", "line 2: 1 field(s), expected case_id and patient_id"),
    ("p.csv", "case_id,patient_id\n{all}CX,P9\n", "1 unknown case id(s) not in the data set: 'CX' (line 9)"),
    ("p.csv", "case_id,patient_id\n{all}c0,P9\n", "'c0' (line 9; did you mean 'C0'?)"),
    ("p.csv", "case_id,patient_id\nC0,P0\nC1,P0\n", "5 case(s) of the data set have no patient: C2, C3, C4, C5, C9"),
    ("p.csv", "case_id,patient_id\n{all}C0,P7\n", "line 9: case C0 is listed twice (also line 2)"),
    ("p.csv", "case_id,patient_id\nC0,\n", "line 2: case C0: patient id '' is empty"),
    ("p.csv", "case_id,patient_id\nC0,Jane Doe\n", "line 2: case C0: patient id 'Jane Doe' is not usable"),
    ("p.csv", "case_id,patient_id\nC0,../P0\n", "line 2: case C0: patient id '../P0' is not usable"),
    ("p.csv", "case_id,patient_id\n,P0\n", "line 2: the case id is empty"),
    ("p.json", "[]", "a JSON patient mapping is an object {case id: patient id}, got a list"),
    ("p.json", "{", "not a readable JSON patient mapping"),
    ("p.json", '{"C0": 5}', 'key "C0": case C0: patient id must be a string, got 5'),
])
def test_a_bad_mapping_file_is_refused_naming_it(flat, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    all_rows = "".join(f"{c},{p}\n" for c, p in _pairs(["C0", "C1", "C2", "C3", "C4", "C5", "C9"]).items())
    if content is not None:
        path.write_text(content.replace("{all}", all_rows))
    out = tmp_path / "m.json"
    rc, text = run_cli(capsys, "manifest", flat, "--out", out, "--patients", path)
    assert rc == 2 and f"medseg-diff manifest: error: {path}: " in text and message in text, text
    assert not out.exists()


# --- 5. synthetic follow-up scans ----------------------------------------------------------------------------------


def _tumour(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The whole-tumour mask of a phantom scan and its centroid in world mm."""
    image = nib.load(next(folder.glob("*-seg.nii.gz")))
    mask = np.asanyarray(image.dataobj) > 0
    centroid = image.affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + image.affine[:3, 3]
    return mask, centroid


def test_synth_writes_timepoints_of_one_patient(phantoms):
    names = sorted(p.name for p in phantoms.iterdir() if p.is_dir())
    assert names == [f"BraTS-SYN-{p:05d}-{t:03d}" for p in range(3) for t in range(2)]
    tumours = {name: _tumour(phantoms / name) for name in names}
    for p in range(3):
        (first, at_first), (later, at_later) = (tumours[f"BraTS-SYN-{p:05d}-{t:03d}"] for t in range(2))
        grids = {nib.load(f).affine.tobytes() for f in phantoms.glob(f"BraTS-SYN-{p:05d}-*/*.nii.gz")}
        assert len(grids) == 1  # one scanner grid for every file of both scans
        overlap = 2 * (first & later).sum() / (first.sum() + later.sum())
        assert 0.3 < overlap < 0.95, overlap  # the same lesion, changed a little
        assert np.linalg.norm(at_first - at_later) < 10.0  # in the same place of the same head
        others = [tumours[f"BraTS-SYN-{q:05d}-000"][1] for q in range(3) if q != p]  # other patients' tumours
        assert all(np.linalg.norm(at_first - c) > 2 * np.linalg.norm(at_first - at_later) for c in others)


def test_timepoint_zero_is_the_single_timepoint_case(phantoms, tmp_path):
    (single,) = synthesize(tmp_path / "one", 1, spacing=5.0, seed=0, layout="brats2023")
    assert single.name == "BraTS-SYN-00000-000"
    for file in single.iterdir():
        assert file.read_bytes() == (phantoms / single.name / file.name).read_bytes(), file.name
    later = phantoms / "BraTS-SYN-00000-001" / "BraTS-SYN-00000-001-t1n.nii.gz"
    assert later.read_bytes() != (single / "BraTS-SYN-00000-000-t1n.nii.gz").read_bytes()


def test_synth_refuses_timepoints_it_cannot_name(tmp_path, capsys):
    out = tmp_path / "out"
    rc, text = run_cli(capsys, "synth", "--out", out, "--cases", "1", "--spacing", "5", "--timepoints", "2")
    assert rc == 2 and "--timepoints 2 needs --layout brats2023" in text, text
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(out), "--layout", "brats2023", "--timepoints", "0"])
    assert "argument --timepoints: must be an integer >= 1, got 0" in capsys.readouterr().err
    for kwargs in (dict(layout="brats2021", timepoints=2), dict(layout="brats2023", timepoints=0),
                   dict(layout="brats2023", timepoints=1.5)):
        with pytest.raises(ValueError, match="timepoints"):
            synthesize(out, 1, spacing=5.0, **kwargs)
    assert not out.exists()
