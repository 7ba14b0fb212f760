"""Helpers of the DICOMweb tests (importable from the test modules, unlike a conftest): a free loopback port, and a
small MR series (through the package's own phantom writer)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_mr_series(folder: Path, *, study_uid: str, series_number: int, description: str,
                    slices: int = 8, size: int = 16, spacing: float = 2.0) -> list[Path]:
    """One axial MR series of random 16-bit pixels as ``folder/*.dcm`` (``dicom.write_phantom_study``; the study's
    Frame of Reference derives from ``study_uid``), its files in slice order."""
    import pydicom

    from medseg_diff.dicom import write_phantom_study

    volume = np.random.default_rng(series_number).integers(0, 4000, (size, size, slices)).astype(np.int16)
    affine = np.diag([1.0, 1.0, spacing, 1.0])
    affine[:3, 3] = [-16.0, -16.0, 0.0]
    write_phantom_study({description: (volume, affine)}, folder, descriptions={description: description},
                        patient_id="MEDSEG-PH1", study_uid=study_uid, first_series_number=series_number,
                        layout="flat", suffix=".dcm")
    return sorted(folder.glob("*.dcm"), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
