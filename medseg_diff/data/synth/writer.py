"""Writing a phantom case in a BraTS layout: names, label values, byte-reproducible ``.nii.gz`` files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_diff.data.conventions import BRATS2021, BRATS2023, MODALITIES, LabelConvention
from medseg_diff.data.synth.tumour import ED, ET, NCR

#: layouts the phantoms can be written in
LAYOUTS: dict[str, LabelConvention] = {"brats2021": BRATS2021, "brats2023": BRATS2023}
#: gzip level: 1 is ~3× faster than 6 on noisy int16 volumes and only ~10 % larger
GZIP_LEVEL = 1


def layout_convention(layout: str) -> LabelConvention:
    """The label convention of ``layout``; ValueError naming the known layouts otherwise."""
    try:
        return LAYOUTS[layout]
    except (KeyError, TypeError):
        raise ValueError(f"unknown synth layout {layout!r}; choose one of: {', '.join(LAYOUTS)}") from None


def case_id(layout: str, index: int, timepoint: int = 0) -> str:
    """Case folder name of patient ``index``'s scan ``timepoint``: ``BraTS2021_Synth_00007`` (one scan per patient),
    or ``BraTS-SYN-00007-000``, ``BraTS-SYN-00007-001``, ... (BraTS 2023+: the id carries the timepoint)."""
    if layout == "brats2023":
        return f"BraTS-SYN-{index:05d}-{timepoint:03d}"
    if timepoint:
        raise ValueError(f"layout {layout!r} has no timepoints in its case ids; use brats2023")
    return f"BraTS2021_Synth_{index:05d}"


def case_files(case_dir: Path, convention: LabelConvention) -> dict[str, Path]:
    """Paths of a case's files keyed by MODALITIES names and ``"seg"``."""
    stem = case_dir.name + convention.separator
    files = {m: case_dir / f"{stem}{s}.nii.gz" for m, s in zip(MODALITIES, convention.modality_suffixes)}
    files["seg"] = case_dir / f"{stem}{convention.seg_suffix}.nii.gz"
    return files


def to_convention(labels: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """Internal labels (0, NCR, ED, ET) ``[X, Y, Z]`` → the convention's values, uint8."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[NCR], lut[ED], lut[ET] = convention.core, convention.edema, convention.enhancing
    return lut[labels]


def write_case(case_dir: Path, convention: LabelConvention, volumes: dict[str, np.ndarray], affine: np.ndarray) -> None:
    """Write ``volumes`` (modalities int16, ``seg`` internal labels) ``[X, Y, Z]`` into ``case_dir``."""
    case_dir.mkdir(parents=True, exist_ok=True)
    for key, path in case_files(case_dir, convention).items():
        data = to_convention(volumes[key], convention) if key == "seg" else volumes[key]
        write_nifti_gz(path, data, affine)


def write_nifti_gz(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` as ``.nii.gz`` with identical bytes on every run (gzip mtime 0, no file name).

    The file appears atomically (written beside it, then renamed), so a killed run never leaves a
    truncated volume under the final name.
    """
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"medseg-diff synthetic phantom"
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    payload = gzip.compress(image.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
