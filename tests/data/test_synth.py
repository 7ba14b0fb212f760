"""Synthetic BraTS-like phantoms: files, geometry, labels, contrasts, reproducibility.

Coarse spacings (4 mm, one 3 mm case) keep the whole module to a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg_diff.data.conventions import BRATS2021, BRATS2023, MODALITIES
from medseg_diff.data.synth import case_files, make_case, synthesize
from medseg_diff.data.synth.anatomy import load_anatomy, template_resolution
from medseg_diff.data.synth.case import case_rngs
from medseg_diff.data.synth.geometry import FOV_MM
from medseg_diff.data.synth.tumour import ED, ET, KINDS, NCR, draw_tumour

SPACING = 4.0
N_STATS = 6


def digests(folders: list[Path]) -> dict[str, str]:
    """SHA-256 of every file under ``folders``, keyed by file name."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for d in folders for f in sorted(d.iterdir())}


def load(path: Path) -> np.ndarray:
    """The stored array of a NIfTI file (no scaling)."""
    return np.asanyarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def run2021(tmp_path_factory) -> list[Path]:
    """Six 4 mm cases in the BraTS 2021 layout, seed 0."""
    return synthesize(tmp_path_factory.mktemp("synth2021"), N_STATS, spacing=SPACING, seed=0)


@pytest.fixture(scope="module")
def cases() -> list:
    """The same six cases in memory (with their tissue maps)."""
    return [make_case(0, i, SPACING) for i in range(N_STATS)]


# --- files and geometry -------------------------------------------------------------------------


def test_returns_case_folders_in_brats2021_layout(run2021):
    assert [d.name for d in run2021] == [f"BraTS2021_Synth_{i:05d}" for i in range(N_STATS)]
    for d in run2021:
        expected = {f"{d.name}_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair", "seg")}
        assert {f.name for f in d.iterdir()} == expected


@pytest.mark.parametrize("spacing", [SPACING, 3.0])
def test_grid_is_brats_fov_in_lps(tmp_path, run2021, spacing):
    folders = run2021[:1] if spacing == SPACING else synthesize(tmp_path, 1, spacing=spacing, seed=3)
    shape = tuple(int(np.floor(f / spacing + 0.5)) for f in FOV_MM)
    files = case_files(folders[0], BRATS2021)
    images = {k: nib.load(p) for k, p in files.items()}
    affine = images["seg"].affine
    for key, img in images.items():
        assert img.shape == shape, key
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S"), key
        np.testing.assert_allclose(img.affine, affine, err_msg=key)
        assert img.get_data_dtype() == (np.uint8 if key == "seg" else np.int16), key
    np.testing.assert_allclose(np.diag(affine)[:3], [-spacing, -spacing, spacing])
    # world coordinates are MNI-like: the brain's centre of mass lies near the origin (mm)
    brain = np.argwhere(load(files["t1"]) > 0).mean(axis=0)
    centre = affine[:3, :3] @ brain + affine[:3, 3]
    assert np.all(np.abs(centre - [0.0, -20.0, 8.0]) < 12.0), centre


def test_files_match_in_memory_case(run2021, cases):
    files = case_files(run2021[0], BRATS2021)
    for m in MODALITIES:
        np.testing.assert_array_equal(load(files[m]), cases[0].volumes[m])
    lut = np.array([0, BRATS2021.core, BRATS2021.edema, BRATS2021.enhancing])
    np.testing.assert_array_equal(load(files["seg"]), lut[cases[0].volumes["seg"]])


def test_intensities_in_realistic_range(cases):
    for case in cases:
        for m in MODALITIES:
            v = case.volumes[m]
            brain = v[v > 0]
            assert 150 < np.median(brain) < 3000, m
            assert v.max() < 8000, m


# --- labels -------------------------------------------------------------------------------------


def test_labels_2021(run2021):
    for d in run2021:
        assert set(np.unique(load(case_files(d, BRATS2021)["seg"])).tolist()) <= {0, 1, 2, 4}


def test_brats2023_layout_same_case_other_names_and_labels(tmp_path, run2021):
    (d,) = synthesize(tmp_path, 1, spacing=SPACING, seed=0, layout="brats2023")
    assert d.name == "BraTS-SYN-00000-000"
    assert {f.name for f in d.iterdir()} == {f"{d.name}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg")}
    new, old = case_files(d, BRATS2023), case_files(run2021[0], BRATS2021)
    seg23, seg21 = load(new["seg"]), load(old["seg"])
    assert set(np.unique(seg23).tolist()) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(seg23 == 3, seg21 == 4)
    for m in MODALITIES:
        np.testing.assert_array_equal(load(new[m]), load(old[m]))


def test_label_statistics(cases):
    present = {k: sum(bool((c.volumes["seg"] == k).any()) for c in cases) for k in (NCR, ED, ET)}
    assert present[NCR] >= N_STATS - 2 and present[ED] >= N_STATS - 1 and present[ET] >= N_STATS - 2, present
    adjacent, total = 0, 0
    for case in cases:
        seg = case.volumes["seg"]
        for m in MODALITIES:  # the tumour lies inside the (non-zero) brain
            assert np.all(case.volumes[m][seg > 0] > 0), m
        et, ncr = seg == ET, seg == NCR
        if et.any() and ncr.any():  # the enhancing rim wraps the necrotic core
            adjacent += int((et & ndimage.binary_dilation(ncr, iterations=1)).sum())
            total += int(et.sum())
    assert total > 0 and adjacent / total > 0.5, (adjacent, total)


def test_tumour_is_one_region_around_the_core(cases):
    for case in cases:
        components, count = ndimage.label(case.volumes["seg"] > 0, structure=np.ones((3, 3, 3)))
        core = np.isin(case.volumes["seg"], (NCR, ET))
        assert count >= 1 and set(np.unique(components[core]).tolist()) == set(range(1, count + 1))


def test_hard_cases_exist():
    # small + faint kinds ≥ 20 % of cases; the first "small" case of seed 0 has 0 < ET < 1 cm³
    assert KINDS["small"] + KINDS["faint"] >= 0.2
    anatomy = load_anatomy(template_resolution(SPACING))
    index = next(i for i in range(40) if draw_tumour(case_rngs(0, i)["tumour"], anatomy).kind == "small")
    case = make_case(0, index, SPACING)
    et_cm3 = (case.volumes["seg"] == ET).sum() * SPACING**3 / 1000
    assert case.tumour.kind == "small" and 0 < et_cm3 < 1.0


# --- contrasts ----------------------------------------------------------------------------------


def _tissue_means(case) -> dict[str, dict[str, float]]:
    """Mean signal per modality in pure CSF, GM, WM (tumour-free) and in each tumour label."""
    seg, t = case.volumes["seg"], case.tissue
    healthy = (seg == 0) & t.brain
    regions = {
        "csf": healthy & (t.csf > 0.8), "gm": healthy & (t.gm > 0.8), "wm": healthy & (t.wm > 0.9),
        "ed": seg == ED, "ncr": seg == NCR, "et": seg == ET,
    }
    return {m: {k: float(case.volumes[m][r].mean()) if r.any() else np.nan for k, r in regions.items()} for m in MODALITIES}


def test_contrasts_look_like_mri(cases):
    for case in cases:
        mu = _tissue_means(case)
        t1, t1ce, t2, flair = (mu[m] for m in MODALITIES)
        assert t1["wm"] > t1["gm"] > t1["csf"]
        assert t2["csf"] > t2["gm"] > t2["wm"]
        assert flair["csf"] < flair["wm"] and flair["csf"] < flair["gm"]
        if not np.isnan(flair["ed"]):
            assert flair["ed"] > flair["wm"] and t2["ed"] > t2["wm"]
        if not np.isnan(t1["ncr"]):
            assert t1["ncr"] < t1["wm"] and t2["ncr"] > t2["wm"]
        if not np.isnan(t1["et"]):
            assert t1ce["et"] / t1ce["wm"] > t1["et"] / t1["wm"]


def test_background_is_exactly_zero(cases):
    for case in cases:
        brain = case.tissue.brain
        for m in MODALITIES:
            v = case.volumes[m]
            assert np.all(v[~brain] == 0) and np.all(v[brain] > 0), m


# --- reproducibility and arguments --------------------------------------------------------------


def test_byte_identical_reruns_and_workers(tmp_path, run2021):
    first = digests(run2021[:2])
    again = synthesize(tmp_path / "again", 2, spacing=SPACING, seed=0)
    assert digests(again) == first
    parallel = synthesize(tmp_path / "parallel", 2, spacing=SPACING, seed=0, workers=2)
    assert digests(parallel) == first
    other = digests(synthesize(tmp_path / "other", 2, spacing=SPACING, seed=1))
    assert other.keys() == first.keys() and all(other[k] != first[k] for k in first)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cases=0), "cases"),
        (dict(cases=2.5), "cases"),
        (dict(spacing=0.1), "spacing"),
        (dict(spacing=6.0), "spacing"),
        (dict(spacing=float("nan")), "spacing"),
        (dict(layout="msd"), "layout"),
        (dict(layout="brats2019"), "layout"),
        (dict(seed=-1), "seed"),
        (dict(workers=0), "workers"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, match):
    args = dict(out=tmp_path / "out", cases=1, spacing=SPACING, seed=0, layout="brats2021") | kwargs
    with pytest.raises(ValueError, match=match):
        synthesize(**args)
    assert not (tmp_path / "out").exists()
