"""Lesion-wise BraTS metrics through panoptica on hand-built tiny volumes with hand-derived answers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.ndimage import binary_erosion, gaussian_filter
from scipy.spatial.distance import cdist

pytest.importorskip("panoptica")

from medseg_diff.data.conventions import REGIONS  # noqa: E402
from medseg_diff.evaluation.lesionwise import (  # noqa: E402
    LESION_COLUMNS,
    TASKS,
    LesionMetrics,
    LesionTask,
    get_task,
    lesion_row,
    lesion_rows,
    lesionwise_metrics,
    panoptica_results,
)

SHAPE = (20, 20, 20)
ONE_MM = (1.0, 1.0, 1.0)
PENALTY = 373.0  # official HD95 for "no lesion matched" (BraTS_evaluation parser: inf → 373)


def box(lo: tuple[int, int, int], size: tuple[int, int, int], shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = True
    return mask


def cube(lo: tuple[int, int, int], size: int = 4, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return box(lo, (size, size, size), shape)


def regions(*channels: np.ndarray) -> np.ndarray:
    """[3, X, Y, Z] from one mask (repeated for TC, WT, ET) or three masks."""
    if len(channels) == 1:
        channels = channels * 3
    return np.stack(channels)


def empty() -> np.ndarray:
    return np.zeros(SHAPE, dtype=bool)


def brute_force_pair(gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """Reference (HD95, NSD) of one lesion pair by the documented definitions, with all pairwise distances:
    surfaces by one 6-connected erosion, HD95 = 95th percentile of the pooled distances of both directions,
    NSD = mean of the two directed fractions within tolerance min(spacing)."""
    sg = np.argwhere(gt & ~binary_erosion(gt)) * np.asarray(spacing)
    sp = np.argwhere(pred & ~binary_erosion(pred)) * np.asarray(spacing)
    d = cdist(sg, sp)
    g_to_p, p_to_g = d.min(axis=1), d.min(axis=0)
    tol = min(spacing)
    hd95 = float(np.percentile(np.concatenate([g_to_p, p_to_g]), 95))
    nsd = float(((g_to_p <= tol).mean() + (p_to_g <= tol).mean()) / 2)
    return hd95, nsd


def assert_counts(m: LesionMetrics, n_ref: int, n_pred: int, tp: int, fp: int, fn: int) -> None:
    assert (m.n_ref, m.n_pred, m.tp, m.fp, m.fn) == (n_ref, n_pred, tp, fp, fn)


# ---------------------------------------------------------------------------------------------- matching


def test_hit_miss_and_false_positive_follow_the_official_rule_and_the_penalised_one() -> None:
    # GT: lesions A and B. Prediction: A exactly, B missed, one false-positive blob C far from both.
    a, b, c = cube((1, 1, 1)), cube((12, 12, 12)), cube((1, 13, 13), size=3)
    gt, pred = a | b, a | c
    # ET channel: prediction empty → TP 0 → Dice 0, NSD 0, HD95 penalty, F1 0
    out = lesionwise_metrics(regions(pred, pred, empty()), regions(gt), ONE_MM)
    assert list(out) == list(REGIONS)

    m = out["WT"]
    assert_counts(m, n_ref=2, n_pred=2, tp=1, fp=1, fn=1)
    # official: mean over matched pairs only → the single pair (A, A): Dice 1, HD95 0, NSD 1
    assert m.dice == pytest.approx(1.0)
    assert m.hd95_mm == pytest.approx(0.0)
    assert m.nsd == pytest.approx(1.0)
    # F1 = TP / (TP + ½FP + ½FN) = 1 / (1 + 0.5 + 0.5)
    assert m.f1 == pytest.approx(0.5)
    # penalised (BraTS 2023 style): (1 + 0 + 0) / (TP + FP + FN) = 1/3; HD95 (0 + 373 + 373) / 3
    assert m.dice_penalized == pytest.approx(1 / 3)
    assert m.hd95_penalized_mm == pytest.approx(2 * PENALTY / 3)
    assert out["TC"] == m

    et = out["ET"]
    assert_counts(et, n_ref=2, n_pred=0, tp=0, fp=0, fn=2)
    assert (et.dice, et.hd95_mm, et.nsd, et.f1) == (0.0, PENALTY, 0.0, 0.0)
    assert (et.dice_penalized, et.hd95_penalized_mm) == (0.0, pytest.approx(PENALTY))


def test_partial_overlap_matches_hand_dice_and_brute_force_distances_in_mm() -> None:
    gt = cube((4, 4, 4))  # 64 voxels
    pred = cube((4, 4, 5))  # shifted one voxel along z: 48 shared voxels
    spacing = (1.0, 1.0, 2.0)  # anisotropic: the shift is 2 mm; NSD tolerance = min(spacing) = 1 mm
    m = lesionwise_metrics(regions(pred), regions(gt), spacing)["TC"]
    assert_counts(m, n_ref=1, n_pred=1, tp=1, fp=0, fn=0)
    assert m.dice == pytest.approx(2 * 48 / (64 + 64))
    hd95, nsd = brute_force_pair(gt, pred, spacing)
    assert m.hd95_mm == pytest.approx(hd95)
    assert m.nsd == pytest.approx(nsd)
    assert 0.0 < m.nsd < 1.0 and m.hd95_mm == pytest.approx(2.0)  # the z faces are 2 mm apart
    assert m.dice_penalized == pytest.approx(m.dice)  # no FP/FN: the penalised variant is the same
    assert m.hd95_penalized_mm == pytest.approx(m.hd95_mm)
    assert m.f1 == pytest.approx(1.0)


def test_any_overlap_is_a_match() -> None:
    gt = cube((4, 4, 4))
    pred = cube((4, 4, 7))  # shifted 3 voxels: 16 shared voxels, Dice 2·16 / 128 = 0.25, IoU 1/7
    m = lesionwise_metrics(regions(pred), regions(gt), ONE_MM)["ET"]
    # official matching keeps pairs with Dice ≥ 1e-6 (panoptica's default, IoU ≥ 0.5, would give FP 1 + FN 1)
    assert_counts(m, n_ref=1, n_pred=1, tp=1, fp=0, fn=0)
    assert m.dice == pytest.approx(0.25)
    assert m.hd95_mm == pytest.approx(brute_force_pair(gt, pred, ONE_MM)[0])


def test_one_prediction_over_two_lesions_is_matched_to_the_better_one() -> None:
    a = box((2, 2, 2), (4, 4, 4))  # 64 voxels
    b = box((7, 2, 2), (2, 4, 4))  # 32 voxels, one voxel gap (x = 6) from A
    pred = box((2, 2, 2), (7, 4, 4))  # one blob over A, the gap and B: 112 voxels
    m = lesionwise_metrics(regions(pred), regions(a | b), ONE_MM)["WT"]
    # Dice(A, P) = 2·64 / (64 + 112) = 8/11 beats Dice(B, P) = 2·32 / (32 + 112) = 4/9 → A matched, B missed
    assert_counts(m, n_ref=2, n_pred=1, tp=1, fp=0, fn=1)
    assert m.dice == pytest.approx(8 / 11)
    assert m.f1 == pytest.approx(1 / (1 + 0.5))
    assert m.dice_penalized == pytest.approx((8 / 11) / 2)
    hd95, _ = brute_force_pair(a, pred, ONE_MM)
    assert m.hd95_mm == pytest.approx(hd95)
    assert m.hd95_penalized_mm == pytest.approx((hd95 + PENALTY) / 2)


def test_lesions_are_26_connected_components() -> None:
    gt = cube((2, 2, 2), size=3) | cube((5, 5, 5), size=3)  # touch only at a corner: (4,4,4)–(5,5,5)
    gli = lesionwise_metrics(regions(gt), regions(gt), ONE_MM, task="GLI")["WT"]
    assert_counts(gli, n_ref=1, n_pred=1, tp=1, fp=0, fn=0)
    six = LesionTask("GLI-6", "custom", connectivity=6)
    m6 = lesionwise_metrics(regions(gt), regions(gt), ONE_MM, task=six)["WT"]
    assert_counts(m6, n_ref=2, n_pred=2, tp=2, fp=0, fn=0)
    assert (gli.dice, m6.dice) == (pytest.approx(1.0), pytest.approx(1.0))


# ---------------------------------------------------------------------------------------------- empty cases


def test_both_empty_gives_the_perfect_values_or_nan_on_request() -> None:
    m = lesionwise_metrics(regions(empty()), regions(empty()), ONE_MM)["ET"]
    assert (m.dice, m.hd95_mm, m.nsd, m.f1, m.dice_penalized, m.hd95_penalized_mm) == (1.0, 0.0, 1.0, 1.0, 1.0, 0.0)
    assert_counts(m, 0, 0, 0, 0, 0)
    n = lesionwise_metrics(regions(empty()), regions(empty()), ONE_MM, both_empty_nan=True)["ET"]
    assert all(math.isnan(v) for v in (n.dice, n.hd95_mm, n.nsd, n.f1, n.dice_penalized, n.hd95_penalized_mm))
    assert_counts(n, 0, 0, 0, 0, 0)
    # and that is what panoptica itself reports for a region with no lesion anywhere (NO_INSTANCES → NaN)
    raw = panoptica_results(regions(empty()), regions(empty()), ONE_MM)["ET"]
    assert math.isnan(raw.sq_dsc) and math.isnan(raw.sq_hd95)


def test_empty_reference_with_false_positives() -> None:
    pred = cube((1, 1, 1), size=3) | cube((10, 10, 10), size=3)
    m = lesionwise_metrics(regions(pred), regions(empty()), ONE_MM)["TC"]
    assert_counts(m, n_ref=0, n_pred=2, tp=0, fp=2, fn=0)
    assert (m.dice, m.hd95_mm, m.nsd, m.f1) == (0.0, PENALTY, 0.0, 0.0)
    assert (m.dice_penalized, m.hd95_penalized_mm) == (0.0, pytest.approx(PENALTY))


def test_empty_prediction_misses_every_lesion() -> None:
    gt = cube((1, 1, 1), size=3) | cube((10, 10, 10), size=3) | cube((1, 14, 1), size=2)
    m = lesionwise_metrics(regions(empty()), regions(gt), ONE_MM)["WT"]
    assert_counts(m, n_ref=3, n_pred=0, tp=0, fp=0, fn=3)
    assert (m.dice, m.hd95_mm, m.nsd, m.f1) == (0.0, PENALTY, 0.0, 0.0)
    assert (m.dice_penalized, m.hd95_penalized_mm) == (0.0, pytest.approx(PENALTY))


# ---------------------------------------------------------------------------------------------- tasks


def test_met_scores_only_matched_lesions_of_at_least_27_mm3() -> None:
    large = cube((2, 2, 2), size=4)  # 64 mm³ ≥ 27
    small = cube((12, 12, 12), size=2)  # 8 mm³ < 27
    half_small = box((12, 12, 12), (2, 2, 1))  # 4 of its 8 voxels: Dice 2·4 / (8 + 4) = 2/3
    gt, pred = large | small, large | half_small
    gli = lesionwise_metrics(regions(pred), regions(gt), ONE_MM, task="GLI")["WT"]
    met = lesionwise_metrics(regions(pred), regions(gt), ONE_MM, task="BraTS-MET")["WT"]
    assert gli.dice == pytest.approx((1 + 2 / 3) / 2)  # every matched pair counts
    assert met.dice == pytest.approx(1.0)  # only the large lesion counts
    assert met.hd95_mm == pytest.approx(0.0) and met.nsd == pytest.approx(1.0)
    assert_counts(met, n_ref=2, n_pred=2, tp=2, fp=0, fn=0)  # detection counts keep every lesion
    assert met.dice_penalized == pytest.approx(gli.dice_penalized)

    missed_large = lesionwise_metrics(regions(half_small), regions(gt), ONE_MM, task="MET")["WT"]
    assert (missed_large.dice, missed_large.hd95_mm, missed_large.nsd) == (0.0, PENALTY, 0.0)
    only_small = lesionwise_metrics(regions(half_small), regions(small), ONE_MM, task="MET")["WT"]
    assert math.isnan(only_small.dice) and math.isnan(only_small.hd95_mm) and math.isnan(only_small.nsd)
    assert only_small.tp == 1


def test_task_lookup_and_table() -> None:
    assert get_task("BraTS-GLI") is TASKS["GLI"] is get_task("gli")
    assert set(TASKS) == {"GLI", "PED", "MEN", "GOAT", "MET"}
    for t in TASKS.values():
        assert (t.matching_threshold, t.connectivity, t.hd95_penalty_mm) == (1e-6, 26, 373.0)
    assert TASKS["MET"].large_lesion_mm3 == 27.0 and TASKS["GLI"].large_lesion_mm3 is None
    with pytest.raises(ValueError, match="unknown BraTS task"):
        get_task("LIVER")


# ---------------------------------------------------------------------------------------------- wiring


def test_panoptica_global_dice_equals_numpy_dice_per_region() -> None:
    rng = np.random.default_rng(7)
    field_p = gaussian_filter(rng.standard_normal((3, *SHAPE)), sigma=(0, 2, 2, 2))
    field_g = field_p + 0.15 * gaussian_filter(rng.standard_normal((3, *SHAPE)), sigma=(0, 1, 1, 1))
    pred, gt = field_p > 0.08, field_g > 0.08
    results = panoptica_results(pred, gt, ONE_MM)
    for i, name in enumerate(REGIONS):
        p, g = pred[i], gt[i]
        expected = 2 * np.count_nonzero(p & g) / (np.count_nonzero(p) + np.count_nonzero(g))
        assert 0.3 < expected < 0.99  # a real partial overlap, not a trivial 0 or 1
        assert float(results[name].global_bin_dsc) == pytest.approx(expected, abs=1e-12)


def test_official_values_are_panopticas_segmentation_quality() -> None:
    gt = cube((2, 2, 2)) | cube((12, 12, 12))
    pred = cube((2, 2, 3)) | box((12, 12, 12), (4, 4, 2)) | cube((2, 14, 14), size=2)
    ours = lesionwise_metrics(regions(pred), regions(gt), ONE_MM)["TC"]
    raw = panoptica_results(regions(pred), regions(gt), ONE_MM)["TC"]
    assert (ours.tp, ours.fp, ours.fn) == (raw.tp, raw.fp, raw.fn) == (2, 1, 0)
    assert ours.dice == pytest.approx(raw.sq_dsc) and ours.dice == pytest.approx((2 * 48 / 128 + 2 * 32 / 96) / 2)
    assert ours.hd95_mm == pytest.approx(raw.sq_hd95)
    assert ours.nsd == pytest.approx(raw.sq_nsd)
    assert ours.f1 == pytest.approx(raw.rq)


def test_rows_follow_lesion_columns() -> None:
    gt, pred = cube((2, 2, 2)), cube((2, 2, 3))
    out = lesionwise_metrics(regions(pred), regions(gt), ONE_MM)
    row = lesion_row(out["ET"])
    assert tuple(row) == LESION_COLUMNS
    assert row["lesion_dice"] == out["ET"].dice and row["tp_lesions"] == 1 and row["n_pred_lesions"] == 1
    rows = lesion_rows("case-1", "unet", out)
    assert [r["region"] for r in rows] == list(REGIONS)
    assert tuple(rows[0])[:3] == ("case", "model", "region") and tuple(rows[0])[3:] == LESION_COLUMNS


def test_library_use_is_quiet_even_at_half_millimetre_spacing(capsys: pytest.CaptureFixture[str]) -> None:
    import panoptica.utils.citation_reminder as reminder

    reminder._citation_reminder_enabled = True  # as in a fresh process: the banner would print on first use
    gt, pred = cube((4, 4, 4)), cube((4, 5, 4))
    spacing = (0.5, 0.5, 0.5)  # NSD tolerance 0.5 mm, where panoptica warns about its default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = lesionwise_metrics(regions(pred), regions(gt), spacing)["WT"]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    hd95, nsd = brute_force_pair(gt, pred, spacing)
    assert m.hd95_mm == pytest.approx(hd95) and m.nsd == pytest.approx(nsd)


def test_inputs_are_validated() -> None:
    good = regions(cube((2, 2, 2)))
    with pytest.raises(ValueError, match="shape"):
        lesionwise_metrics(good[:2], good[:2], ONE_MM)
    with pytest.raises(ValueError, match="spacing"):
        lesionwise_metrics(good, good, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        lesionwise_metrics(good, good, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="binary"):
        lesionwise_metrics(good * 0.7, good, ONE_MM)
    ints = lesionwise_metrics(good.astype(np.uint8), good.astype(np.int64), ONE_MM)["TC"]
    assert ints.dice == pytest.approx(1.0) and ints.tp == 1
