"""Scoring folders of label maps, whoever made them (``score_folders``); the evaluate stage (``stages.evaluate``,
what ``pipelines/evaluate.py`` and ``medseg-diff evaluate`` call) does steps 1-2 and the overlays, then calls it:

1. read the manifest and pick the cases (held-out test cases by default)
2. ``models`` (checkpoints or MLflow model URIs) are first predicted into ``OUT/predictions/NAME/`` by the predict
   stage; ``predictions`` are folders of any tool (``evaluation.sources``)
3. per case and region: global Dice / HD95 / sensitivity / specificity / volumes (``evaluation.metrics``), the
   BraTS lesion-wise metrics (``evaluation.lesionwise``, through panoptica), and where a folder has probability
   and uncertainty maps, uncertainty AUROC and calibration (``evaluation.scoring``: each (model, case) is a pure
   function of its files, so ``workers`` processes may score them; the results are collected in the serial order)
4. per-case CSV, markdown summary, paired comparisons (bootstrap CI + Wilcoxon) of Dice, HD95 and lesion-wise
   Dice, box plots, reliability diagram; overlays of the first cases of each model
5. MLflow: one evaluation run (params, provenance tags, the manifest as dataset input) with a nested run per
   model; the metric names are defined once, in ``METRIC_NAMES`` (and the README)
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medseg_diff.data.conventions import REGIONS, get_convention
from medseg_diff.data.manifest import Manifest
from medseg_diff.errors import DataError
from medseg_diff.evaluation.metrics import ReliabilityBins, metric_rows
from medseg_diff.evaluation.scoring import CaseFailure, ScoreJob, scored_cases
from medseg_diff.evaluation.stats import UnmatchedCasesWarning, compare_models
from medseg_diff.evaluation.tables import METRIC_FORMAT, box_plots, calibration_plot, comparison_table, summary_table, write_per_case_csv
from medseg_diff.tracking import compare_runs_url, resolve_uri, source_tags, start_tracker

log = logging.getLogger(__name__)

#: Metrics compared between two models (paired, per region and for the per-case mean over regions).
COMPARED = ("dice", "hd95_mm", "lesion_dice")
#: Per-case, per-region columns summarised per model in MLflow (``{metric}_{REGION}_case_mean`` / ``_case_median``).
REGION_METRICS = ("dice", "hd95_mm", "sensitivity", "specificity", "abs_volume_error_ml",
                  "lesion_dice", "lesion_hd95_mm", "lesion_nsd", "lesion_f1")

#: Every MLflow metric name that evaluation logs, with its one definition (the README repeats this table).
METRIC_NAMES: dict[str, str] = {
    "{metric}_{region}_case_mean": "mean over cases of the per-case value of {metric} in region TC, WT or ET",
    "{metric}_{region}_case_median": "median over cases of the same per-case values",
    "{metric}_regionavg_case_mean": "mean over cases of the per-case average of TC, WT and ET",
    "{metric}_regionavg_case_median": "median over cases of the per-case average of TC, WT and ET",
    "uncertainty_auroc_case_mean": "mean over cases of the per-case AUROC of voxel entropy for wrong voxels",
    "uncertainty_auroc_case_median": "median over cases of the same",
    "ece_case_mean": "mean over cases of the per-case ECE (15 equal bins, tumour neighbourhood)",
    "ece_pooled": "ECE of all cases' neighbourhood voxels pooled together (the reliability diagram's)",
    "seconds_case_mean": "mean inference wall time per case (s)",
    "seconds_case_median": "median inference wall time per case (s)",
    "peak_memory_mb_max": "largest peak memory of any case (MB; CUDA allocated or process RSS)",
    "cases": "number of cases scored",
    "{a}_vs_{b}.{metric}_{region}.mean_diff": "mean over cases of a − b (paired)",
    "{a}_vs_{b}.{metric}_{region}.ci_low / ci_high": "bootstrap (BCa) 95% CI of mean_diff",
    "{a}_vs_{b}.{metric}_{region}.wilcoxon_p": "two-sided Wilcoxon signed-rank p of the paired differences",
}


@dataclass
class EvalReport:
    out_dir: Path
    rows: list[dict]
    summary_markdown: str
    comparisons: dict[str, dict] = field(default_factory=dict)  # "a_vs_b" -> metric -> region -> comparison
    comparison_markdown: str = ""  # comparison.md: the paired tables, rounded (empty with fewer than two models)
    failed: dict[str, str] = field(default_factory=dict)  # "model/case" -> error
    run_id: str | None = None
    overlays: list[Path] = field(default_factory=list)
    tracking_uri: str | None = None  # the MLflow store the run was logged to
    experiment_id: str | None = None  # the run's MLflow experiment
    model_run_ids: dict[str, str] = field(default_factory=dict)  # model -> its nested run (what Compare compares)

    def mlflow_hint(self) -> str:
        """Where the MLflow run is, the command that shows it, and the address of its models' *Compare* page
        (empty without a run)."""
        if not self.run_id:
            return ""
        uri = self.tracking_uri or ""
        served = uri.startswith(("http://", "https://"))
        hint = (f"MLflow evaluation run {self.run_id} in {uri}\n"
                f"  see it: {f'open {uri}' if served else f'mlflow ui --backend-store-uri {uri}'}")
        if len(self.model_run_ids) >= 2 and self.experiment_id is not None:
            ui = uri if served else "http://127.0.0.1:5000"
            hint += (f"\n  compare the models: "
                     f"{compare_runs_url(ui, list(self.model_run_ids.values()), [self.experiment_id])}")
        return hint


def select_cases(manifest: Manifest, subset: str, fold: int = 0):
    """Labelled cases of ``subset``: test (held out), val (the fold's validation cases) or all."""
    train, val, test = manifest.split(fold)
    chosen = {"test": test, "val": val, "all": train + val + test}[subset]
    unlabelled = [c.id for c in chosen if not c.label]
    if unlabelled:
        raise DataError(manifest.source, f"case(s) {', '.join(unlabelled)} of subset '{subset}' have no label to "
                                         "score against; give them a label, or mark them \"subset\": \"unlabelled\"")
    if not chosen:
        counts = {"train": len(train), "val": len(val), "test": len(test)}
        hint = ("; build the manifest with --test-fraction > 0 to hold cases out, or pass --subset val/all"
                if subset == "test" else "")
        raise DataError(manifest.source, f"no labelled cases in subset '{subset}' (cases per subset: {counts}){hint}")
    return chosen


def score_folders(manifest: Manifest, cases: list, folders: dict[str, Path], names: list[str], out: Path, *,
                  sources: dict[str, dict], failed: dict[str, str], params: dict, overlays: list[Path] = (),
                  continue_on_error: bool = False,
                  tracking: bool = True, tracking_uri: str | None = None, experiment: str | None = None,
                  n_boot: int = 10000, lesion_task: str = "GLI", workers: int = 1) -> EvalReport:
    """Steps 3-5 of the module docstring: score every folder of ``folders`` (name -> folder of label maps) on
    ``cases``, write the tables and plots into ``out`` and log them to MLflow. ``sources``: what each name is
    (``{"kind": "folder" | "model", ...}``, logged as it is); ``failed`` (``"NAME/CASE"`` -> why) holds the cases
    that failed before scoring and receives those that fail here; ``params``: the run's MLflow parameters;
    ``overlays``: the reports exported before scoring (logged with the run); ``workers``: processes that score the
    cases (``scored_cases``; the results are the same for any number)."""
    conv = get_convention(manifest.convention)
    # 3. score: every (model, case) not failed before, in this order whatever the number of workers
    jobs = [ScoreJob(name, folders[name], case.id, manifest.path_of(case.label))
            for name in names for case in cases if f"{name}/{case.id}" not in failed]
    results, extra, bins = [], {}, {name: [] for name in names}
    with closing(scored_cases(jobs, conv.name, lesion_task, workers)) as outcomes:  # closed: the workers stop
        for job, outcome in zip(jobs, outcomes):
            if isinstance(outcome, CaseFailure):
                if not continue_on_error:
                    raise outcome.error
                failed[f"{job.name}/{job.case_id}"] = str(outcome.error)
                log.warning("skipped %s/%s: %s", job.name, job.case_id, outcome.error)
                continue
            result, per_region, case_bins = outcome
            results.append(result)
            extra[(job.name, job.case_id)] = per_region
            if case_bins is not None:
                bins[job.name].append(case_bins)
    # 4. tables and plots
    rows = metric_rows(results)
    for row in rows:
        row.update(extra[(row["model"], row["case"])][row["region"]])
    report = _write_artifacts(out, rows, names, bins, n_boot)
    report.failed, report.overlays = failed, list(overlays)
    # 5. MLflow
    if tracking:
        report.run_id = _track(report, sources, bins, manifest, params, tracking_uri, experiment)
        report.tracking_uri = resolve_uri(tracking_uri)
    return report


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
    parts = ["# Evaluation", "", summary_table(rows, metrics=("dice", "hd95_mm", "sensitivity", "specificity")), "",
             "## Lesion-wise, penalised (BraTS 2023 ranking: every missed or false-positive lesion scores Dice 0 "
             "and HD95 373 mm; panoptica's matching)", "",
             summary_table(rows, metrics=("lesion_dice_penalized", "lesion_hd95_penalized_mm", "lesion_f1")), "",
             "### Lesion-wise, matched pairs only (unpenalised: means over matched lesions, panoptica's sq_dsc / "
             "sq_hd95 / sq_nsd; missed and false lesions count only in the F1 above)", "",
             summary_table(rows, metrics=("lesion_dice", "lesion_hd95_mm", "lesion_nsd")), ""]
    comparisons, comparison_parts = {}, []
    scored = [m for m in models if any(r["model"] == m for r in rows)]
    if len(scored) >= 2:
        a, b = scored[0], scored[1]
        pair = {}
        n_cases = len({r["case"] for r in rows})
        comparison_parts = [f"# {a} vs {b}: paired comparison on {n_cases} cases", "",
                            f"Mean of {a} − {b} over the cases both models were scored on, its bootstrap (BCa) CI and "
                            "the two-sided Wilcoxon signed-rank p; regions TC, WT, ET and the per-case mean over them. "
                            "Full precision: comparison.json; per case: per_case.csv.", ""]
        for metric in COMPARED:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                comp = compare_models(rows, a, b, metric=metric, n_boot=n_boot)
            for w in caught:
                if issubclass(w.category, UnmatchedCasesWarning):  # fewer pairs than cases: say so
                    log.warning("%s, %s: %s", f"{a} vs {b}", metric, w.message)
            pair[metric] = {k: asdict(v) for k, v in comp.items()}
            section = [f"## {a} vs {b}: {METRIC_FORMAT[metric][0]}", "", comparison_table(comp, a, b, metric), ""]
            parts += section
            comparison_parts += section
        comparisons[f"{a}_vs_{b}"] = pair
    parts += ["## Uncertainty and cost", "", _cost_table(rows, scored, bins), ""]
    markdown = "\n".join(parts)
    (out / "summary.md").write_text(markdown, encoding="utf-8")
    (out / "comparison.json").write_text(json.dumps(comparisons, indent=2, default=float), encoding="utf-8")
    comparison_markdown = "\n".join(comparison_parts)
    if comparison_markdown:
        (out / "comparison.md").write_text(comparison_markdown, encoding="utf-8")
    box_plots(rows, out / "box_dice.png", metric="dice")
    box_plots(rows, out / "box_hd95.png", metric="hd95_mm")
    box_plots(rows, out / "box_lesion_dice.png", metric="lesion_dice")
    pooled = {m: pooled_bins(b) for m, b in bins.items() if b}
    if pooled:
        calibration_plot(pooled, out / "calibration.png")
    return EvalReport(out_dir=out, rows=rows, summary_markdown=markdown, comparisons=comparisons,
                      comparison_markdown=comparison_markdown)


def model_summary(rows: list[dict], model: str, bins: list[ReliabilityBins]) -> dict[str, float]:
    """The per-model MLflow metrics, named and defined as in ``METRIC_NAMES``."""
    mine = [r for r in rows if r["model"] == model]
    per_case = {r["case"]: r for r in mine}
    out: dict[str, float] = {}
    for metric in REGION_METRICS:
        if not any(metric in r for r in mine):
            continue
        by_region = {region: {r["case"]: float(r[metric]) for r in mine if r["region"] == region} for region in REGIONS}
        for region, values in by_region.items():
            v = np.array(list(values.values()))
            out[f"{metric}_{region}_case_mean"], out[f"{metric}_{region}_case_median"] = _mean_median(v)
        avg = np.array([np.mean([by_region[r][c] for r in REGIONS]) for c in per_case])
        out[f"{metric}_regionavg_case_mean"], out[f"{metric}_regionavg_case_median"] = _mean_median(avg)
    for key in ("uncertainty_auroc", "ece", "seconds"):
        values = np.array([float(r[key]) for r in per_case.values() if key in r], dtype=float)
        if values.size:
            out[f"{key}_case_mean"], out[f"{key}_case_median"] = _mean_median(values)
    out.pop("ece_case_median", None)
    if bins:
        out["ece_pooled"] = pooled_bins(bins).ece
    memory = [float(r["peak_memory_mb"]) for r in per_case.values() if "peak_memory_mb" in r]
    if memory:
        out["peak_memory_mb_max"] = float(np.nanmax(memory))
    out["cases"] = float(len(per_case))
    return out


def _mean_median(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.median(finite))


def _cost_table(rows: list[dict], models: list[str], bins) -> str:
    lines = ["| model | uncertainty AUROC (case mean) | ECE (pooled) | ECE (case mean) | seconds / case (mean) | "
             "peak memory (MB, max) |", "|---|---|---|---|---|---|"]
    for m in models:
        s = model_summary(rows, m, bins.get(m, []))
        cells = [_cell(s.get("uncertainty_auroc_case_mean"), 3), _cell(s.get("ece_pooled"), 4),
                 _cell(s.get("ece_case_mean"), 4), _cell(s.get("seconds_case_mean"), 2),
                 _cell(s.get("peak_memory_mb_max"), 0)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None, decimals: int) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{decimals}f}"


def _track(report: EvalReport, sources: dict[str, dict], bins, manifest: Manifest, params: dict,
           uri: str | None, experiment: str | None) -> str | None:
    """One parent run named after the comparison (``evaluate: a vs b, test, 6 cases``) whose description is
    comparison.md, with the paired comparison as metrics (rounded) and as an MLflow table; one child per model
    (named after it, holding its ``METRIC_NAMES`` summary) to select and *Compare*."""
    names = list(sources)
    n_cases = len({r["case"] for r in report.rows})
    provenance = {"stage": "evaluate", "dataset": manifest.name, "subset": str(params["subset"]),
                  "manifest_hash": manifest.content_hash(), **source_tags()}
    note = (report.comparison_markdown or report.summary_markdown)[:7000]  # MLflow caps a tag at 8000 characters
    parent = start_tracker(True, uri, experiment or manifest.name,
                           run_name=f"evaluate: {' vs '.join(names)}, {params['subset']}, {n_cases} cases",
                           tags=provenance | {"models": ",".join(names), "mlflow.note.content": note})
    parent.log_params({k: ("-" if v is None else v) for k, v in params.items()}
                      | {f"source.{n}": s.get("source", s.get("path")) for n, s in sources.items()})
    parent.log_dataset(manifest.name, manifest.content_hash(), str(manifest.source or manifest.root), "evaluation")
    if manifest.source is not None and Path(manifest.source).exists():
        parent.log_artifact(manifest.source, "manifest")
    for name, source in sources.items():
        run_tag = {"train_run_id": str(source["train_run_id"])} if source.get("train_run_id") else {}
        child = parent.child(name, tags=provenance | {"model": name} | run_tag)
        child.log_params({k: ("-" if v is None else v) for k, v in source.items()})
        child.log_metrics(model_summary(report.rows, name, bins.get(name, [])))
        child.end()
        report.model_run_ids[name] = child.run_id
    report.experiment_id = getattr(parent, "experiment_id", None)
    table = []
    for pair, per_metric in report.comparisons.items():
        for metric, comp in per_metric.items():
            for region, c in comp.items():
                region = "regionavg" if region == "mean" else region
                rounded = _rounded(c)
                parent.log_metrics({f"{pair}.{metric}_{region}.{k}": v for k, v in rounded.items()})
                table.append({"comparison": pair.replace("_vs_", " vs "), "metric": metric, "region": region,
                              "n": int(c["n"]), "mean_a": _round(c["mean_a"], 4), "mean_b": _round(c["mean_b"], 4),
                              **rounded})
    if table:
        parent.log_table(table, "comparison_table.json")
    for name in ("per_case.csv", "summary.md", "comparison.md", "comparison.json", "box_dice.png", "box_hd95.png",
                 "box_lesion_dice.png", "calibration.png"):
        path = report.out_dir / name
        if path.exists():
            parent.log_artifact(path)
    if (report.out_dir / "overlays").exists():
        parent.log_artifact(report.out_dir / "overlays", "overlays")
    parent.end()
    return parent.run_id


def _rounded(c: dict) -> dict[str, float]:
    """A comparison's MLflow metrics as a reader wants them in the runs table: differences and CI bounds to 4
    decimals, p to 3 significant digits (comparison.json keeps every digit)."""
    p = float(c["wilcoxon_p"])
    return {"mean_diff": _round(c["mean_diff"], 4), "ci_low": _round(c["ci_low"], 4),
            "ci_high": _round(c["ci_high"], 4), "wilcoxon_p": float(f"{p:.3g}") if np.isfinite(p) else p}


def _round(value, decimals: int) -> float:
    value = float(value)
    return round(value, decimals) if np.isfinite(value) else value
