"""The audit's summary: means over cases, one row per question with the measured value, the target (the project's
mechanism targets, listed with each verdict in ``audit.verdicts`` and in README's audit table) and a plain-language
verdict; ``audit.json``, ``audit.md`` and the MLflow run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from medseg_diff.audit.verdicts import QUESTIONS, XT_MARGIN, faithfulness_ratio, rows_for


def mean_over_cases(per_case: list[dict]) -> dict:
    """The mean of every number of the per-case dicts, key by key (NaN ignored; booleans: the fraction that is
    True); strings are kept when every case has the same one."""
    if not per_case:
        return {}
    out: dict = {}
    for key in per_case[0]:
        values = [case[key] for case in per_case if key in case]
        if all(isinstance(v, dict) for v in values):
            out[key] = mean_over_cases(values)
        elif all(v is None or isinstance(v, (bool, np.bool_, int, float, np.number)) for v in values):
            numbers = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
            out[key] = float(np.nanmean(numbers)) if np.isfinite(numbers).any() else float("nan")
        elif len({str(v) for v in values}) == 1:
            out[key] = values[0]
    return out


def summarise(settings: dict, per_case: dict[str, dict]) -> dict:
    """Everything ``audit.json`` holds: settings, one row per question, the means, the per-case values and the
    headline metrics (what MLflow gets)."""
    mean = mean_over_cases(list(per_case.values()))
    rows = rows_for(settings, mean, per_case)
    return {"settings": settings, "questions": rows, "mean": mean, "per_case": per_case,
            "metrics": headline_metrics(settings, mean)}


def headline_metrics(settings: dict, mean: dict) -> dict[str, float]:
    """The numbers of the table as ``audit_*`` metrics (NaN left out)."""
    m: dict[str, float] = {"audit_cases": settings.get("cases", 0)}

    def put(name: str, value) -> None:
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            m[f"audit_{name}"] = float(value)

    put("dice_mean", mean.get("dice", {}).get("mean"))
    put("reference_entropy_auroc", mean.get("reference", {}).get("entropy_auroc"))
    put("reference_dice_mean", mean.get("reference", {}).get("dice", {}).get("mean"))
    if settings.get("model_kind") != "diffusion":
        put("entropy_auroc", mean.get("entropy_auroc"))
        for kind, values in mean.get("attention_maps", {}).items():  # e.g. the Attention U-Net's gates
            put(f"{kind}_enrichment", values.get("enrichment"))
            put(f"{kind}_pointing_game", values.get("pointing_game"))
        return m
    for version, by_t in mean["xt_use"]["dice"].items():
        for label, value in by_t.items():
            put(f"xt_{version}_{label}", value)
    for key, value in mean["refinement"].items():
        put(f"dice_{key}", value)
    put("refine_gain", mean["refinement"]["default"] - mean["refinement"].get("K1xN1", float("nan")))
    for key in ("variance_near_tumour", "disagreeing_voxels", "variance_auroc"):
        put(f"member_{key}", mean["members"][key])
    put("entropy_auroc", mean["uncertainty"]["entropy_auroc"])
    put("variance_auroc", mean["uncertainty"]["variance_auroc"])
    if "reference" in mean:
        best = max(mean["uncertainty"]["entropy_auroc"], mean["uncertainty"]["variance_auroc"])
        put("auroc_gain_over_reference", best - mean["reference"]["entropy_auroc"])
    for name, value in mean["prior"].get("dice", {}).items():
        put(f"prior_dice_{name}", value)
    for name, value in mean["prior"].get("delta", {}).items():
        put(f"prior_gain_{name}", value)
    for kind, values in mean["attention_knockouts"].items():
        put(f"knockout_delta_{kind}", values.get("delta"))
    maps = mean["attention_maps"]
    for kind in ("cross", "self"):
        put(f"{kind}_enrichment", maps[kind].get("enrichment"))
        put(f"{kind}_pointing_game", maps[kind].get("pointing_game"))
        put(f"faithfulness_{kind}", faithfulness_ratio(maps.get("faithfulness", {}), kind))
    put("cross_weight_entropy", maps.get("cross_weights", {}).get("normalised_entropy"))
    return m


def _finite(value):
    """JSON without NaN/Inf: those become null."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def markdown(result: dict) -> str:
    """``audit.md``: the question table, then the details."""
    from medseg_diff.audit.verdicts import details

    s = result["settings"]
    lines = [f"# Mechanism audit of {s['checkpoint']}", "",
             f"{s['model_kind']} model (epoch {s['epoch']}"
             + (f", prior_source {s['prior_source']}, sampler K = {s['sample_steps']} × N = {s['ensemble']} "
                f"sampling with {s['sampling_prior']}"
                if s["model_kind"] == "diffusion" else "")
             + f"); {s['cases']} labelled case(s) of {s['dataset']} ({s['subset']}), scored on the model's grid; "
             f"seed {s['seed']}, threshold {s['threshold']}, windows {tuple(s['roi'])} with overlap {s['overlap']}; "
             f"commit {s['commit']}; {s['seconds']} s on {s['device']}.", "",
             "| question | measured | target | verdict |", "| --- | --- | --- | --- |"]
    for row in result["questions"]:
        cells = [row["question"], row["measured"], row["target"], row["verdict"]]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    lines += ["", *details(result), ""]
    return "\n".join(lines)


def write_report(out: Path, result: dict) -> str:
    """Write ``OUT/audit.json`` and ``OUT/audit.md`` (each whole or not at all); returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    for name, content in (("audit.json", json.dumps(_finite(result), indent=2, allow_nan=False)), ("audit.md", text)):
        partial = out / f".{name}.partial"
        partial.write_text(content + "\n", encoding="utf-8")
        os.replace(partial, out / name)
    return text


def _experiment_of_run(uri: str | None, run_id: str | None) -> str | None:
    """The experiment of the training run ``run_id`` in the store at ``uri``, when it is there."""
    if not run_id:
        return None
    from medseg_diff.tracking import check_server, resolve_uri

    uri = resolve_uri(uri)
    check_server(uri)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name
    except Exception:  # a store without that run (moved, reset): the config's experiment
        return None


def track(out: Path, result: dict, uri: str | None, experiment: str, train_run_id: str | None) -> str | None:
    """One MLflow run in the checkpoint's experiment (its training run's, else ``experiment``): settings as params,
    the headline numbers as metrics, ``audit.json`` and ``audit.md`` as artifacts. Returns the run id."""
    from medseg_diff.tracking import source_tags, start_tracker

    s = result["settings"]
    name = _experiment_of_run(uri, train_run_id) or experiment
    tags = {"stage": "audit", "model": s["model_kind"], "dataset": s["dataset"], **source_tags()}
    if train_run_id:
        tags["train_run_id"] = str(train_run_id)
    tracker = start_tracker(True, uri, name, run_name=f"diagnose-{s['model_kind']}", tags=tags)
    try:
        tracker.log_params({k: ("-" if v is None else v) for k, v in s.items() if k != "seconds"})
        tracker.log_metrics(result["metrics"])
        for file in ("audit.json", "audit.md"):
            tracker.log_artifact(out / file)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return tracker.run_id


__all__ = ["QUESTIONS", "XT_MARGIN", "headline_metrics", "markdown", "mean_over_cases", "summarise", "track",
           "write_report"]
