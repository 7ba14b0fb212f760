"""DICOM out: results as DICOM Segmentation / Parametric Map objects, and DICOMweb. Reading a study (rules, study,
geometry) is the data layer's (``medseg_diff.data.dicom``), and needs nothing of this package.

- ``outputs``: :func:`write_dicom_outputs`, a prediction folder as a SEG and parametric maps (highdicom);
  ``seg`` / ``pmap`` build one object (:func:`segmentation_dataset`, :func:`parametric_map_dataset`).
- ``phantom``: :func:`write_phantom_study`, volumes as an MR study (tests, demos).
- ``web``: DICOMweb (fetch a study, store results).

Names are imported lazily: importing the package does not load highdicom.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
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
