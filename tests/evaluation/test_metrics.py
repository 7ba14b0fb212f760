"""Metrics on hand-computed tiny volumes: overlap, spacing-aware HD95, BraTS empty conventions, AUROC, ECE."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.ndimage import binary_erosion, gaussian_filter
from scipy.spatial.distance import cdist

from medseg_diff.data.conventions import REGIONS
from medseg_diff.evaluation.metrics import (
    CSV_COLUMNS,
    CaseResult,
    UndefinedMetricWarning,
    case_metrics,
    evaluation_mask,
    expected_calibration_error,
    hausdorff_distance_mm,
    metric_rows,
    region_metrics,
    reliability_bins,
    uncertainty_auroc,
    volume_diagonal_mm,
)

SHAPE = (10, 10, 12)


def cube(lo: tuple[int, int, int], size: int = 4, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = True
    return mask


def brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Reference: surfaces by one erosion, all pairwise mm distances, max of the two directed 95th percentiles."""
    pa = np.argwhere(a & ~binary_erosion(a)) * np.asarray(spacing)
    pb = np.argwhere(b & ~binary_erosion(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return float(max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95)))


# ---------------------------------------------------------------------------------------------- overlap


def test_dice_sensitivity_specificity_and_volumes_on_a_known_confusion() -> None:
    gt = cube((2, 2, 2))  # 64 voxels
    pred = cube((2, 2, 4))  # shifted 2 along z: 32 overlap
    m = region_metrics(pred, gt, spacing=(1.0, 1.0, 2.0))  # voxel = 2 mm³
    tp, fp, fn = 32, 32, 32
    tn = pred.size - tp - fp - fn
    assert m.dice == pytest.approx(2 * tp / (64 + 64))
    assert m.sensitivity == pytest.approx(tp / (tp + fn))
    assert m.specificity == pytest.approx(tn / (tn + fp))
    assert m.gt_volume_ml == pytest.approx(64 * 2 / 1000)
    assert m.pred_volume_ml == pytest.approx(64 * 2 / 1000)
    assert m.volume_error_ml == pytest.approx(0.0)


def test_volume_error_is_signed_pred_minus_gt_in_ml() -> None:
    gt = cube((2, 2, 2), size=2)  # 8 voxels
    pred = cube((2, 2, 2), size=4)  # 64 voxels ⊃ gt
    m = region_metrics(pred, gt, spacing=(2.0, 2.0, 2.5))  # 10 mm³ per voxel
    assert m.volume_error_ml == pytest.approx((64 - 8) * 10 / 1000)
    assert region_metrics(gt, pred, (2.0, 2.0, 2.5)).volume_error_ml == pytest.approx(-(64 - 8) * 10 / 1000)
    assert m.abs_volume_error_ml == pytest.approx(0.56)
    assert m.sensitivity == 1.0 and m.dice == pytest.approx(2 * 8 / 72)


# ---------------------------------------------------------------------------------------------- HD95


@pytest.mark.parametrize(
    ("offset", "spacing", "expected_mm"),
    [
        ((0, 0, 2), (1.0, 1.0, 3.0), 6.0),  # 2 voxels along the 3 mm axis
        ((2, 0, 0), (1.0, 1.0, 3.0), 2.0),  # 2 voxels along a 1 mm axis
        ((0, 3, 0), (0.5, 1.5, 3.0), 4.5),  # 3 voxels along the 1.5 mm axis
    ],
)
def test_hausdorff_of_cubes_offset_along_one_axis_is_offset_times_spacing(offset, spacing, expected_mm) -> None:
    a = cube((2, 2, 2))
    b = cube(tuple(2 + o for o in offset))
    # classic Hausdorff: every surface point of one cube is at most offset·spacing from the other's surface
    assert hausdorff_distance_mm(a, b, spacing, percentile=None) == pytest.approx(expected_mm, rel=1e-5)
    assert region_metrics(a, b, spacing).hd95_mm == pytest.approx(brute_force_hd95(a, b, spacing), rel=1e-5)


def test_hd95_of_parallel_planes_is_exactly_the_anisotropic_gap() -> None:
    a = np.zeros(SHAPE, dtype=bool)
    b = np.zeros(SHAPE, dtype=bool)
    a[:, :, 2] = True
    b[:, :, 5] = True  # 3 slices apart: every surface distance is 3 · 2.5 mm
    assert region_metrics(a, b, (0.7, 0.9, 2.5)).hd95_mm == pytest.approx(7.5, rel=1e-5)


def test_hd95_matches_brute_force_on_random_blobs_with_anisotropic_spacing() -> None:
    rng = np.random.default_rng(0)
    spacing = (0.8, 1.2, 2.5)
    for _ in range(3):
        a = gaussian_filter(rng.random((14, 12, 10)), 2) > 0.5
        b = gaussian_filter(rng.random((14, 12, 10)), 2) > 0.5
        assert a.any() and b.any()
        assert hausdorff_distance_mm(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing), rel=1e-5)


# ---------------------------------------------------------------------------------------------- empty masks


def test_both_empty_gives_dice_one_and_hd95_zero() -> None:
    empty = np.zeros(SHAPE, dtype=bool)
    m = region_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert (m.dice, m.hd95_mm, m.sensitivity, m.specificity, m.volume_error_ml) == (1.0, 0.0, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("empty_side", ["pred", "gt"])
def test_one_empty_gives_dice_zero_and_the_volume_diagonal(empty_side: str) -> None:
    spacing = (1.0, 2.0, 3.0)
    empty, full = np.zeros(SHAPE, dtype=bool), cube((1, 1, 1))
    pred, gt = (empty, full) if empty_side == "pred" else (full, empty)
    m = region_metrics(pred, gt, spacing)
    diagonal = math.sqrt((10 * 1.0) ** 2 + (10 * 2.0) ** 2 + (12 * 3.0) ** 2)
    assert m.dice == 0.0
    assert m.hd95_mm == pytest.approx(diagonal)
    assert m.sensitivity == 0.0  # gt present and missed, or gt empty with a false positive
    assert volume_diagonal_mm(SHAPE, spacing) == pytest.approx(diagonal)


def test_brats_volume_diagonal_value() -> None:
    assert volume_diagonal_mm((240, 240, 155), (1.0, 1.0, 1.0)) == pytest.approx(373.1287, abs=1e-4)


# ---------------------------------------------------------------------------------------------- cases and rows


def test_case_metrics_keys_regions_and_rows_are_flat() -> None:
    gt = np.stack([cube((2, 2, 2)), cube((1, 1, 1), size=6), np.zeros(SHAPE, dtype=bool)])
    pred = np.stack([cube((2, 2, 2)), cube((1, 1, 1), size=5), np.zeros(SHAPE, dtype=bool)])
    per_region = case_metrics(pred, gt, (1.0, 1.0, 1.0))
    assert tuple(per_region) == REGIONS
    assert per_region["TC"].dice == 1.0 and per_region["ET"].dice == 1.0
    assert per_region["WT"].dice == pytest.approx(2 * 125 / (125 + 216))
    rows = metric_rows(
        [
            CaseResult("c1", "unet", per_region, seconds=1.5, peak_memory_mb=300.0),
            CaseResult("c2", "unet", per_region),
        ]
    )
    assert len(rows) == 6
    assert list(rows[0])[: len(CSV_COLUMNS)] == list(CSV_COLUMNS)
    assert rows[0]["seconds"] == 1.5 and rows[0]["peak_memory_mb"] == 300.0
    assert "seconds" not in rows[3]
    assert [r["region"] for r in rows[:3]] == list(REGIONS)


def test_case_metrics_rejects_bad_shapes_and_probabilities() -> None:
    gt = np.zeros((3, *SHAPE), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        case_metrics(gt[:2], gt[:2], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="binary"):
        region_metrics(np.full(SHAPE, 0.7), gt[0], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        region_metrics(gt[0], gt[0], (1.0, 1.0))


# ---------------------------------------------------------------------------------------------- AUROC


def brute_force_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def test_auroc_equals_pair_count_with_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=200).astype(float)  # many ties
    labels = rng.random(200) < 0.3 + 0.1 * scores
    assert uncertainty_auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)


def test_auroc_hand_case_and_perfect_separation() -> None:
    # pos {0.5, 0.9} vs neg {0.1, 0.5}: pairs > : (0.5,0.1), (0.9,0.1), (0.9,0.5) = 3, ties: (0.5,0.5) = ½
    assert uncertainty_auroc(np.array([0.5, 0.9, 0.1, 0.5]), np.array([1, 1, 0, 0], bool)) == pytest.approx(3.5 / 4)
    u = np.linspace(0, 1, 50)
    assert uncertainty_auroc(u, u > 0.6) == 1.0
    assert uncertainty_auroc(u, u < 0.6) == 0.0


def test_auroc_mask_and_one_class_gives_nan_with_reason() -> None:
    u = np.array([0.9, 0.1, 0.8, 0.7])
    err = np.array([True, False, True, True])
    mask = np.array([True, False, True, True])
    with pytest.warns(UndefinedMetricWarning, match="no right voxels"):
        assert math.isnan(uncertainty_auroc(u, err, mask=mask))
    assert uncertainty_auroc(u, err, mask=np.ones(4, bool)) == 1.0


def test_evaluation_mask_is_dilated_union() -> None:
    pred, gt = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    pred[2, 2, 2] = gt[6, 6, 6] = True
    mask = evaluation_mask(pred, gt, iterations=1)
    assert mask.sum() == 2 * 7  # each voxel plus its 6 face neighbours
    assert evaluation_mask(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)).sum() == 0


# ---------------------------------------------------------------------------------------------- ECE


def test_ece_of_calibrated_probabilities_is_near_zero() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = rng.random(p.size) < p
    assert expected_calibration_error(p, y) < 0.01


def test_ece_of_overconfident_probabilities_is_large() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = rng.random(p.size) < p
    overconfident = np.where(p > 0.5, 0.99, 0.01)
    assert expected_calibration_error(overconfident, y) > 0.1
    assert expected_calibration_error(overconfident, y) == pytest.approx(0.24, abs=0.01)  # |0.99 − 0.75|


def test_reliability_bins_hand_case() -> None:
    p = np.array([0.05, 0.15, 0.95, 1.0])
    y = np.array([0, 1, 1, 1], bool)
    bins = reliability_bins(p, y, n_bins=10)
    assert bins.counts.tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]  # 1.0 falls in the last bin
    assert bins.frequency[0] == 0.0 and bins.mean_prob[9] == pytest.approx(0.975)
    assert np.isnan(bins.mean_prob[2])
    # ECE = (1·0.05 + 1·0.85 + 2·0.025) / 4
    assert bins.ece == pytest.approx((0.05 + 0.85 + 0.05) / 4)
    with pytest.raises(ValueError, match="within"):
        reliability_bins(np.array([1.2]), np.array([True]))


def test_ece_with_no_voxels_warns() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert math.isnan(expected_calibration_error(np.array([0.3]), np.array([True]), mask=np.array([False])))
    assert any(issubclass(w.category, UndefinedMetricWarning) for w in caught)
