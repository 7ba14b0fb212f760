"""Prediction folders of any tool, read for scoring against a manifest's labels.

A folder ``DIR`` holds one label map per case, in the manifest's label convention, found as (first match):

* ``DIR/CASE/CASE_seg.nii.gz``: this package's prediction folders (``medseg-diff predict``), which may also hold
  ``CASE_probabilities.nii.gz`` (4D: TC, WT, ET), ``CASE_uncertainty.nii.gz`` and ``prediction.json`` (timing);
* ``DIR/CASE.nii.gz``: nnU-Net's output and a BraTS submission;
* ``DIR/CASE_seg.nii.gz``.

A folder that holds nnU-Net's copy of a dataset.json defining nnU-Net's BraTS labels (``medseg-diff export-nnunet``'s,
or nnU-Net's own Dataset137 BraTS example: 1 edema, 2 necrosis/core, 3 enhancing) has its maps converted from
nnU-Net's values to the convention's before they are checked (``data.nnunet.labels_back``); ``nnUNetv2_predict``
writes that copy beside its ``CASE.nii.gz`` files.

Every map is checked against the case before it is scored: the same grid as the reference label (shape, and
affine within ``data.check.AFFINE_ATOL``), a 3D integral label map with values of the convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg_diff.data.check import grid_mismatch
from medseg_diff.data.conventions import LabelConvention
from medseg_diff.data.io import read_array, read_image
from medseg_diff.data.nnunet import convert_labels, labels_back, read_dataset_json
from medseg_diff.errors import DataError
from medseg_diff.predictions import layout
from medseg_diff.predictions.meta import read_meta_if_any


@dataclass
class ScoredInputs:
    """One case's prediction and reference on the reference's grid."""

    case_id: str
    labels: np.ndarray  # [X, Y, Z] uint8, the convention's labels
    truth: np.ndarray  # [X, Y, Z] uint8
    spacing: tuple[float, float, float]  # mm
    seg_path: Path
    probs: np.ndarray | None = None  # [3, X, Y, Z] TC, WT, ET, when the folder has them
    uncertainty: np.ndarray | None = None  # [X, Y, Z], when the folder has it
    seconds: float | None = None
    peak_memory_mb: float | None = None


def find_segmentation(folder: Path, case_id: str) -> Path:
    """The label map of ``case_id`` in a prediction folder (see the module docstring for the layouts)."""
    if not folder.is_dir():
        raise DataError(folder, "prediction folder does not exist" if not folder.exists() else "is not a folder")
    found = [c for c in layout.segmentation_candidates(folder, case_id) if c.is_file()]
    if len(found) > 1:
        raise DataError(folder, f"two predictions for this case ({', '.join(p.name for p in found)}); keep one",
                        case=case_id)
    if found:
        return found[0]
    raise DataError(folder, f"no prediction for this case (looked for {layout.candidates_text(case_id)})",
                    case=case_id)


def read_label_map(path: Path, conv: LabelConvention, ref_path: Path, ref_shape, ref_affine,
                   case_id: str, mapping: dict[int, int] | None = None) -> np.ndarray:
    """A 3D label map on the reference grid with the convention's integral labels, as uint8; else a DataError
    naming ``path``. ``mapping``: the file's values -> the convention's (an nnU-Net folder's, ``folder_mapping``);
    a value it lacks is refused."""
    img = read_image(path)
    if len(img.shape) != 3:
        raise DataError(path, f"a label map must be 3D, this one has shape {tuple(img.shape)}", case=case_id)
    problems = grid_mismatch(img.shape, img.affine, ref_shape, ref_affine, ref_path)
    if problems:
        raise DataError(path, f"not on the case's grid: {problems[0]}", case=case_id)
    data, _ = read_array(path)
    if not np.all(np.isfinite(data)):
        raise DataError(path, "contains NaN/Inf", case=case_id)
    if mapping is not None:
        return convert_labels(data, mapping, path, "the nnU-Net labels of the folder's dataset.json", case=case_id)
    bad = conv.unknown_labels(data)
    if bad:
        raise DataError(path, f"label values {bad} are not {conv.name} labels {list(conv.labels)}", case=case_id)
    return data.astype(np.uint8)


def read_case(folder: Path, case_id: str, label_path: Path, conv: LabelConvention) -> ScoredInputs:
    """Read and check the prediction of ``case_id`` in ``folder`` and the reference label ``label_path``."""
    ref = read_image(label_path)
    truth = read_label_map(label_path, conv, label_path, ref.shape, ref.affine, case_id)
    seg = find_segmentation(folder, case_id)
    labels = read_label_map(seg, conv, label_path, ref.shape, ref.affine, case_id, folder_mapping(folder, conv))
    spacing = tuple(float(z) for z in ref.header.get_zooms()[:3])
    out = ScoredInputs(case_id, labels, truth, spacing, seg)
    if layout.is_case_folder(seg, case_id):  # this package's folder: extra maps
        _read_extras(seg.parent, case_id, out, ref, label_path)
    return out


def folder_mapping(folder: Path, conv: LabelConvention) -> dict[int, int] | None:
    """nnU-Net's label value -> ``conv``'s for a folder with nnU-Net's copy of a BraTS dataset.json (module
    docstring); None for a folder whose maps are in the convention already."""
    return labels_back(read_dataset_json(folder), conv, Path(folder) / "dataset.json")


def _read_extras(case_dir: Path, case_id: str, out: ScoredInputs, ref, label_path: Path) -> None:
    probs_path = case_dir / layout.volume(case_id, layout.PROBABILITIES)
    unc_path = case_dir / layout.volume(case_id, layout.UNCERTAINTY)
    if probs_path.is_file() and unc_path.is_file():
        for path in (probs_path, unc_path):
            img = read_image(path)
            problems = grid_mismatch(img.shape, img.affine, ref.shape, ref.affine, label_path)
            if problems:
                raise DataError(path, f"not on the case's grid: {problems[0]}", case=case_id)
        probs = np.moveaxis(read_array(probs_path)[0], -1, 0)
        if probs.shape[0] != 3 or not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
            raise DataError(probs_path, "expected 3 probability maps (TC, WT, ET) in [0, 1]", case=case_id)
        out.probs, out.uncertainty = probs, read_array(unc_path)[0]
    meta = read_meta_if_any(case_dir, case=case_id)
    if meta is not None:
        out.seconds = _number(meta.seconds)
        out.peak_memory_mb = _number(meta.peak_memory_mb)


def _number(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
