"""Per-case segmentation metrics (BraTS conventions) and voxel-wise uncertainty quality.

Conventions (the README repeats them):

* Dice = 2|P∩G| / (|P|+|G|); both empty → 1.0, exactly one empty → 0.0.
* HD95 (mm) = max of the two directed 95th percentiles of surface-to-surface Euclidean distances in
  physical units (MONAI ``compute_hausdorff_distance(percentile=95, spacing=...)``; surfaces are the mask
  voxels removed by one binary erosion; percentiles interpolate linearly). Both empty → 0.0; exactly one
  empty → the **volume diagonal** ``sqrt(Σ (shape_i · spacing_i)²)`` in mm, e.g. 373.13 mm for BraTS'
  240×240×155 grid at 1 mm (the value the BraTS toolkit reports).
* Sensitivity = TP/(TP+FN); with an empty ground truth it is 1.0 if the prediction is empty too, else 0.0.
  Specificity = TN/(TN+FP) over the whole volume (so it is close to 1 for brain tumours); with no
  ground-truth negatives it is 1.0 if the prediction has no negatives either, else 0.0.
* Volumes in mL (= cm³) from the voxel count × voxel volume; volume error = pred − gt (signed).
* Uncertainty AUROC: how well the voxel uncertainty ranks wrong voxels above right ones (Mann-Whitney
  U / (n_pos·n_neg), ties count ½); NaN with an ``UndefinedMetricWarning`` when only one class is present.
* ECE: equal-width bins on [0, 1] over the **foreground probability** p (not max(p, 1−p)),
  Σ_b |B_b|/N · |mean p in b − fraction of positives in b|; bin b = [b/n, (b+1)/n), the last bin includes 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from scipy.ndimage import binary_dilation
from scipy.stats import rankdata

from medseg_diff.data.conventions import REGIONS, LabelConvention

Spacing = Sequence[float]


class UndefinedMetricWarning(RuntimeWarning):
    """A metric is undefined for this input (e.g. AUROC with one class) and was returned as NaN."""


@dataclass(frozen=True)
class RegionMetrics:
    """Metrics of one region of one case; distances in mm, volumes in mL."""

    dice: float
    hd95_mm: float
    sensitivity: float
    specificity: float
    volume_error_ml: float  # pred − gt, signed
    pred_volume_ml: float
    gt_volume_ml: float

    @property
    def abs_volume_error_ml(self) -> float:
        """|pred − gt| in mL."""
        return abs(self.volume_error_ml)


@dataclass(frozen=True)
class CaseResult:
    """Everything measured for one case and one model, ready to flatten into CSV rows."""

    case: str
    model: str
    regions: dict[str, RegionMetrics]  # keyed by REGIONS
    seconds: float | None = None  # inference wall time for the case
    peak_memory_mb: float | None = None  # peak (GPU or host) memory during inference


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width reliability diagram of a foreground probability; empty bins hold NaN."""

    edges: np.ndarray  # [n_bins + 1], 0 … 1
    counts: np.ndarray  # [n_bins] int
    mean_prob: np.ndarray  # [n_bins] mean predicted probability per bin
    frequency: np.ndarray  # [n_bins] observed fraction of positives per bin

    @property
    def ece(self) -> float:
        """Expected calibration error: count-weighted mean |mean_prob − frequency|."""
        total = int(self.counts.sum())
        if total == 0:
            return float("nan")
        filled = self.counts > 0
        gaps = np.abs(self.mean_prob[filled] - self.frequency[filled])
        return float(np.sum(self.counts[filled] * gaps) / total)


# ----------------------------------------------------------------------------------------------
# overlap, distance and volume metrics
# ----------------------------------------------------------------------------------------------


def volume_diagonal_mm(shape: Sequence[int], spacing: Spacing) -> float:
    """``sqrt(Σ (shape_i · spacing_i)²)``: the HD95 given when exactly one mask is empty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def hausdorff_distance_mm(pred: np.ndarray, gt: np.ndarray, spacing: Spacing, percentile: float | None = 95.0) -> float:
    """Symmetric (percentile) Hausdorff distance in mm between two boolean masks ``[X, Y, Z]``.

    ``percentile=None`` gives the maximum (classic Hausdorff). Empty masks follow the BraTS rules of
    the module docstring (both empty → 0, one empty → volume diagonal).
    """
    pred, gt = as_mask(pred, "pred"), as_mask(gt, "gt")
    _check_pair(pred, gt, spacing)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if has_pred != has_gt:
        return volume_diagonal_mm(gt.shape, spacing)
    y_pred = torch.from_numpy(pred)[None, None]  # [1, 1, X, Y, Z]
    y = torch.from_numpy(gt)[None, None]
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=percentile, spacing=[float(s) for s in spacing]
        )
    return float(hd[0, 0])


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks ``[X, Y, Z]``: 2|P∩G| / (|P|+|G|); 1.0 when both are empty (BraTS).

    The one Dice of the package: training's validation, evaluation and the clinician report all call it.
    """
    pred, gt = as_mask(pred, "pred"), as_mask(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    return _ratio(2 * int(np.count_nonzero(pred & gt)), n_pred + n_gt, empty=1.0)


def dice_scores(labels: np.ndarray, truth: np.ndarray, convention: LabelConvention) -> dict[str, float]:
    """Per-region Dice (TC, WT, ET) of two label maps of ``convention``; both empty -> 1.0 (BraTS)."""
    pred, ref = convention.to_regions(labels), convention.to_regions(truth)
    return {region: dice(pred[i], ref[i]) for i, region in enumerate(REGIONS)}


def region_volumes_ml(regions: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """Volume in mL (= cm³) of each region of boolean ``[3, X, Y, Z]``, keyed by REGIONS (voxel volume in mL)."""
    return {name: int(np.count_nonzero(regions[i])) * float(voxel_ml) for i, name in enumerate(REGIONS)}


def region_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> RegionMetrics:
    """Dice, HD95, sensitivity, specificity and volumes of one boolean region ``[X, Y, Z]``.

    ``spacing`` is the voxel size in mm along the array axes (X, Y, Z).
    """
    pred, gt = as_mask(pred, "pred"), as_mask(gt, "gt")
    _check_pair(pred, gt, spacing)
    tp = int(np.count_nonzero(pred & gt))
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    fp, fn = n_pred - tp, n_gt - tp
    tn = pred.size - tp - fp - fn
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pred_ml, gt_ml = n_pred * voxel_ml, n_gt * voxel_ml  # region_volumes_ml of one region
    return RegionMetrics(
        dice=dice(pred, gt),
        hd95_mm=hausdorff_distance_mm(pred, gt, spacing, percentile=95.0),
        sensitivity=_ratio(tp, tp + fn, empty=1.0 if n_pred == 0 else 0.0),
        specificity=_ratio(tn, tn + fp, empty=1.0 if n_pred == pred.size else 0.0),
        volume_error_ml=pred_ml - gt_ml,
        pred_volume_ml=pred_ml,
        gt_volume_ml=gt_ml,
    )


def case_metrics(pred_regions: np.ndarray, gt_regions: np.ndarray, spacing: Spacing) -> dict[str, RegionMetrics]:
    """``region_metrics`` of each channel of boolean ``[3, X, Y, Z]`` arrays, keyed by REGIONS (TC, WT, ET)."""
    pred_regions, gt_regions = np.asarray(pred_regions), np.asarray(gt_regions)
    expected = len(REGIONS)
    if pred_regions.ndim != 4 or pred_regions.shape[0] != expected or pred_regions.shape != gt_regions.shape:
        shapes = f"{pred_regions.shape} and {gt_regions.shape}"
        raise ValueError(f"expected pred and gt regions of shape [{expected}, X, Y, Z], got {shapes}")
    return {name: region_metrics(pred_regions[i], gt_regions[i], spacing) for i, name in enumerate(REGIONS)}


#: Column order of the per-case CSV (``seconds`` and ``peak_memory_mb`` follow when given).
CSV_COLUMNS: tuple[str, ...] = (
    "case",
    "model",
    "region",
    "dice",
    "hd95_mm",
    "sensitivity",
    "specificity",
    "volume_error_ml",
    "abs_volume_error_ml",
    "pred_volume_ml",
    "gt_volume_ml",
)


def metric_rows(results: Iterable[CaseResult]) -> list[dict[str, object]]:
    """One flat row per (case, model, region) in CSV_COLUMNS order, plus ``seconds`` / ``peak_memory_mb``
    on every row of a case that has them (the same per-case value repeated for each region)."""
    rows: list[dict[str, object]] = []
    for result in results:
        for region, metrics in result.regions.items():
            row: dict[str, object] = {"case": result.case, "model": result.model, "region": region}
            row.update(asdict(metrics))
            row["abs_volume_error_ml"] = metrics.abs_volume_error_ml
            row = {key: row[key] for key in CSV_COLUMNS}
            if result.seconds is not None:
                row["seconds"] = float(result.seconds)
            if result.peak_memory_mb is not None:
                row["peak_memory_mb"] = float(result.peak_memory_mb)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# uncertainty quality
# ----------------------------------------------------------------------------------------------


def evaluation_mask(pred: np.ndarray, gt: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Boolean mask ``[X, Y, Z]``: the union of pred and gt dilated by ``iterations`` voxels (6-connected).

    Restricts uncertainty metrics to the tumour neighbourhood, so that the easy background does not
    dominate AUROC/ECE. Empty union → an empty mask.
    """
    union = as_mask(pred, "pred") | as_mask(gt, "gt")
    if iterations <= 0 or not union.any():
        return union
    return binary_dilation(union, iterations=iterations)


def uncertainty_auroc(uncertainty: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None) -> float:
    """AUROC of ``uncertainty`` (any shape, flattened to [N]) for predicting ``error`` (bool, same shape).

    Computed as the Mann-Whitney statistic from average ranks (ties count ½), which equals the fraction
    of (wrong, right) voxel pairs where the wrong voxel is more uncertain. ``mask`` (bool, same shape)
    restricts the voxels considered. Returns NaN with an ``UndefinedMetricWarning`` when the (masked)
    voxels are all wrong or all right.
    """
    scores, labels = _flat_pair(uncertainty, error, mask, "uncertainty", "error")
    if not np.all(np.isfinite(scores)):
        raise ValueError("uncertainty contains NaN or Inf")
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        reason = "no voxels" if labels.size == 0 else ("no wrong voxels" if n_pos == 0 else "no right voxels")
        warnings.warn(f"uncertainty AUROC undefined ({reason}); returning NaN", UndefinedMetricWarning, stacklevel=2)
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties, 1-based
    u_pos = float(np.sum(ranks[labels], dtype=np.float64)) - n_pos * (n_pos + 1) / 2.0
    return u_pos / (float(n_pos) * float(n_neg))


def reliability_bins(
    probs: np.ndarray, target: np.ndarray, n_bins: int = 15, mask: np.ndarray | None = None
) -> ReliabilityBins:
    """Equal-width reliability bins of foreground probabilities ``probs`` vs boolean ``target`` (same shape)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be ≥ 1, got {n_bins}")
    p, y = _flat_pair(probs, target, mask, "probs", "target")
    p = p.astype(np.float64)
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("probs must be finite and within [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)  # bin b = [b/n, (b+1)/n); 1.0 in the last
    counts = np.bincount(index, minlength=n_bins)
    sum_p = np.bincount(index, weights=p, minlength=n_bins)
    sum_y = np.bincount(index, weights=y.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.where(counts > 0, sum_p / counts, np.nan)
        frequency = np.where(counts > 0, sum_y / counts, np.nan)
    return ReliabilityBins(edges=edges, counts=counts, mean_prob=mean_prob, frequency=frequency)


def expected_calibration_error(
    probs: np.ndarray, target: np.ndarray, n_bins: int = 15, mask: np.ndarray | None = None
) -> float:
    """Equal-width-bin ECE of foreground probabilities ``probs`` [N] against boolean ``target`` [N].

    NaN (with an ``UndefinedMetricWarning``) when no voxel is left after masking.
    """
    bins = reliability_bins(probs, target, n_bins=n_bins, mask=mask)
    if int(bins.counts.sum()) == 0:
        warnings.warn("ECE undefined (no voxels); returning NaN", UndefinedMetricWarning, stacklevel=2)
    return bins.ece


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def as_mask(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a bool array; integer/float input must hold only 0 and 1 (probabilities are refused)."""
    x = np.asarray(x)
    if x.dtype == bool:
        return x
    if x.size and not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name} must be a binary mask (bool or 0/1); threshold probabilities first")
    return x.astype(bool)


def _check_pair(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> None:
    """Raise ValueError unless pred and gt share a shape and spacing has one positive entry per axis."""
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    if len(spacing) != pred.ndim or any(not (float(s) > 0) for s in spacing):
        raise ValueError(f"spacing must hold {pred.ndim} positive values (mm), got {tuple(spacing)}")


def _ratio(num: int, den: int, empty: float) -> float:
    """num / den, or ``empty`` when den is 0."""
    return float(num) / float(den) if den else float(empty)


def _flat_pair(
    values: np.ndarray, labels: np.ndarray, mask: np.ndarray | None, values_name: str, labels_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ``values`` and boolean ``labels`` (same shape) to [N], keeping voxels where ``mask`` is set."""
    values, labels = np.asarray(values), as_mask(labels, labels_name)
    if values.shape != labels.shape:
        raise ValueError(f"{values_name} and {labels_name} shapes differ: {values.shape} vs {labels.shape}")
    if mask is None:
        return values.reshape(-1), labels.reshape(-1)
    mask = as_mask(mask, "mask")
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {mask.shape} differs from {values_name} shape {values.shape}")
    return values[mask], labels[mask]
