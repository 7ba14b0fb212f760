"""DICOM in: study folders read as cases. Reading needs nothing of writing results (``medseg_diff.dicom``).

- ``rules``: :class:`SeriesRule`, which series of a study is t1, t1ce, t2, flair (regexes on SeriesDescription).
- ``study``: :func:`read_study`, :func:`find_studies`, :func:`is_dicom_study` -> :class:`DicomStudy`.
- ``geometry``: the RAS affine of a stack of frames; exact (permute / flip / shift) maps between voxel grids (the
  writer maps label maps back onto a series' frames with it).

Names are imported lazily: importing the data layer does not load pydicom.
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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
