"""Predictions on disk: the hand-off between ``predict``/``evaluate`` and ``export``.

A prediction folder holds, on the input's exact grid (shape, affine, s/q-form of the reference):
``{case}_seg.nii.gz`` (BraTS labels of the input's convention), ``{case}_probabilities.nii.gz``
(4D, TC/WT/ET), ``{case}_uncertainty.nii.gz`` (predictive entropy, nats), ``{case}_attention_*.nii.gz``
(0–1), colour tables, and ``prediction.json`` (inputs, model, run id, timing) from which ``export``
rebuilds the case without the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from medseg_diff.data.conventions import MODALITIES, MSD_CHANNEL_ORDER, LabelConvention, get_convention
from medseg_diff.data.io import read_array
from medseg_diff.data.transforms import IMAGE, LABEL
from medseg_diff.inference.case import CasePrediction
from medseg_diff.inference.loading import LoadedModel
from medseg_diff.errors import DataError
from medseg_diff.export import CaseOverlay, dice_scores
from medseg_diff.export.overlays import export_volumes

META = "prediction.json"


def case_images(record: dict) -> dict[str, np.ndarray]:
    """The input modalities on their original grid, canonical names; MSD 4D images split into channels."""
    image = record[IMAGE]
    if isinstance(image, (list, tuple)):
        return {m: read_array(p)[0] for m, p in zip(MODALITIES, image)}
    data, _ = read_array(image)
    return {m: data[..., MSD_CHANNEL_ORDER.index(m)] for m in MODALITIES}


def overlay_of(pred: CasePrediction, record: dict, conv: LabelConvention, model_name: str,
               run_id: str | None) -> CaseOverlay:
    """The export's input for a prediction (images read back from the record's files)."""
    dice = dice_scores(pred.labels, pred.ground_truth, conv) if pred.ground_truth is not None else None
    attention = dict(pred.attention)
    return CaseOverlay(
        case_id=pred.case_id, reference=pred.reference, images=case_images(record), labels=pred.labels,
        convention=conv, probabilities=pred.probs, uncertainty=pred.entropy, attention=attention,
        model_name=model_name, run_id=run_id, ground_truth=pred.ground_truth, dice=dice,
    )


def write_prediction(pred: CasePrediction, folder: Path, model_name: str, model: LoadedModel, conv: LabelConvention,
                     record: dict, overlay: CaseOverlay | None = None) -> Path:
    """Write a prediction folder (NIfTI volumes + ``prediction.json``); returns the folder.
    ``overlay``: the case's ``overlay_of`` when the caller already built it (saves re-reading the images)."""
    written = export_volumes(overlay or overlay_of(pred, record, conv, model_name, model.run_id), folder)
    meta = {
        "case_id": pred.case_id, "model": model_name, "model_kind": model.kind, "run_id": model.run_id,
        "checkpoint": str(model.checkpoint), "model_uri": model.source, "convention": conv.name, "reference": str(pred.reference),
        "inputs": record, "seconds": pred.seconds,
        "peak_memory_mb": pred.peak_memory_mb, "spacing_mm": list(pred.spacing),
        "attention": sorted(written["attention"]),  # this model's maps: others in the folder may be stale
    }
    tmp = folder / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, folder / META)
    return folder


def read_prediction(folder: Path) -> tuple[CaseOverlay, dict]:
    """Rebuild a ``CaseOverlay`` from a prediction folder written by ``write_prediction``."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(folder / META, "not a prediction folder (no prediction.json); run predict first") from None
    except json.JSONDecodeError as err:
        raise DataError(folder / META, f"unreadable ({err})") from err
    if not isinstance(meta, dict):
        raise DataError(folder / META, "is not a prediction record (expected a JSON object)")
    missing = [k for k in ("case_id", "convention", "reference", "model", "inputs") if k not in meta]
    if missing:
        raise DataError(folder / META, f"lacks {', '.join(repr(k) for k in missing)}; predict the case again")
    case = str(meta["case_id"])
    try:
        conv = get_convention(meta["convention"])
    except ValueError as err:
        raise DataError(folder / META, str(err), case=case) from None
    record = meta.get("inputs")
    if not isinstance(record, dict) or not record.get(IMAGE):
        raise DataError(folder / META, "does not list the input files", case=case)
    labels = _checked_labels(folder / f"{case}_seg.nii.gz", Path(meta["reference"]), conv, case)
    probs_path = folder / f"{case}_probabilities.nii.gz"
    probs = np.moveaxis(read_array(probs_path)[0], -1, 0) if probs_path.exists() else None
    unc_path = folder / f"{case}_uncertainty.nii.gz"
    names = meta.get("attention")  # absent in folders written before it was recorded: take every map there
    if names is None:
        names = [p.name[len(case) + len("_attention_"):-len(".nii.gz")]
                 for p in sorted(folder.glob(f"{case}_attention_*.nii.gz"))]
    attention = {name: read_array(folder / f"{case}_attention_{name}.nii.gz")[0] for name in names}
    truth = np.rint(read_array(record[LABEL])[0]).astype(np.uint8) if record.get(LABEL) else None
    dice = dice_scores(labels, truth, conv) if truth is not None else None
    overlay = CaseOverlay(
        case_id=case, reference=Path(meta["reference"]), images=case_images(record), labels=labels,
        convention=conv, probabilities=probs, uncertainty=read_array(unc_path)[0] if unc_path.exists() else None,
        attention=attention, model_name=meta["model"], run_id=meta.get("run_id"), ground_truth=truth, dice=dice,
    )
    return overlay, meta


def _checked_labels(path: Path, reference: Path, conv: LabelConvention, case: str) -> np.ndarray:
    """The label map of a prediction folder, refused by name unless it is 3D, on the reference's grid and holds
    only the convention's integral labels."""
    from medseg_diff.data.check import grid_mismatch
    from medseg_diff.data.io import read_image

    img, ref = read_image(path), read_image(reference)
    if len(img.shape) != 3:
        raise DataError(path, f"a label map must be 3D, this one has shape {tuple(img.shape)}", case=case)
    problems = grid_mismatch(img.shape, img.affine, ref.shape, ref.affine, reference)
    if problems:
        raise DataError(path, f"not on the case's grid: {problems[0]}", case=case)
    data, _ = read_array(path)
    bad = conv.unknown_labels(data)
    if bad:
        raise DataError(path, f"label values {bad} are not {conv.name} labels {list(conv.labels)}", case=case)
    return data.astype(np.uint8)


def prior_file(prior_dir: Path, case: str) -> Path:
    """The external prior of ``case``: ``DIR/CASE/CASE_seg.nii.gz`` (a prediction folder) or ``DIR/CASE*.nii.gz``."""
    for candidate in (prior_dir / case / f"{case}_seg.nii.gz", prior_dir / f"{case}_seg.nii.gz",
                      prior_dir / f"{case}.nii.gz"):
        if candidate.exists():
            return candidate
    raise DataError(prior_dir, f"no prior for this case (looked for {case}/{case}_seg.nii.gz, {case}_seg.nii.gz, "
                               f"{case}.nii.gz)", case=case)
