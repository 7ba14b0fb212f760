"""Lesion-wise BraTS metrics (TC, WT, ET) computed through panoptica, with the official per-task settings.

Since 2025 the official BraTS segmentation evaluation (``BraTS_evaluation``: ``brats-evaluate`` +
``brats-parse-metrics``) runs panoptica with one config per task. This module builds the same panoptica
pipeline in code (panoptica is MIT; the official package is not used or copied) and reduces its result
exactly as the official parser does, per region and per case.

Definitions (one region of one case; ``spacing`` = voxel size in mm per array axis)
------------------------------------------------------------------------------------

* **Lesions** are the connected components of the binary region mask, found separately in the
  prediction and the reference with 26-connectivity (panoptica ``ConnectedComponentsInstanceApproximator``,
  ``cca_backend: null`` → cc3d, whose default is 26). No dilation of the reference and no minimum lesion
  size: every component, even one voxel, is a lesion.
* **Matching** is one-to-one and globally optimal (panoptica ``MaxBipartiteMatching``: Hungarian
  assignment maximising the summed instance Dice) over the pairs whose Dice is ≥ 1e-6, i.e. any pair
  that overlaps at all may match. A prediction that touches two reference lesions is matched to one of
  them (the assignment that maximises the total Dice); the other reference lesion is a miss unless another
  predicted lesion overlaps it. TP = matched pairs, FP = unmatched predicted lesions, FN = unmatched
  reference lesions.
* **Per matched pair** (the full reference and predicted components): Dice = 2|P∩G|/(|P|+|G|);
  surfaces = mask XOR its binary erosion with the 6-connected cross; distances are Euclidean in mm
  (``distance_transform_edt(sampling=spacing)``) from each surface voxel of one mask to the nearest
  surface voxel of the other. HD95 = 95th percentile (linear interpolation) of the **pooled** distances
  of both directions — not the max of two directed percentiles that this project's global HD95 uses.
  NSD = ½·(fraction of reference-surface voxels within τ of the predicted surface + fraction of
  predicted-surface voxels within τ of the reference surface), τ = ``min(spacing)`` mm (panoptica's
  default; the official configs do not set it, and at BraTS' 1 mm grid τ = 1 mm).
* **Lesion-wise Dice / HD95 / NSD** (``lesion_dice``, ``lesion_hd95_mm``, ``lesion_nsd``) = the **mean
  over the matched pairs only** (panoptica ``sq_dsc``, ``sq_hd95``, ``sq_nsd``: the official ranking
  values). Missed and false-positive lesions do not enter these means; they are counted in ``tp/fp/fn``
  and in ``lesion_f1`` = TP / (TP + ½FP + ½FN) (panoptica ``rq``).
* **No match (TP = 0) but some lesion in either mask** → Dice 0, NSD 0, HD95 = ``hd95_penalty_mm`` =
  **373 mm** (panoptica returns ∞ for HD95 in that case and the official parser replaces ∞ by 373; it
  is a constant, unlike this project's global HD95 which uses the volume diagonal, 373.13 mm at
  240×240×155). F1 = 0.
* **Both masks empty** → Dice 1, HD95 0, NSD 1, F1 1 (the "perfect" values), counts 0. panoptica returns
  NaN here (``no_instances_result: NAN`` in the official configs) and the current parser keeps the NaN, so
  its per-cohort mean skips such cases; the BraTS 2023 lesion-wise script and the BraTS 2025 Synapse
  scoring replace it by the perfect values, which we follow by default (as does this project's global
  Dice/HD95). ``both_empty_nan=True`` gives the NaNs instead (then average with ``nanmean`` to reproduce
  the current official cohort mean). Both-empty regions are decided here without calling panoptica.
* **Penalised variants** (not the official ranking values; the BraTS 2023 style of aggregation, here on
  panoptica's matching, without the 2023 reference dilation or volume filter):
  ``lesion_dice_penalized`` = Σ_TP Dice / (TP + FP + FN) and ``lesion_hd95_penalized_mm`` =
  (Σ_TP HD95 + penalty·(FP + FN)) / (TP + FP + FN), i.e. every missed or false-positive lesion scores
  Dice 0 and HD95 373 mm. Both empty → 1 and 0 (NaN with ``both_empty_nan``).

Per-task settings (``TASKS``; checked against the sources below)
----------------------------------------------------------------

| task | official config     | matching (DSC ≥) | CC  | GT dilation | min size | HD95 penalty | parser, extra rule |
|------|---------------------|------------------|-----|-------------|----------|--------------|--------------------|
| GLI  | config_gli.yaml     | 1e-6, bipartite  | 26  | none        | none     | 373 mm       | seg                |
| PED  | config_ped.yaml     | 1e-6, bipartite  | 26  | none        | none     | 373 mm       | seg                |
| MEN  | config_MenPre.yaml  | 1e-6, bipartite  | 26  | none        | none     | 373 mm       | seg                |
| GOAT | config_GoAT.yaml    | 1e-6, bipartite  | 26  | none        | none     | 373 mm       | seg                |
| MET  | config_mets.yaml    | 1e-6, bipartite  | 26  | none        | none     | 373 mm       | mets, ≥ 27 mm³     |

All official configs share the same pipeline (they differ only in which labels form each region); the only
per-task difference in the reported lesion-wise values is MET's parser: Dice/HD95/NSD are means over the
**matched reference lesions of volume ≥ 27 mm³** (``brats-parse-metrics mets --vol_threshold 27``, as the
2025 BraTS-MET scoring calls it; the parser's default is 20), with HD95 = 373 and Dice = NSD = 0 when none of
those large lesions is matched and NaN when the reference has no large lesion (whatever the prediction; only
a case with both masks empty gets the both-empty rule above). Small lesions are scored by the official MET
parser as a separate detection F1 (Dice ≥ 0.2 counts as found), which is not reported here; ``tp/fp/fn`` and
``lesion_f1`` count all lesions for every task, as the official ``all_instance_*`` columns do.
MEN-RT (config_MenRT.yaml, a single GTV region) uses the GLI settings. The BraTS 2023 script used other
settings (reference dilation 3 for GLI/SSA/PED and 1 for MEN/MET, lesions ≤ 50 voxels ignored, ≤ 2 for MET,
penalty 374, the penalised aggregation); they are not implemented.

Where panoptica's defaults differ from the official config, the official config is followed: matching by
``MaxBipartiteMatching`` on DSC ≥ 1e-6 (panoptica's default matcher is ``NaiveThresholdMatching`` on IoU
≥ 0.5), instance metrics DSC, NSD, HD95 (default DSC, IoU, ASSD, RVD), zero-TP edge cases DSC 0, NSD 0,
HD95 ∞ and NaN when both are empty. Not followed: the official configs also compute global NSD and HD95;
panoptica 2.1.7 computes global metrics without the voxel spacing (NSD at 0.5 voxel), the official parser
does not report them, so only the global Dice is computed here (``panoptica_results(...)[r].global_bin_dsc``).

Sources: BraTS/BraTS_evaluation (commit 791134c) ``brats_evaluation/configs/config_*.yaml``,
``brats_evaluation/metrics_parser.py``; Sage-Bionetworks-Challenges/brats-infra
``evaluation/segmentation/score.py`` (commit 4d6b4b8) and ``evaluation/gandlf/score_panoptica.py`` (commit
04a917b, 2025); rachitsaluja/BraTS-2023-Metrics ``metrics.py``; panoptica 2.1.7 ``instance_matcher.py``,
``instance_evaluator.py``, ``metrics/_surface_distances.py``, ``panoptica_result.py``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg_diff.data.conventions import REGIONS
from medseg_diff.evaluation.metrics import as_mask

if TYPE_CHECKING:  # panoptica is imported lazily: importing it costs seconds
    from panoptica import Panoptica_Evaluator, PanopticaResult

Spacing = Sequence[float]

#: CSV column of each LesionMetrics field, in CSV order.
COLUMN_FIELDS: dict[str, str] = {
    "lesion_dice": "dice",
    "lesion_hd95_mm": "hd95_mm",
    "lesion_nsd": "nsd",
    "lesion_f1": "f1",
    "lesion_dice_penalized": "dice_penalized",
    "lesion_hd95_penalized_mm": "hd95_penalized_mm",
    "n_ref_lesions": "n_ref",
    "n_pred_lesions": "n_pred",
    "tp_lesions": "tp",
    "fp_lesions": "fp",
    "fn_lesions": "fn",
}
#: Column order of the lesion-wise part of a per-case CSV row.
LESION_COLUMNS: tuple[str, ...] = tuple(COLUMN_FIELDS)


@dataclass(frozen=True)
class LesionMetrics:
    """Lesion-wise metrics of one region of one case (definitions in the module docstring)."""

    dice: float  # mean Dice of matched lesion pairs (official lesion-wise Dice)
    hd95_mm: float  # mean HD95 of matched pairs in mm; 373 when nothing matched
    nsd: float  # mean NSD of matched pairs at tolerance min(spacing) mm
    f1: float  # detection F1 = TP / (TP + (FP + FN) / 2)
    dice_penalized: float  # Σ_TP Dice / (TP + FP + FN)
    hd95_penalized_mm: float  # (Σ_TP HD95 + 373·(FP + FN)) / (TP + FP + FN)
    n_ref: int  # reference lesions
    n_pred: int  # predicted lesions
    tp: int
    fp: int
    fn: int


@dataclass(frozen=True)
class LesionTask:
    """Official per-task settings (see the table in the module docstring)."""

    name: str
    config: str  # BraTS_evaluation config the settings were read from
    connectivity: int = 26  # 26 → panoptica's cc3d backend, 6 → its scipy backend
    matching_threshold: float = 1e-6  # MaxBipartiteMatching on instance Dice, score ≥ threshold
    hd95_penalty_mm: float = 373.0  # HD95 when no lesion is matched (parser: ∞ → 373)
    large_lesion_mm3: float | None = None  # MET: lesion-wise means over matched reference lesions ≥ this


#: Settings per task, keyed by upper-case name ("BraTS-" prefixes are accepted by ``get_task``).
TASKS: dict[str, LesionTask] = {
    t.name: t
    for t in (
        LesionTask("GLI", "config_gli.yaml"),
        LesionTask("PED", "config_ped.yaml"),
        LesionTask("MEN", "config_MenPre.yaml"),
        LesionTask("GOAT", "config_GoAT.yaml"),
        LesionTask("MET", "config_mets.yaml", large_lesion_mm3=27.0),
    )
}


def get_task(task: str | LesionTask) -> LesionTask:
    """The settings of ``task`` ("GLI", "brats-gli", "MET", ...), or ``task`` itself if already settings."""
    if isinstance(task, LesionTask):
        return task
    key = str(task).strip().upper()
    key = key.removeprefix("BRATS-").removeprefix("BRATS_")
    try:
        return TASKS[key]
    except KeyError:
        raise ValueError(f"unknown BraTS task '{task}'; known: {', '.join(TASKS)}") from None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def lesionwise_metrics(
    pred_regions: np.ndarray,
    gt_regions: np.ndarray,
    spacing: Spacing,
    task: str | LesionTask = "GLI",
    *,
    both_empty_nan: bool = False,
) -> dict[str, LesionMetrics]:
    """Lesion-wise metrics of each channel of boolean ``[3, X, Y, Z]`` region arrays, keyed by REGIONS.

    ``spacing`` is the voxel size in mm along X, Y, Z; ``task`` picks the official settings (``TASKS``).
    ``both_empty_nan=True`` returns NaN (as panoptica does) instead of the perfect values for a region
    that is empty in both masks.
    """
    settings = get_task(task)
    pred_regions, gt_regions = _check_regions(pred_regions, gt_regions, spacing)
    out: dict[str, LesionMetrics] = {}
    for i, name in enumerate(REGIONS):
        pred, gt = pred_regions[i], gt_regions[i]
        if not pred.any() and not gt.any():
            out[name] = _both_empty(both_empty_nan)
            continue
        result = _evaluate_region(pred, gt, spacing, settings)
        out[name] = _reduce(result, settings)
    return out


def panoptica_results(
    pred_regions: np.ndarray, gt_regions: np.ndarray, spacing: Spacing, task: str | LesionTask = "GLI"
) -> dict[str, PanopticaResult]:
    """panoptica's raw ``PanopticaResult`` of each region (keyed by REGIONS), with the task's pipeline.

    For inspection and cross-checks (``sq_dsc``, ``rq``, ``global_bin_dsc``, per-lesion rows from
    ``to_dict(True)["reference_instances"]``); empty regions are passed to panoptica as they are.
    """
    settings = get_task(task)
    pred_regions, gt_regions = _check_regions(pred_regions, gt_regions, spacing)
    return {
        name: _evaluate_region(pred_regions[i], gt_regions[i], spacing, settings) for i, name in enumerate(REGIONS)
    }


def lesion_row(metrics: LesionMetrics) -> dict[str, float | int]:
    """One region's values keyed by LESION_COLUMNS, in that order."""
    return {column: getattr(metrics, field) for column, field in COLUMN_FIELDS.items()}


def lesion_rows(case: str, model: str, regions: Mapping[str, LesionMetrics]) -> list[dict[str, object]]:
    """One flat row per region: ``case``, ``model``, ``region`` and then LESION_COLUMNS."""
    return [{"case": case, "model": model, "region": region, **lesion_row(m)} for region, m in regions.items()]


# ----------------------------------------------------------------------------------------------
# panoptica pipeline
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _evaluator(connectivity: int, matching_threshold: float) -> Panoptica_Evaluator:
    """The official BraTS panoptica pipeline (the configs differ only in label groups) for one binary region."""
    from panoptica import (
        CCABackend,
        ConnectedComponentsInstanceApproximator,
        InputType,
        MaxBipartiteMatching,
        Metric,
        Panoptica_Evaluator,
    )
    from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling

    backends = {26: CCABackend.cc3d, 6: CCABackend.scipy}  # cc3d's default is 26, scipy.ndimage.label's 6
    if connectivity not in backends:
        raise ValueError(f"connectivity must be 6 or 26 (panoptica's CC backends), got {connectivity}")

    def zero_tp(value: EdgeCaseResult) -> MetricZeroTPEdgeCaseHandling:
        return MetricZeroTPEdgeCaseHandling(
            empty_prediction_result=value,
            empty_reference_result=value,
            no_instances_result=EdgeCaseResult.NAN,
            normal=value,
        )

    edge_cases = EdgeCaseHandler(
        listmetric_zeroTP_handling={
            Metric.DSC: zero_tp(EdgeCaseResult.ZERO),
            Metric.NSD: zero_tp(EdgeCaseResult.ZERO),
            Metric.HD95: zero_tp(EdgeCaseResult.INF),
        },
        empty_list_std=EdgeCaseResult.NAN,
    )
    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(cca_backend=backends[connectivity]),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=matching_threshold),
        edge_case_handler=edge_cases,
        instance_metrics=[Metric.DSC, Metric.NSD, Metric.HD95],
        global_metrics=[Metric.DSC],
        decision_metric=None,
        decision_threshold=None,
        log_times=False,
        verbose=False,
    )


def _evaluate_region(pred: np.ndarray, gt: np.ndarray, spacing: Spacing, settings: LesionTask) -> PanopticaResult:
    """panoptica on one binary region pair (uint8 0/1 label maps, one class group)."""
    from panoptica import disable_citation_reminder

    evaluator = _evaluator(settings.connectivity, settings.matching_threshold)
    disable_citation_reminder()  # otherwise the first evaluation of a process prints a rich banner to stdout
    with warnings.catch_warnings():
        # NSD warns whenever its tolerance equals 0.5, which is min(spacing) for 0.5 mm voxels: not a problem here
        warnings.filterwarnings("ignore", message="The threshold is set to 0.5", category=UserWarning)
        results = evaluator.evaluate(
            pred.astype(np.uint8),
            gt.astype(np.uint8),
            voxelspacing=tuple(float(s) for s in spacing),
            verbose=False,
            log_times=False,
        )
    (result,) = results.values()  # no class groups → a single "ungrouped" result
    return result


def _reduce(result: PanopticaResult, settings: LesionTask) -> LesionMetrics:
    """LesionMetrics from a panoptica result of a region with at least one lesion (module docstring rules)."""
    tp, n_pred, n_ref = int(result.tp), int(result.n_pred_instances), int(result.n_ref_instances)
    fp, fn = n_pred - tp, n_ref - tp
    penalty = float(settings.hd95_penalty_mm)
    rows = result.to_dict(output_individual_instance_metrics=True).get("reference_instances", [])
    matched = [r for r in rows if r.get("is_matched") == 1]
    if len(matched) != tp:
        raise RuntimeError(f"panoptica reported {tp} matches but {len(matched)} matched lesion rows")
    dsc = [float(r["sq_dsc"]) for r in matched]
    hd95 = [float(r["sq_hd95"]) for r in matched]

    if settings.large_lesion_mm3 is None:  # "seg" parser: panoptica's sq_* with ∞ → penalty
        dice, hd, ns = float(result.sq_dsc), float(result.sq_hd95), float(result.sq_nsd)
        hd = penalty if math.isinf(hd) else hd
    else:  # "mets" parser: means over matched large reference lesions
        dice, hd, ns = _large_lesion_means(rows, settings.large_lesion_mm3, penalty)

    denom = tp + fp + fn
    return LesionMetrics(
        dice=dice,
        hd95_mm=hd,
        nsd=ns,
        f1=float(result.rq),
        dice_penalized=sum(dsc) / denom,
        hd95_penalized_mm=(sum(hd95) + penalty * (fp + fn)) / denom,
        n_ref=n_ref,
        n_pred=n_pred,
        tp=tp,
        fp=fp,
        fn=fn,
    )


def _large_lesion_means(rows: list[dict[str, Any]], threshold_mm3: float, penalty: float) -> tuple[float, float, float]:
    """(Dice, HD95, NSD) means over matched reference lesions ≥ threshold_mm3 (the official MET rule)."""
    large = [r for r in rows if r.get("volume") is not None and float(r["volume"]) >= threshold_mm3]
    if not large:
        return math.nan, math.nan, math.nan
    hits = [r for r in large if r.get("is_matched") == 1]
    if not hits:
        return 0.0, penalty, 0.0
    finite_hd = [float(r["sq_hd95"]) for r in hits if math.isfinite(float(r["sq_hd95"]))]
    return (
        float(np.mean([float(r["sq_dsc"]) for r in hits])),
        float(np.mean(finite_hd)) if finite_hd else penalty,
        float(np.mean([float(r["sq_nsd"]) for r in hits])),
    )


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _both_empty(as_nan: bool) -> LesionMetrics:
    """A region with no lesion in either mask: perfect values, or NaN as panoptica reports them."""
    nan = math.nan
    return LesionMetrics(
        dice=nan if as_nan else 1.0,
        hd95_mm=nan if as_nan else 0.0,
        nsd=nan if as_nan else 1.0,
        f1=nan if as_nan else 1.0,
        dice_penalized=nan if as_nan else 1.0,
        hd95_penalized_mm=nan if as_nan else 0.0,
        n_ref=0,
        n_pred=0,
        tp=0,
        fp=0,
        fn=0,
    )


def _check_regions(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``[3, X, Y, Z]`` pred and gt of one shape, and 3 positive spacings; ValueError otherwise."""
    pred, gt = as_mask(pred, "pred_regions"), as_mask(gt, "gt_regions")
    expected = len(REGIONS)
    if pred.ndim != 4 or pred.shape[0] != expected or pred.shape != gt.shape:
        shapes = f"{pred.shape} and {gt.shape}"
        raise ValueError(f"expected pred and gt regions of shape [{expected}, X, Y, Z], got {shapes}")
    if len(spacing) != 3 or any(not (float(s) > 0) for s in spacing):
        raise ValueError(f"spacing must hold 3 positive values (mm), got {tuple(spacing)}")
    return pred, gt

