"""The predict stage: many cases into prediction folders (``predictions``), with DICOM objects for a DICOM study;
a bad case is skipped and reported (``continue_on_error``) instead of ending the run halfway.

Outputs are never half-done or mixed: each case is written into a hidden staging folder and moved into place whole;
a case folder that holds another model's or another run's prediction (or files that are not a prediction) is
refused unless ``overwrite``, which replaces the folder whole (no stale maps stay behind). A case is predicted and
installed under its lock (``ownership.case_lock``), so runs sharing an ``--out`` never write one case at once; a case
another live run holds is refused, the holder named. Staging names carry their process: a run removes those whose
process is gone, never a live run's (``remove_stale_staging``).

Several processes share the cases of one ``--out`` through ``Cases.shard`` (``--shard I/N``, or torchrun's
``RANK``/``WORLD_SIZE``): each predicts the cases of its shard, with no collective operation between them (no process
group is needed). Predict writes nothing folder-wide — only ``OUT/CASE/`` folders, each whole and self-describing
(``prediction.json``) — so N shards leave the same folder one process would, which ``evaluate --predictions`` and
``export`` read as they read any other.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from medseg_diff.data.check import ensure_checksums
from medseg_diff.data.conventions import LabelConvention, get_convention
from medseg_diff.data.dataset import case_record, files_record
from medseg_diff.data.discovery import discover
from medseg_diff.data.manifest import load_manifest
from medseg_diff.data.dicom.rules import SeriesRule
from medseg_diff.dicom.outputs import write_dicom_outputs
from medseg_diff.data.dicom.study import is_dicom_file, read_study
from medseg_diff.errors import DataError, MedsegError
from medseg_diff.ownership import BusyError, case_lock, staged_case, staging_name, staging_owner_alive
from medseg_diff.evaluation.metrics import dice_scores
from medseg_diff.inference.case import CasePrediction, predict_case
from medseg_diff.inference.loading import LoadedModel
from medseg_diff.inference.provenance import model_provenance
from medseg_diff.data.transforms import LABEL
from medseg_diff.predictions import folder as prediction_folder
from medseg_diff.predictions import layout
from medseg_diff.predictions.folder import case_images, input_paths, prior_file
from medseg_diff.predictions.meta import PredictionMeta, load_raw
from medseg_diff.predictions.types import CaseOverlay, Provenance, check_name
from medseg_diff.runtime import pin_reproducibility, resolve_device
from medseg_diff.stages.models import load_model
from medseg_diff.stages.options import Cases, Sampling, Writing
from medseg_diff.stages.report import RunReport

log = logging.getLogger(__name__)


#: record key of a case read from a DICOM study: the study folder (its outputs are also written as DICOM)
DICOM_STUDY = "dicom_study"


def input_records(source: str | Path, subset: str = "all", root: str | Path | None = None,
                  convention: str | None = None, series_rule: SeriesRule | None = None
                  ) -> tuple[LabelConvention, list[dict]]:
    """Records of the cases to predict: from a manifest JSON, or a data folder / single case folder, or a DICOM
    study folder (or a folder of them; ``series_rule`` maps their series to modalities)."""
    source = Path(source)
    if source.suffix == ".json":
        manifest = load_manifest(source, root=root)
        cases = manifest.cases if subset == "all" else [c for c in manifest.cases if c.subset == subset]
        return get_convention(manifest.convention), [_with_dicom_study(case_record(manifest, c)) for c in cases]
    conv, cases = discover(source, convention, series_rule=series_rule)
    records = []
    for case in cases:
        if case.missing:  # reported by name when its turn comes (predict_cases), not silently dropped
            folder = next(iter(case.images.values())).parent if case.images else source
            records.append({"case_id": case.case_id, "missing": case.missing, "folder": str(folder)})
        elif case.dicom is not None:
            records.append(files_record(case) | {DICOM_STUDY: str(case.dicom.folder)})
        else:
            records.append(files_record(case))
    return conv, records


def _with_dicom_study(record: dict) -> dict:
    """A manifest record whose images are DICOM series (their reference files) also names its study folder: the
    folder holding all of them, so that its outputs are written as DICOM too."""
    images = record.get("image")
    if isinstance(images, (list, tuple)) and images and all(is_dicom_file(p) for p in images):
        return record | {DICOM_STUDY: os.path.commonpath([str(Path(p).parent) for p in images])}
    return record


def predict_cases(checkpoint: str | Path, source: str | Path, out_dir: str | Path, sampling: Sampling = Sampling(),
                  cases: Cases = Cases(), writing: Writing = Writing(), model: LoadedModel | None = None,
                  tracking_uri: str | None = None) -> RunReport:
    """Predict every case of ``source`` into ``out_dir/CASE/`` (see ``predictions``).
    ``checkpoint``: a checkpoint file or an MLflow model URI (``models:/NAME/VERSION``, ``runs:/...``, fetched from
    ``tracking_uri``); ``model``: the model already loaded from it. A case read from a DICOM study also gets
    ``CASE/dicom/``: a DICOM Segmentation and Parametric Maps that reference its source series
    (``dicom.write_dicom_outputs``), written in the same staged step; their series numbers start above the study's
    and ``writing.taken_series_numbers``. ``cases.shard``: only that shard's cases (an empty shard writes nothing);
    ``sampling.local_rank``: the GPU of ``auto`` / ``cuda``."""
    device, sample_steps, ensemble, seed, overlap = (sampling.device, sampling.sample_steps, sampling.ensemble,
                                                     sampling.seed, sampling.overlap)
    subset, root, convention, case_ids, prior_dir, series_rule, verify_checksums = (
        cases.subset, cases.root, cases.convention, cases.case_ids, cases.prior_dir, cases.series_rule,
        cases.verify_checksums)
    name, overwrite, continue_on_error, taken_series_numbers = (
        writing.name, writing.overwrite, writing.continue_on_error, writing.taken_series_numbers)
    pin_reproducibility()
    dev = resolve_device(device, sampling.local_rank, key="--device")
    if dev.type == "cuda" and dev.index is not None:
        import torch

        torch.cuda.set_device(dev)  # what allocates on "cuda" without an index lands on this process's GPU too
    if model is None:
        model = load_model(checkpoint, dev, sample_steps, ensemble, seed, overlap=overlap, tracking_uri=tracking_uri,
                           postprocess=sampling.postprocess())
    _check_prior_use(model, prior_dir)  # a model-wide mistake: fail once, before any case
    conv, records = input_records(source, subset, root, convention, series_rule)
    if case_ids is not None:  # only these, in this order
        by_id = {r["case_id"]: r for r in records}
        unknown = [c for c in case_ids if c not in by_id]
        if unknown:
            raise DataError(source, f"no such case(s): {', '.join(unknown)}")
        records = [by_id[c] for c in case_ids]
    if not records:
        raise DataError(source, f"no cases to predict (subset '{subset}')")
    if cases.shard is not None:  # this process's share, in the source's order
        mine = cases.shard.select([r["case_id"] for r in records])
        log.info("shard %s: %d of %d case(s)", cases.shard, len(mine), len(records))
        records = [r for r in records if r["case_id"] in mine]
        if not records:
            log.warning("shard %s has no case: %s holds fewer cases than shards", cases.shard, source)
            return RunReport()
    manifest = load_manifest(source, root=root) if Path(source).suffix == ".json" and verify_checksums else None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "the output folder is a file")
    remove_stale_staging(out_dir)
    for record in records:  # refuse a conflicting folder before any case is written, so outputs never mix
        if "missing" not in record:
            try:
                claim_case_folder(out_dir / record["case_id"], model, record, overwrite)
            except DataError:
                if not continue_on_error:
                    raise
    report = RunReport()
    for record in records:
        case = record["case_id"]
        try:
            if "missing" in record:
                raise DataError(record["folder"], f"missing modality {', '.join(record['missing'])}", case=case)
            check_name(case, "case id", case)  # before any inference time is spent on it
            if manifest is not None:  # the bytes the manifest (and its hash) describe
                ensure_checksums(manifest, [c for c in manifest.cases if c.id == case])
            folder = out_dir / case
            out_dir.mkdir(parents=True, exist_ok=True)
            with case_lock(out_dir, case):
                claim_case_folder(folder, model, record, overwrite)  # under the lock: what another run installed
                if prior_dir is not None:
                    record = record | {"prior": str(prior_file(Path(prior_dir), case))}
                pred = predict_case(model, record, conv, dev)
                staging = out_dir / staging_name(case)
                try:
                    write_prediction(pred, staging, name or model.kind, model, conv, record)
                    if record.get(DICOM_STUDY):
                        written = write_dicom_outputs(staging, read_study(record[DICOM_STUDY], series_rule), conv,
                                                      taken_series_numbers)
                        log.info("     %s: %d DICOM object(s) (SEG, parametric maps)", case, len(written))
                    install_folder(staging, folder)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
            report.written.append(folder)
            log.info("ok   %s  (%.1f s)", case, pred.seconds)
        except (MedsegError, OSError) as err:  # bad input, or a fault writing this case (full disk): staged, not kept
            if not continue_on_error:
                raise
            text = str(err) if isinstance(err, MedsegError) else f"{err.filename or out_dir}: {err.strerror or err}"
            report.failed[case] = text
            log.warning("FAIL %s: %s", case, text)
    return report


def _check_prior_use(model: LoadedModel, prior_dir: str | Path | None) -> None:
    """``--prior-dir`` is required by, and only by, a model trained with ``prior_source=external``."""
    model.adapter.check_prior(prior_dir is not None, prior_dir if prior_dir is not None else model.checkpoint)


def remove_stale_staging(out_dir: Path) -> None:
    """Clear what a killed run left in ``out_dir``, never what a live run is writing: hidden ``.CASE.partial-*`` /
    ``.CASE.old-*`` folders whose process is gone (``ownership.staging_owner_alive``: this host's pid no longer runs;
    other hosts' names are kept) are removed — except an old copy whose case folder is missing (the run was killed
    between moving it aside and installing the new one), which is put back under the case's lock — and hidden
    ``.*.partial`` / ``.*.tmp`` files in case folders (files are staged only in staging folders) are removed.
    Nothing else is touched."""
    if not out_dir.is_dir():
        return
    for path in out_dir.iterdir():
        staged = staged_case(path.name)
        if staged is not None and path.is_dir() and not staging_owner_alive(path.name):
            case, kind = staged
            if kind == "old" and not (out_dir / case).exists():
                _restore_old_copy(path, out_dir, case)
            else:
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed %s (left by an interrupted run)", path)
        elif path.is_dir() and not path.name.startswith("."):
            for leftover in [*path.glob(".*.partial"), *path.glob(".*.tmp")]:
                leftover.unlink(missing_ok=True)
                log.info("removed %s (left by an interrupted run)", leftover)


def _restore_old_copy(old: Path, out_dir: Path, case: str) -> None:
    """Put ``old`` (a case folder a killed run moved aside) back as ``out_dir/case``, under the case's lock: a live
    run that holds the case is installing a new one, and the old copy waits for a later run to remove it."""
    try:
        with case_lock(out_dir, case):
            if old.is_dir() and not (out_dir / case).exists():
                os.replace(old, out_dir / case)
                log.warning("restored %s from %s: a run was killed while replacing it", out_dir / case, old.name)
    except BusyError as err:
        log.info("kept %s: %s", old, err)


def claim_case_folder(folder: Path, model: LoadedModel, record: dict, overwrite: bool) -> None:
    """Refuse to write into ``folder`` when it holds the case's input files, or (unless ``overwrite``) another
    model's or another run's prediction, or files that are not a prediction."""
    resolved = folder.resolve()
    inputs = [record["image"]] if isinstance(record.get("image"), str) else list(record.get("image", []))
    for key in ("label", "prior"):
        if record.get(key):
            inputs.append(record[key])
    for path in inputs:
        if resolved in Path(path).resolve().parents or Path(path).resolve() == resolved:
            raise DataError(folder, "the output folder holds this case's input files; choose another --out",
                            case=record.get("case_id"))
    if not folder.exists() or overwrite:
        if folder.exists() and not folder.is_dir():
            raise DataError(folder, "is a file, not a case folder", case=record.get("case_id"))
        return
    if not folder.is_dir():
        raise DataError(folder, "is a file, not a case folder", case=record.get("case_id"))
    if not any(folder.iterdir()):
        return
    try:
        raw = load_raw(folder / layout.META)
    except (OSError, DataError):
        raise DataError(folder, "already holds files that are not a medseg-diff prediction; pass --overwrite to "
                                "replace the folder, or choose another --out", case=record.get("case_id")) from None
    meta = PredictionMeta.from_dict(raw)
    same = meta.checkpoint == str(model.checkpoint) and meta.run_id == model.run_id
    if not same:
        raise DataError(folder, f"already holds a prediction of another model or run ({meta.checkpoint}, "
                                f"run {meta.run_id}); pass --overwrite to replace it, or choose another --out",
                        case=record.get("case_id"))


def install_folder(staging: Path, folder: Path) -> None:
    """Move the complete ``staging`` folder to ``folder``, replacing an existing one whole."""
    if folder.exists():
        old = folder.parent / staging_name(folder.name, "old")
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)


def overlay_of(pred: CasePrediction, record: dict, conv: LabelConvention, model_name: str,
               run_id: str | None, provenance: Provenance | None = None) -> CaseOverlay:
    """A prediction in memory with its input images (read back from the record's files), and Dice against the
    case's label file when it has one."""
    dice = dice_scores(pred.labels, pred.ground_truth, conv) if pred.ground_truth is not None else None
    source = f"computed at predict time against the case's label file {record.get(LABEL)}" if dice else None
    return CaseOverlay(
        case_id=pred.case_id, reference=pred.reference, images=case_images(record), labels=pred.labels,
        convention=conv, probabilities=pred.probs, uncertainty=pred.entropy, attention=dict(pred.attention),
        model_name=model_name, run_id=run_id, ground_truth=pred.ground_truth, dice=dice, variance=pred.variance,
        provenance=provenance or Provenance(run_id=run_id), dice_source=source, image_paths=input_paths(record),
    )


def write_prediction(pred: CasePrediction, folder: Path, model_name: str, model: LoadedModel, conv: LabelConvention,
                     record: dict) -> Path:
    """Write the prediction folder of one case (``predictions.folder``); returns the folder."""
    overlay = overlay_of(pred, record, conv, model_name, model.run_id, model_provenance(model))
    meta = PredictionMeta(
        case_id=pred.case_id, model=model_name, model_kind=model.kind, run_id=model.run_id,
        checkpoint=str(model.checkpoint), model_uri=model.source, convention=conv.name,
        reference=str(pred.reference), inputs=record, seconds=pred.seconds, peak_memory_mb=pred.peak_memory_mb,
        spacing_mm=list(pred.spacing), provenance=overlay.provenance.to_dict(), dice=overlay.dice,
        dice_source=overlay.dice_source, postprocess=pred.postprocessed.to_dict() if pred.postprocessed else None,
    )
    return prediction_folder.write_prediction(overlay, folder, meta)
