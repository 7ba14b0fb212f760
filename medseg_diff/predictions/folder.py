"""A prediction folder written and read back whole: volumes (``predictions.volumes``) plus ``prediction.json``
(``predictions.meta``), and the case's input images read from the files the record names."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from medseg_diff.data.check import grid_mismatch
from medseg_diff.data.conventions import MODALITIES, MSD_CHANNEL_ORDER, LabelConvention, get_convention
from medseg_diff.data.io import read_array, read_image
from medseg_diff.data.transforms import IMAGE, LABEL
from medseg_diff.errors import DataError
from medseg_diff.predictions import layout
from medseg_diff.predictions.meta import PredictionMeta, read_meta, write_meta
from medseg_diff.predictions.types import CaseOverlay, Provenance
from medseg_diff.predictions.volumes import write_volumes


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


def write_prediction(overlay: CaseOverlay, folder: Path, meta: PredictionMeta) -> Path:
    """Write a prediction folder: the volumes of ``overlay`` and ``prediction.json`` (``meta``, completed with the
    maps written); returns the folder."""
    written = write_volumes(overlay, folder)
    meta = replace(meta, attention=sorted(written["attention"]), variance="variance" in written)
    write_meta(folder, meta)
    return Path(folder)


def read_prediction(folder: Path) -> tuple[CaseOverlay, PredictionMeta]:
    """Rebuild a ``CaseOverlay`` from a prediction folder written by ``write_prediction``, with the ground truth
    of the case's label file when the record names one (``dice`` is left to the caller: ``export``)."""
    folder = Path(folder)
    meta = read_meta(folder)
    case = str(meta.case_id)
    meta_path = folder / layout.META
    try:
        conv = get_convention(meta.convention)
    except ValueError as err:
        raise DataError(meta_path, str(err), case=case) from None
    record = meta.inputs
    if not isinstance(record, dict) or not record.get(IMAGE):
        raise DataError(meta_path, "does not list the input files", case=case)
    labels = _checked_labels(folder / layout.seg(case), Path(meta.reference), conv, case)
    probs_path = folder / layout.volume(case, layout.PROBABILITIES)
    probs = np.moveaxis(read_array(probs_path)[0], -1, 0) if probs_path.exists() else None
    unc_path = folder / layout.volume(case, layout.UNCERTAINTY)
    names = meta.attention  # None in folders written before it was recorded: take every map there
    if names is None:
        names = layout.attention_names(folder, case)
    attention = {name: read_array(folder / layout.attention(case, name))[0] for name in names}
    truth = np.rint(read_array(record[LABEL])[0]).astype(np.uint8) if record.get(LABEL) else None
    var_path = folder / layout.volume(case, layout.VARIANCE)
    has_variance = meta.variance if meta.variance is not None else var_path.exists()  # recorded since written
    overlay = CaseOverlay(
        case_id=case, reference=Path(meta.reference), images=case_images(record), labels=labels,
        convention=conv, probabilities=probs, uncertainty=read_array(unc_path)[0] if unc_path.exists() else None,
        attention=attention, model_name=meta.model, run_id=meta.run_id, ground_truth=truth, dice=None,
        variance=read_array(var_path)[0] if has_variance else None, provenance=provenance_of(meta),
        dice_source=None, image_paths=input_paths(record),
    )
    return overlay, meta


def provenance_of(meta: PredictionMeta) -> Provenance:
    """The provenance of ``prediction.json``; for folders written before it was recorded, what the top level holds."""
    if isinstance(meta.provenance, dict):
        return Provenance.from_dict(meta.provenance)
    return Provenance(model_kind=meta.model_kind, checkpoint=meta.checkpoint, model_uri=meta.model_uri,
                      run_id=meta.run_id)


def _checked_labels(path: Path, reference: Path, conv: LabelConvention, case: str) -> np.ndarray:
    """The label map of a prediction folder, refused by name unless it is 3D, on the reference's grid and holds
    only the convention's integral labels."""
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
    seg = layout.seg(case)
    for candidate in (prior_dir / case / seg, prior_dir / seg, prior_dir / f"{case}{layout.NIFTI}"):
        if candidate.exists():
            return candidate
    raise DataError(prior_dir, f"no prior for this case (looked for {case}/{seg}, {seg}, "
                               f"{case}{layout.NIFTI})", case=case)
