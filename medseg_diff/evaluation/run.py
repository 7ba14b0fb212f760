"""``evaluate(...)``: what ``pipelines/evaluate.py`` and ``medseg-diff evaluate`` call.

1. read the manifest and pick the cases (held-out test cases by default)
2. for each model and case: predict on the original grid, measure Dice / HD95 / sensitivity /
   specificity / volume error per region (BraTS conventions), uncertainty AUROC and ECE, seconds
   and peak memory; keep the predictions as NIfTI and export clinician overlays for a few cases
3. per-case CSV, markdown summary, paired comparison (bootstrap CI + Wilcoxon), box plots,
   reliability diagram
4. MLflow: one evaluation run with a nested run per model, the comparison and all artifacts
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medseg_diff.data.conventions import REGIONS, LabelConvention, get_convention
from medseg_diff.data.dataset import case_record
from medseg_diff.data.manifest import Manifest, load_manifest
from medseg_diff.engine.distributed import resolve_device
from medseg_diff.engine.metrics import (
    CaseResult, ReliabilityBins, UndefinedMetricWarning, case_metrics, evaluation_mask, metric_rows,
    reliability_bins, uncertainty_auroc,
)
from medseg_diff.engine.predict_api import CasePrediction, LoadedModel, load_model, predict_case
from medseg_diff.engine.predictions import overlay_of, prior_file, write_prediction
from medseg_diff.engine.report_tables import (
    box_plots, calibration_plot, comparison_table, summary_table, write_per_case_csv,
)
from medseg_diff.engine.stats import compare_models
from medseg_diff.errors import DataError, MedsegError
from medseg_diff.export import export_case
from medseg_diff.tracking import git_commit, start_tracker


@dataclass
class EvalReport:
    out_dir: Path
    rows: list[dict]
    summary_markdown: str
    comparisons: dict[str, dict] = field(default_factory=dict)  # "a_vs_b" -> region -> PairedComparison dict
    failed: dict[str, str] = field(default_factory=dict)  # "model/case" -> error
    run_id: str | None = None
    overlays: list[Path] = field(default_factory=list)


def select_cases(manifest: Manifest, subset: str, fold: int = 0):
    """Labelled cases of ``subset``: test (held out), val (the fold's validation cases) or all."""
    train, val, test = manifest.split(fold)
    chosen = {"test": test, "val": val, "all": train + val + test}[subset]
    if not chosen:
        raise DataError(manifest.source, f"no labelled cases in subset '{subset}'")
    return chosen


def evaluate(
    manifest_path: str | Path,
    checkpoints: dict[str, str | Path],
    out_dir: str | Path,
    subset: str = "test",
    fold: int = 0,
    root: str | Path | None = None,
    device: str = "auto",
    sample_steps: int | None = None,
    ensemble: int | None = None,
    overlap: float | None = None,
    export_cases: int = 2,
    continue_on_error: bool = False,
    prior_dir: str | Path | None = None,
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    n_boot: int = 10000,
) -> EvalReport:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # 1. data
    manifest = load_manifest(manifest_path, root=root)
    conv = get_convention(manifest.convention)
    cases = select_cases(manifest, subset, fold)
    dev = resolve_device(device)
    models = {name: load_model(path, dev, sample_steps, ensemble, overlap=overlap) for name, path in checkpoints.items()}
    for name, model in models.items():
        if model.needs_prior and prior_dir is None:
            raise DataError(model.checkpoint, f"model '{name}' uses an external prior (prior_source=external): "
                                              "pass --prior-dir (e.g. the baseline's prediction folders)")
    # 2. predict and measure
    results, uncertainty, failed, overlays = [], {}, {}, []
    bins: dict[str, list[ReliabilityBins]] = {name: [] for name in models}
    for name, model in models.items():
        for i, case in enumerate(cases):
            record = case_record(manifest, case)
            try:
                if model.needs_prior:
                    record = record | {"prior": str(prior_file(Path(prior_dir), case.id))}
                pred = predict_case(model, record, conv, dev)
            except MedsegError as err:
                if not continue_on_error:
                    raise
                failed[f"{name}/{case.id}"] = str(err)
                print(f"skipped {name}/{case.id}: {err}", flush=True)
                continue
            results.append(_case_result(name, pred, conv))
            uncertainty[(name, case.id)], case_bins = _uncertainty_quality(pred, conv)
            bins[name].append(case_bins)
            overlay = overlay_of(pred, record, conv, name, model.run_id)  # reads the 4 modalities once
            write_prediction(pred, out / "predictions" / name / case.id, name, model, conv, record, overlay)
            if i < export_cases:
                overlays.append(export_case(overlay, out / "overlays" / name / case.id).report)
    # 3. tables and plots
    rows = metric_rows(results)
    for row in rows:
        row.update(uncertainty.get((row["model"], row["case"]), {}))
    report = _write_artifacts(out, rows, list(models), bins, n_boot)
    report.failed, report.overlays = failed, overlays
    # 4. MLflow
    if tracking:
        report.run_id = _track(report, models, manifest, subset, tracking_uri, experiment)
    return report


def _case_result(name: str, pred: CasePrediction, conv: LabelConvention) -> CaseResult:
    truth = conv.to_regions(pred.ground_truth)
    mask = conv.to_regions(pred.labels)
    return CaseResult(case=pred.case_id, model=name, regions=case_metrics(mask, truth, pred.spacing),
                      seconds=pred.seconds, peak_memory_mb=pred.peak_memory_mb)


def _uncertainty_quality(pred: CasePrediction, conv: LabelConvention) -> tuple[dict[str, float], ReliabilityBins]:
    """AUROC of the voxel entropy for wrong voxels, and reliability of the region probabilities,
    both within the tumour neighbourhood (pred ∪ truth, dilated 3 voxels)."""
    truth = conv.to_regions(pred.ground_truth)
    mask_pred = conv.to_regions(pred.labels)
    neighbourhood = evaluation_mask(mask_pred[1], truth[1])
    wrong = np.any(mask_pred != truth, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        auroc = uncertainty_auroc(pred.entropy, wrong, neighbourhood)
    region_mask = np.broadcast_to(neighbourhood, truth.shape)
    case_bins = reliability_bins(pred.probs, truth, mask=region_mask)
    return {"uncertainty_auroc": auroc, "ece": case_bins.ece}, case_bins


def pooled_bins(bins: list[ReliabilityBins]) -> ReliabilityBins:
    """Reliability bins of all cases together (voxel-weighted)."""
    counts = sum(b.counts for b in bins)
    sum_p = sum(np.nan_to_num(b.mean_prob) * b.counts for b in bins)
    sum_y = sum(np.nan_to_num(b.frequency) * b.counts for b in bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ReliabilityBins(bins[0].edges, counts, np.where(counts > 0, sum_p / counts, np.nan),
                               np.where(counts > 0, sum_y / counts, np.nan))


def _write_artifacts(out: Path, rows: list[dict], models: list[str], bins, n_boot: int) -> EvalReport:
    if not rows:
        raise DataError(out, "no case could be evaluated")
    write_per_case_csv(rows, out / "per_case.csv")
    parts = ["# Evaluation", "", summary_table(rows, metrics=("dice", "hd95_mm", "sensitivity", "specificity")), ""]
    comparisons = {}
    if len(models) >= 2:
        a, b = models[0], models[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            comp = compare_models(rows, a, b, metric="dice", n_boot=n_boot)
            comp_hd = compare_models(rows, a, b, metric="hd95_mm", n_boot=n_boot)
        comparisons[f"{a}_vs_{b}"] = {k: asdict(v) for k, v in comp.items()}
        parts += [f"## {a} vs {b}: Dice", "", comparison_table(comp, a, b, "dice"), "",
                  f"## {a} vs {b}: HD95 (mm)", "", comparison_table(comp_hd, a, b, "hd95_mm"), ""]
    parts += ["## Uncertainty and cost", "", _cost_table(rows, models, bins), ""]
    markdown = "\n".join(parts)
    (out / "summary.md").write_text(markdown, encoding="utf-8")
    (out / "comparison.json").write_text(json.dumps(comparisons, indent=2, default=float), encoding="utf-8")
    box_plots(rows, out / "box_dice.png", metric="dice")
    box_plots(rows, out / "box_hd95.png", metric="hd95_mm")
    pooled = {m: pooled_bins(b) for m, b in bins.items() if b}
    if pooled:
        calibration_plot(pooled, out / "calibration.png")
    return EvalReport(out_dir=out, rows=rows, summary_markdown=markdown, comparisons=comparisons)


def _cost_table(rows: list[dict], models: list[str], bins) -> str:
    lines = ["| model | uncertainty AUROC (errors) | ECE (pooled) | seconds / case | peak memory (MB) |",
             "|---|---|---|---|---|"]
    for m in models:
        per_case = {r["case"]: r for r in rows if r["model"] == m}
        if not per_case:
            continue
        auroc = np.nanmean([r.get("uncertainty_auroc", np.nan) for r in per_case.values()])
        ece = pooled_bins(bins[m]).ece if bins.get(m) else float("nan")
        secs = np.mean([r.get("seconds", np.nan) for r in per_case.values()])
        mem = np.max([r.get("peak_memory_mb", np.nan) for r in per_case.values()])
        lines.append(f"| {m} | {auroc:.3f} | {ece:.4f} | {secs:.2f} | {mem:.0f} |")
    return "\n".join(lines)


def _track(report: EvalReport, models: dict[str, LoadedModel], manifest: Manifest, subset: str,
           uri: str | None, experiment: str | None) -> str | None:
    tags = {"stage": "evaluate", "dataset": manifest.name, "subset": subset, "models": ",".join(models),
            "git_commit": git_commit(), "manifest_hash": manifest.content_hash()}
    parent = start_tracker(True, uri, experiment or manifest.name, run_name=f"evaluate-{'-vs-'.join(models)}",
                           tags=tags)
    for name, model in models.items():
        child = parent.child(name, tags={"model": name, "train_run_id": str(model.run_id), "stage": "evaluate"})
        d = model.cfg.diffusion
        child.log_params({"checkpoint": str(model.checkpoint), "model_kind": model.kind, "epoch": model.epoch,
                          "sample_steps": d.sample_steps if model.kind == "diffusion" else "-",
                          "ensemble": d.ensemble if model.kind == "diffusion" else "-"})
        child.log_metrics(_model_means(report.rows, name))
        child.end()
    for pair, comp in report.comparisons.items():
        for region, c in comp.items():
            parent.log_metrics({f"{pair}.dice_diff_{region}": c["mean_diff"], f"{pair}.ci_low_{region}": c["ci_low"],
                                f"{pair}.ci_high_{region}": c["ci_high"], f"{pair}.wilcoxon_p_{region}": c["wilcoxon_p"]})
    for name in ("per_case.csv", "summary.md", "comparison.json", "box_dice.png", "box_hd95.png", "calibration.png"):
        path = report.out_dir / name
        if path.exists():
            parent.log_artifact(path)
    if (report.out_dir / "overlays").exists():
        parent.log_artifact(report.out_dir / "overlays", "overlays")
    parent.end()
    return parent.run_id


def _model_means(rows: list[dict], model: str) -> dict[str, float]:
    mine = [r for r in rows if r["model"] == model]
    out: dict[str, float] = {}
    for metric in ("dice", "hd95_mm", "sensitivity", "specificity", "abs_volume_error_ml"):
        for region in REGIONS:
            values = [float(r[metric]) for r in mine if r["region"] == region]
            out[f"{metric}_{region}"] = float(np.mean(values))
        out[f"{metric}_mean"] = float(np.mean([out[f"{metric}_{r}"] for r in REGIONS]))
    per_case = {r["case"]: r for r in mine}
    for key in ("uncertainty_auroc", "ece", "seconds", "peak_memory_mb"):
        values = [float(r[key]) for r in per_case.values() if key in r]
        if values:
            out[f"{key}_mean"] = float(np.nanmean(values))
    out["cases"] = float(len(per_case))
    return out
