"""DICOM in, DICOM out: study folders as cases, and results as DICOM Segmentation / Parametric Map objects.

- ``rules``: :class:`SeriesRule`, which series of a study is t1, t1ce, t2, flair (regexes on SeriesDescription).
- ``study``: :func:`read_study`, :func:`find_studies`, :func:`is_dicom_study` -> :class:`DicomStudy`.
- ``geometry``: the RAS affine of a stack of frames; exact (permute / flip / shift) maps between voxel grids.
- ``outputs``: :func:`write_dicom_outputs`, a prediction folder as a SEG and parametric maps (highdicom);
  ``seg`` / ``pmap`` build one object (:func:`segmentation_dataset`, :func:`parametric_map_dataset`).
- ``phantom``: :func:`write_phantom_study`, volumes as an MR study (tests, demos).
- ``web``: DICOMweb (fetch a study, store results).

Names are imported lazily: reading a study does not load highdicom.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SeriesRule": "rules",
    "DicomSeries": "study",
    "DicomStudy": "study",
    "SeriesSummary": "study",
    "find_studies": "study",
    "is_dicom_file": "study",
    "is_dicom_study": "study",
    "read_study": "study",
    "write_dicom_outputs": "outputs",
    "segmentation_dataset": "seg",
    "parametric_map_dataset": "pmap",
    "write_phantom_study": "phantom",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
