"""``run_audit(...)``: the mechanism audit the diagnose stage runs (``medseg-diff diagnose``, ``pipelines/diagnose.py``).

1. load the model (``loader``: a checkpoint file, or through ``stages.diagnose`` an MLflow model URI) and, with
   ``reference``, a second model (a U-Net) whose entropy is the bar for the diffusion model's uncertainty
2. preprocess each labelled case of the subset onto the model's grid (``audit.cases``)
3. a diffusion model: questions 1-7 per case (``audit.probe``, ``audit.maps``); a U-Net: its Dice and the AUROC of
   its entropy, the diffusion questions marked "not applicable"
4. means over cases, a verdict per question (``audit.report``), ``OUT/audit.json`` and ``OUT/audit.md``
5. MLflow, when tracking is on (the checkpoint's ``tracking.enabled`` or a ``tracking_uri``; ``tracking=False``
   turns it off): a run in the checkpoint's experiment with the settings as params, the headline numbers as
   ``audit_*`` metrics and both files as artifacts
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg_diff.audit.cases import AuditCase, case_records, load_case, with_next
from medseg_diff.audit.maps import attention_maps, map_scores
from medseg_diff.audit.probe import (
    ENSEMBLE_GRID, STEPS_GRID, DiffusionProbe, member_summary, outside_head_zeroed, region_dice,
)
from medseg_diff.audit.report import summarise, write_report
from medseg_diff.audit.windows import Windowing
from medseg_diff.errors import ConfigError, DataError
from medseg_diff.inference.loading import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass
class AuditReport:
    out_dir: Path
    result: dict  # what audit.json holds
    markdown: str  # what audit.md holds
    run_id: str | None = None  # the MLflow run, when tracked


def diffusion_case(probe: DiffusionProbe, case: AuditCase, other: AuditCase | None) -> dict:
    """Every question for one case of a diffusion model."""
    default = probe.default_run(case)
    summary = member_summary(default, case, probe.threshold, probe.default[1])
    base = summary["dice"]["mean"]
    prior = probe.prior_knockouts(case, other)
    if prior.get("applicable"):  # the model's own prior: what the product predicts
        prior["dice"]["own"] = base
        prior["delta"]["own"] = base - prior["dice"]["none"]
    return {
        "dice": summary["dice"],
        "xt_use": probe.xt_use(case),
        "refinement": probe.refinement(case, base),
        "members": {k: summary[k] for k in ("variance_near_tumour", "variance_max", "disagreeing_voxels",
                                            "variance_auroc")},
        "uncertainty": {"entropy_auroc": summary["entropy_auroc"], "variance_auroc": summary["variance_auroc"]},
        "prior": prior,
        "attention_knockouts": probe.attention_knockouts(case, base),
        "attention_maps": attention_maps(probe, case, default),
    }


def plain_case(model, case: AuditCase, seed: int) -> dict:
    """Dice and the AUROC of the predictive entropy for errors, with the model's own product segmenter."""
    from medseg_diff.evaluation.scoring import uncertainty_quality

    prediction = Windowing.of(model.cfg).run(model.adapter.segmenter(model.net, seed=seed), case.image)
    probs = outside_head_zeroed(prediction.probs.float().cpu().numpy(), case.head)
    entropy = outside_head_zeroed(prediction.entropy.float().cpu().numpy(), case.head)[0]
    threshold = float(model.cfg.infer.threshold)
    quality, _ = uncertainty_quality(probs, entropy, probs > threshold, case.regions)
    out = {"dice": region_dice(probs, case.regions, threshold), "entropy_auroc": quality["uncertainty_auroc"]}
    if prediction.attention:  # e.g. the Attention U-Net's gates: scored like the diffusion model's maps
        out["attention_maps"] = map_scores(prediction, case)
    return out


def _check_reference(model, reference, source) -> None:
    if reference.adapter.external_prior:
        raise ConfigError("--reference", f"{source} needs an external prior per case; give a model without one "
                                         "(the plain U-Net)")
    if model.cfg.data.spacing != reference.cfg.data.spacing:
        raise ConfigError("--reference", f"{source} resamples to {reference.cfg.data.spacing} mm but the audited "
                                         f"checkpoint to {model.cfg.data.spacing} mm: the two would not predict on "
                                         "one grid; give a reference trained at the same spacing")


def run_audit(
    checkpoint: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    subset: str = "test",
    fold: int = 0,
    root: str | Path | None = None,
    max_cases: int | None = None,
    reference: str | Path | None = None,
    device: str = "auto",
    seed: int | None = None,
    tracking: bool | None = None,
    tracking_uri: str | None = None,
    steps_grid: Sequence[int] = STEPS_GRID,
    ensemble_grid: Sequence[int] = ENSEMBLE_GRID,
    loader: Callable[..., LoadedModel] = load_model,
) -> AuditReport:
    """Audit ``checkpoint`` on the labelled cases of ``manifest``'s ``subset``; see the module docstring.
    ``seed`` (default: the checkpoint's) seeds the sampler, the x_t noise and the random occlusion;
    ``tracking`` None follows the checkpoint's config (on also when ``tracking_uri`` is given). ``loader(source,
    device, seed=)`` loads ``checkpoint`` and ``reference``: a checkpoint file by default; the diagnose stage passes
    one that also fetches MLflow model URIs (``stages.models.load_model``)."""
    from medseg_diff.runtime import pin_reproducibility, resolve_device
    from medseg_diff.tracking import git_commit

    if max_cases is not None and max_cases < 1:
        raise ConfigError("--max-cases", f"must be >= 1, got {max_cases}")
    if not steps_grid or not ensemble_grid or min(*steps_grid, *ensemble_grid) < 1:
        raise ConfigError("--steps-grid / --ensemble-grid", "need at least one value each, all >= 1")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(out, "the output folder is a file")
    pin_reproducibility()
    dev = resolve_device(device, key="--device")
    # 1. models
    model = loader(checkpoint, dev, seed=seed)
    ref = None
    if reference is not None:
        ref = loader(reference, dev, seed=seed)
        _check_reference(model, ref, reference)
    seed = int(model.cfg.experiment.seed)
    # 2. cases (two at a time: each with the next, whose outline is "another case's prior")
    manifest_obj, convention, records = case_records(manifest, subset, fold, root, max_cases)
    windowing = Windowing.of(model.cfg)
    probe = DiffusionProbe(model, windowing, seed, steps_grid, ensemble_grid) if model.adapter.info.samples else None
    per_case: dict[str, dict] = {}
    started = time.perf_counter()
    cases = with_next(records, lambda r: load_case(r, convention, model.cfg.data.spacing, dev))
    # 3. the questions
    for i, (case, other) in enumerate(cases):
        t0 = time.perf_counter()
        result = diffusion_case(probe, case, other) if probe is not None else plain_case(model, case, seed)
        if ref is not None:
            result["reference"] = plain_case(ref, case, seed)
        per_case[case.case_id] = result
        log.info("diagnose: %s (%d/%d) in %.1f s", case.case_id, i + 1, len(records), time.perf_counter() - t0)
    # 4. summary and files
    settings = {
        "checkpoint": str(checkpoint), "model_kind": model.kind, "epoch": model.epoch, "train_run_id": model.run_id,
        "manifest": str(manifest), "dataset": manifest_obj.name, "subset": subset, "fold": fold,
        "cases": len(per_case), "max_cases": max_cases, "reference": None if reference is None else str(reference),
        "reference_kind": None if ref is None else ref.kind, "device": str(dev), "seed": seed,
        "threshold": float(model.cfg.infer.threshold), "roi": list(windowing.roi), "overlap": windowing.overlap,
        "spacing": None if model.cfg.data.spacing is None else list(model.cfg.data.spacing),
        "commit": git_commit(), "seconds": round(time.perf_counter() - started, 1),
    }
    if probe is not None:
        sampled_with = {"external": "the rough outline (the model needs an external prior)",
                        "optional": "no prior (as predict without --prior-dir)",
                        "head": "the model's own prior head", "none": "no prior"}.get(probe.prior_source, "-")
        settings |= {"prior_source": probe.prior_source, "sampling_prior": sampled_with,
                     "sample_steps": probe.default[0],
                     "ensemble": probe.default[1], "steps_grid": list(steps_grid), "ensemble_grid": list(ensemble_grid)}
    result = summarise(settings, per_case)
    markdown = write_report(out, result)
    report = AuditReport(out, result, markdown)
    # 5. MLflow
    enabled = (model.cfg.tracking.enabled or tracking_uri is not None) if tracking is None else tracking
    if enabled:
        from medseg_diff.audit.report import track

        report.run_id = track(out, result, tracking_uri or model.cfg.tracking.uri,
                              model.cfg.tracking.experiment or manifest_obj.name, model.run_id)
    return report

