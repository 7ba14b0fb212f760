"""Predictions on disk: the hand-off between ``predict``/``evaluate`` and ``export``.

A prediction folder holds, on the input's exact grid (shape, affine, s/q-form of the reference):
``{case}_seg.nii.gz`` (BraTS labels of the input's convention), ``{case}_probabilities.nii.gz``
(4D, TC/WT/ET), ``{case}_uncertainty.nii.gz`` (predictive entropy of the mean probabilities, nats, summed over
the 3 regions), ``{case}_variance.nii.gz`` (diffusion: variance across the ensemble members, mean over the regions),
``{case}_attention_*.nii.gz`` (0–1), colour tables, and ``prediction.json`` (inputs, model, run id, timing,
provenance: checkpoint, training data, sampler settings; Dice against the case's label file when it has one) from
which ``export`` rebuilds the case without the model.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
from pathlib import Path

import numpy as np

from medseg_diff.data.conventions import MODALITIES, MSD_CHANNEL_ORDER, LabelConvention, get_convention
from medseg_diff.data.io import read_array
from medseg_diff.data.transforms import IMAGE, LABEL
from medseg_diff.inference.case import CasePrediction
from medseg_diff.inference.loading import LoadedModel
from medseg_diff.errors import DataError, MedsegError
from medseg_diff.export import CaseOverlay, Provenance, dice_scores
from medseg_diff.export.overlays import export_volumes

META = "prediction.json"


def case_images(record: dict) -> dict[str, np.ndarray]:
    """The input modalities on their original grid, canonical names; MSD 4D images split into channels."""
    image = record[IMAGE]
    if isinstance(image, (list, tuple)):
        return {m: read_array(p)[0] for m, p in zip(MODALITIES, image)}
    data, _ = read_array(image)
    return {m: data[..., MSD_CHANNEL_ORDER.index(m)] for m in MODALITIES}


def input_paths(record: dict) -> dict[str, Path]:
    """Modality -> input file of a record (every modality -> the one 4D file for MSD)."""
    image = record[IMAGE]
    if isinstance(image, (list, tuple)):
        return {m: Path(p) for m, p in zip(MODALITIES, image)}
    return {m: Path(image) for m in MODALITIES}


def overlay_of(pred: CasePrediction, record: dict, conv: LabelConvention, model_name: str,
               run_id: str | None, provenance: Provenance | None = None) -> CaseOverlay:
    """The export's input for a prediction (images read back from the record's files)."""
    dice = dice_scores(pred.labels, pred.ground_truth, conv) if pred.ground_truth is not None else None
    source = f"computed at predict time against the case's label file {record.get(LABEL)}" if dice else None
    return CaseOverlay(
        case_id=pred.case_id, reference=pred.reference, images=case_images(record), labels=pred.labels,
        convention=conv, probabilities=pred.probs, uncertainty=pred.entropy, attention=dict(pred.attention),
        model_name=model_name, run_id=run_id, ground_truth=pred.ground_truth, dice=dice, variance=pred.variance,
        provenance=provenance or Provenance(run_id=run_id), dice_source=source, image_paths=input_paths(record),
    )


def model_provenance(model: LoadedModel) -> Provenance:
    """Where a prediction of ``model`` comes from: its checkpoint, the training data its stored config names, and
    the sampler and sliding-window settings it predicts with."""
    cfg = model.cfg
    diffusion = model.kind == "diffusion"
    manifest = cfg.data.manifest
    return Provenance(
        model_kind=model.kind, checkpoint=str(Path(model.checkpoint).absolute()), model_uri=model.source,
        run_id=model.run_id, epoch=model.epoch,
        training_data=training_data(manifest, cfg.data.root, _tuple(cfg.data.spacing)) if manifest else None,
        training_manifest=manifest,
        sample_steps=cfg.diffusion.sample_steps if diffusion else None,
        ensemble=cfg.diffusion.ensemble if diffusion else None,
        seed=cfg.experiment.seed if diffusion else None,
        overlap=cfg.infer.overlap, roi_size=tuple(cfg.infer.roi_size or cfg.data.roi_size),
        spacing_mm=_tuple(cfg.data.spacing), threshold=cfg.infer.threshold,
        predicted_at=f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
    )


@functools.lru_cache(maxsize=8)
def training_data(manifest: str, root: str | None = None, spacing: tuple[float, ...] | None = None) -> str:
    """Plain words for the data set a training manifest describes, e.g. "synthetic BraTS-like phantoms (medseg-diff
    synth), 3 mm voxels: data set 'synthetic-brats', 6 cases, brats2021 labels". Phantoms are recognised by the
    header description ``medseg-diff synth`` writes, or a manifest name that says synthetic / phantom."""
    from medseg_diff.data.manifest import load_manifest

    try:
        m = load_manifest(manifest, root=root)
    except (MedsegError, OSError):
        return f"the data set of manifest {manifest} (not readable when predicting: name and content unknown)"
    description, zooms = _first_image_header(m)
    synthetic = "synthetic" in description or any(w in m.name.lower() for w in ("synth", "phantom"))
    what = "synthetic BraTS-like phantoms (medseg-diff synth)" if synthetic else "images"
    if zooms:
        what += f", {_mm(zooms)} voxels"
    resampled = f"; resampled to {_mm(spacing)} for training" if spacing else ""
    return f"{what}: data set '{m.name}', {len(m.cases)} cases, {m.convention} labels{resampled}"


def _first_image_header(manifest) -> tuple[str, tuple[float, ...] | None]:
    """(header description, voxel size in mm) of the first image of a manifest; ("", None) when unreadable."""
    import nibabel as nib

    if not manifest.cases:
        return "", None
    path = manifest.path_of(next(iter(manifest.cases[0].images.values())))
    try:
        header = nib.load(str(path)).header
        return bytes(header["descrip"]).decode("ascii", "replace").lower(), tuple(header.get_zooms()[:3])
    except Exception:  # not NIfTI (MHA, DICOM) or unreadable: described without it
        return "", None


def _tuple(values) -> tuple | None:
    return None if values is None else tuple(values)


def _mm(zooms) -> str:
    values = [float(z) for z in zooms]
    if max(values) - min(values) < 1e-3:
        return f"{values[0]:g} mm"
    return " \u00d7 ".join(f"{z:g}" for z in values) + " mm"


def write_prediction(pred: CasePrediction, folder: Path, model_name: str, model: LoadedModel, conv: LabelConvention,
                     record: dict, overlay: CaseOverlay | None = None) -> Path:
    """Write a prediction folder (NIfTI volumes + ``prediction.json``); returns the folder.
    ``overlay``: the case's ``overlay_of`` when the caller already built it (saves re-reading the images)."""
    overlay = overlay or overlay_of(pred, record, conv, model_name, model.run_id, model_provenance(model))
    written = export_volumes(overlay, folder)
    meta = {
        "case_id": pred.case_id, "model": model_name, "model_kind": model.kind, "run_id": model.run_id,
        "checkpoint": str(model.checkpoint), "model_uri": model.source, "convention": conv.name,
        "reference": str(pred.reference),
        "inputs": record, "seconds": pred.seconds,
        "peak_memory_mb": pred.peak_memory_mb, "spacing_mm": list(pred.spacing),
        "attention": sorted(written["attention"]),  # this model's maps: others in the folder may be stale
        "variance": "variance" in written,
        "provenance": overlay.provenance.to_dict(),
        "dice": overlay.dice, "dice_source": overlay.dice_source,  # at predict time, against the label file
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
    source = (f"computed when this report was made, from {case}_seg.nii.gz of the prediction folder against the "
              f"case's label file {record[LABEL]} (not taken from an evaluation run)") if dice else None
    var_path = folder / f"{case}_variance.nii.gz"
    has_variance = meta.get("variance", var_path.exists())  # recorded since variance maps were written
    overlay = CaseOverlay(
        case_id=case, reference=Path(meta["reference"]), images=case_images(record), labels=labels,
        convention=conv, probabilities=probs, uncertainty=read_array(unc_path)[0] if unc_path.exists() else None,
        attention=attention, model_name=meta["model"], run_id=meta.get("run_id"), ground_truth=truth, dice=dice,
        variance=read_array(var_path)[0] if has_variance else None, provenance=_provenance(meta),
        dice_source=source, image_paths=input_paths(record),
    )
    return overlay, meta


def _provenance(meta: dict) -> Provenance:
    """The provenance of ``prediction.json``; for folders written before it was recorded, what the top level holds."""
    if isinstance(meta.get("provenance"), dict):
        return Provenance.from_dict(meta["provenance"])
    return Provenance(model_kind=meta.get("model_kind"), checkpoint=meta.get("checkpoint"),
                      model_uri=meta.get("model_uri"), run_id=meta.get("run_id"))


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
