"""The evaluate stage: models predicted into prediction folders (the predict stage), the first cases exported
(the export stage), then every folder scored the same way (``evaluation.run.score_folders``)."""

from __future__ import annotations

import logging
from pathlib import Path

from medseg_diff.data.manifest import load_manifest
from medseg_diff.errors import ConfigError, DataError, MedsegError
from medseg_diff.evaluation.lesionwise import get_task
from medseg_diff.evaluation.run import EvalReport, score_folders, select_cases
from medseg_diff.export import export_case
from medseg_diff.ownership import folder_lock
from medseg_diff.runtime import pin_reproducibility, resolve_device
from medseg_diff.stages.export import read_for_export
from medseg_diff.stages.models import load_model
from medseg_diff.stages.options import Cases, Sampling, Scoring, Tracking, Writing
from medseg_diff.stages.predict import predict_cases

log = logging.getLogger(__name__)


def evaluate(manifest_path: str | Path, out_dir: str | Path, models: dict[str, str | Path] | None = None,
             predictions: dict[str, str | Path] | None = None, scoring: Scoring = Scoring(),
             sampling: Sampling = Sampling(), tracking: Tracking = Tracking()) -> EvalReport:
    """Score ``models`` (name → checkpoint or MLflow model URI, predicted first) and ``predictions`` (name →
    prediction folder of any tool) on the manifest's ``scoring.subset``: ``evaluation.run``'s steps, with the
    models predicted (``sampling``; model URIs fetched from ``tracking.uri``) and the first cases exported
    first. The models predict one case at a time in this process; ``scoring.workers`` processes score the cases."""
    subset, fold, root, prior_dir = scoring.subset, scoring.fold, scoring.root, scoring.prior_dir
    export_cases, continue_on_error = scoring.export_cases, scoring.continue_on_error
    n_boot, lesion_task = scoring.n_boot, scoring.lesion_task
    device, sample_steps, ensemble, overlap = (sampling.device, sampling.sample_steps, sampling.ensemble,
                                               sampling.overlap)
    postprocess = sampling.postprocess()
    tracking_uri, experiment = tracking.uri, tracking.experiment
    models, predictions = dict(models or {}), dict(predictions or {})
    names = list(models) + list(predictions)
    if not names:
        raise DataError(None, "nothing to evaluate: give at least one --model NAME=CKPT or --predictions NAME=DIR")
    if len(set(names)) != len(names):
        raise DataError(None, f"model / prediction names must differ, got {names}")
    try:
        get_task(lesion_task)
    except ValueError as err:
        raise ConfigError("--lesion-task", str(err)) from None
    if scoring.workers < 1:
        raise ConfigError("--workers", f"must be an integer >= 1, got {scoring.workers}")
    pin_reproducibility()
    out = Path(out_dir)
    # 1. data
    manifest = load_manifest(manifest_path, root=root)
    cases = select_cases(manifest, subset, fold)
    if out.exists() and not out.is_dir():
        raise DataError(out, "the output folder is a file")
    with folder_lock(out):  # one writer: a second evaluate into a live --out is refused, its holder named
        failed: dict[str, str] = {}
        # 2. models are predicted into folders first; then every folder is scored the same way
        folders = {name: Path(path) for name, path in predictions.items()}
        sources: dict[str, dict] = {name: {"kind": "folder", "path": str(path)} for name, path in folders.items()}
        for name, source in models.items():
            folders[name], sources[name] = _predict(name, source, manifest, cases, out, device, sample_steps,
                                                    ensemble, overlap, prior_dir, continue_on_error, tracking_uri,
                                                    failed, postprocess)
        overlays = _export_overlays(folders, models, cases, export_cases, out, failed)
        params = {"subset": subset, "fold": fold, "n_boot": n_boot, "bootstrap_seed": 0,
                  "lesion_task": lesion_task, "sample_steps": sample_steps, "ensemble": ensemble, "overlap": overlap,
                  "continue_on_error": continue_on_error, "cases": len(cases)}
        return score_folders(manifest, cases, folders, names, out, sources=sources, failed=failed, params=params,
                             overlays=overlays, continue_on_error=continue_on_error, tracking=tracking.enabled,
                             tracking_uri=tracking_uri, experiment=experiment, n_boot=n_boot,
                             lesion_task=lesion_task, workers=scoring.workers)


def _predict(name, source, manifest, cases, out, device, sample_steps, ensemble, overlap, prior_dir,
             continue_on_error, tracking_uri, failed, postprocess=None) -> tuple[Path, dict]:
    """Predict ``cases`` with model ``source`` into ``OUT/predictions/NAME``; failures go to ``failed``."""
    folder = out / "predictions" / name
    model = load_model(source, resolve_device(device, key="--device"), sample_steps, ensemble, overlap=overlap,
                       tracking_uri=tracking_uri, postprocess=postprocess)
    report = predict_cases(source, manifest.source, folder, Sampling(device=device),
                           Cases(root=manifest.root, prior_dir=prior_dir, case_ids=[c.id for c in cases]),
                           Writing(name=name, continue_on_error=continue_on_error,
                                   overwrite=True),  # evaluation's own output folder: replaced case by case
                           model=model)
    failed.update({f"{name}/{case}": err for case, err in report.failed.items()})
    sampler = model.adapter.sampler_settings() or {}
    info = {"kind": "model", "source": str(source), "checkpoint": str(model.checkpoint), "model_kind": model.kind,
            "epoch": model.epoch, "train_run_id": model.run_id, "threshold": model.cfg.infer.threshold,
            "overlap": model.cfg.infer.overlap, "seed": model.cfg.experiment.seed,
            "min_lesion_mm3": model.cfg.infer.min_lesion_mm3, "min_enhancing_mm3": model.cfg.infer.min_enhancing_mm3,
            "sample_steps": sampler.get("sample_steps"), "ensemble": sampler.get("ensemble")}
    return folder, info


def _export_overlays(folders, models, cases, export_cases, out, failed) -> list[Path]:
    """Clinician overlays of the first ``export_cases`` predicted cases of each model."""
    if export_cases <= 0 or not models:
        return []
    reports = []
    for name in models:
        done = [c.id for c in cases if f"{name}/{c.id}" not in failed][:export_cases]
        for case in done:
            try:
                overlay = read_for_export(folders[name] / case)
                reports.append(export_case(overlay, out / "overlays" / name / case).report)
            except MedsegError as err:  # an overlay is a by-product: its failure is reported, scoring goes on
                failed[f"{name}/{case} (overlay)"] = str(err)
                log.warning("overlay of %s/%s not written: %s", name, case, err)
    return reports
