"""A prediction folder of a DICOM case, written back as DICOM: a Segmentation and Parametric Maps.

``write_dicom_outputs(prediction_folder, study, convention)`` reads what ``stages.predict`` wrote (``predictions``)
(``{case}_seg.nii.gz`` on the input grid, and when present ``{case}_uncertainty.nii.gz``, ``{case}_variance.nii.gz``,
``{case}_attention_*.nii.gz``) and writes ``prediction_folder/dicom/``:

- ``{case}_seg.dcm``: DICOM Segmentation, a segment per tumour label (``dicom.seg``);
- ``{case}_uncertainty.dcm``, ``{case}_variance.dcm``, ``{case}_attention_{name}.dcm``: Parametric Maps.

Every object references the images of one source series (the series of the prediction's reference modality, t1
by default: all modalities share its grid) and shares the study's Frame of Reference, patient and study.

Deterministic: the same prediction folder and study give the same bytes. UIDs derive from the study, the source
series, the object, the prediction's origin (model, run, checkpoint, time, version) and a hash of its voxels
(``pydicom.uid.generate_uid`` with entropy sources), so storing the same result twice in a PACS does not duplicate
it, and another model's or run's result never takes its UIDs; every date and time (content, series, instance creation, highdicom's
contributing-equipment stamp) is the modification time of ``{case}_seg.nii.gz`` (when the prediction was made).
Series numbers start at the next free hundred above the study's series numbers (100, 101, ... for a study numbered
below 100): those of the study as read, and ``taken_series_numbers`` (what a PACS holds beyond the fetched image
series: ``stages.dicomweb`` asks it, so a second model's results do not repeat the first one's numbers).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np

from medseg_diff.data.conventions import LabelConvention, get_convention
from medseg_diff.data.io import read_array
from medseg_diff.dicom.pmap import MapKind, attention_kind, parametric_map_dataset, uncertainty_kind, variance_kind
from medseg_diff.dicom.seg import Equipment, segmentation_dataset
from medseg_diff.data.dicom.study import DicomSeries, DicomStudy
from medseg_diff.errors import DataError
from medseg_diff.predictions import layout
from medseg_diff.predictions.meta import PredictionMeta, read_meta_if_any


def write_dicom_outputs(prediction_folder: str | Path, study: DicomStudy, convention: LabelConvention | str,
                        taken_series_numbers: Iterable[int] = ()) -> list[Path]:
    """Write the SEG and parametric maps of a prediction folder into its ``dicom/`` subfolder; returns their paths
    (SEG first). ``DataError`` naming the file: a missing ``{case}_seg.nii.gz``, labels not of ``convention``, a
    volume not on the source series' grid, a map with NaN/Inf."""
    folder = Path(prediction_folder)
    conv = convention if isinstance(convention, LabelConvention) else get_convention(convention)
    meta = read_meta_if_any(folder) or PredictionMeta(case_id=None)
    case = str(meta.case_id or study.case_id)
    seg_path = folder / layout.seg(case)
    if not seg_path.is_file():
        raise DataError(folder, f"holds no {seg_path.name}; not a prediction folder of this case (run predict)",
                        case=case)
    modality = _reference_modality(study, meta)
    series = study.series[modality]
    provenance = Equipment(model_name=str(meta.model or "medseg-diff"), run_id=meta.run_id)
    when = datetime.fromtimestamp(seg_path.stat().st_mtime).replace(microsecond=0)
    number = _first_series_number(study, taken_series_numbers)
    origin = _origin(meta, when)
    labels, affine = read_array(seg_path, dtype=np.float64)
    bad = conv.unknown_labels(labels)
    if bad:
        raise DataError(seg_path, f"label values {bad} are not {conv.name} labels {list(conv.labels)}", case=case)
    labels = labels.astype(np.uint8)

    objects = {}
    with _problems_named(seg_path, case, series):
        series_uid, sop_uid = _uids(study, series, "seg", labels, affine, origin)
        objects[layout.dicom_object(case, layout.SEG)] = segmentation_dataset(
            labels, affine, series.datasets, conv, series_uid=series_uid, sop_uid=sop_uid, series_number=number,
            when=when, provenance=provenance)
    for offset, (name, path, kind) in enumerate(_maps(folder, case, meta), start=1):
        values, map_affine = read_array(path)
        with _problems_named(path, case, series):
            series_uid, sop_uid = _uids(study, series, name, values, map_affine, origin)
            objects[layout.dicom_object(case, name)] = parametric_map_dataset(
                values, map_affine, series.datasets, kind, series_uid=series_uid, sop_uid=sop_uid,
                series_number=number + offset, when=when, provenance=provenance)
    return _write_all(folder / layout.DICOM_FOLDER, case, objects)


def _reference_modality(study: DicomStudy, meta: PredictionMeta) -> str:
    """The modality whose grid the prediction is on: the one ``prediction.json`` names as reference, else t1."""
    reference = meta.reference
    if reference:
        found = study.modality_of(reference)
        if found is not None:
            return found
    return "t1" if "t1" in study.series else next(iter(study.series))


def _first_series_number(study: DicomStudy, taken: Iterable[int] = ()) -> int:
    """The next free hundred above every series number of the study as read and ``taken`` (those a PACS holds
    beyond what was fetched, e.g. an earlier model's SEG and maps)."""
    numbers = [s.number for s in study.listing if s.number is not None]
    numbers += [s.number for s in study.series.values() if s.number is not None]
    numbers += [int(n) for n in taken]
    return 100 * (max(numbers, default=0) // 100 + 1)


def _maps(folder: Path, case: str, meta: PredictionMeta) -> list[tuple[str, Path, MapKind]]:
    """``(name, file, kind)`` of each map present: uncertainty, variance, then the attention maps."""
    found = []
    for name, kind in ((layout.UNCERTAINTY, uncertainty_kind()), (layout.VARIANCE, variance_kind())):
        path = folder / layout.volume(case, name)
        if path.is_file():
            found.append((name, path, kind))
    names = meta.attention  # this model's maps; others in the folder may be stale
    if not isinstance(names, list):
        names = layout.attention_names(folder, case)
    for name in names:
        path = folder / layout.attention(case, name)
        if not path.is_file():
            raise DataError(path, f"listed in {layout.META} but missing", case=case)
        found.append((f"attention_{name}", path, attention_kind(str(name))))
    return found


def _uids(study: DicomStudy, series: DicomSeries, name: str, values: np.ndarray, affine: np.ndarray, origin: str
          ) -> tuple[str, str]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of an object: derived from the study, the source series, the
    object's name, where the prediction came from (``origin``: model, run, checkpoint, time of prediction,
    medseg-diff version) and a hash of its voxels and affine. The same prediction folder always gives the same
    UIDs; another model, run or prediction never reuses them, even for identical voxels (e.g. two empty SEGs),
    so a PACS that keeps the first copy of a UID cannot show one model's result under another's name."""
    from pydicom.uid import generate_uid

    digest = hashlib.sha256(np.ascontiguousarray(values).tobytes() + np.asarray(affine).tobytes()).hexdigest()
    return tuple(generate_uid(entropy_srcs=[study.study_uid, series.series_uid, name, what, origin, digest])
                 for what in ("series", "instance"))


def _origin(meta: PredictionMeta, when: datetime) -> str:
    """What makes one prediction of a study another's: model, run, checkpoint, time and code version."""
    from medseg_diff import __version__

    return json.dumps({**meta.origin(), "when": when.isoformat(), "version": __version__}, sort_keys=True)


@contextmanager
def _problems_named(path: Path, case: str, series: DicomSeries):
    """A ``ValueError`` of the DICOM builders (a grid mismatch, NaN values) as a ``DataError`` naming ``path``."""
    try:
        yield
    except ValueError as err:
        raise DataError(path, f"cannot be written over series #{series.number} {series.description!r}: {err}",
                        case=case) from None


def _write_all(out: Path, case: str, objects: dict) -> list[Path]:
    """Write each dataset atomically (hidden temporary, then rename); remove this case's stale ``.dcm`` files."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, ds in objects.items():
        tmp = out / f".{name}.tmp"
        try:
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, out / name)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(out / name)
    for stale in out.glob(f"{case}_*.dcm"):
        if stale not in written:
            stale.unlink()
    return written
