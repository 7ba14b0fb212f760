"""Helpers of the DICOM tests: a tiny study, a prediction folder on its grid, dciodvfy and dcmqi."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from factories import BRATS2021, LPS_AFFINE, tiny_images, tiny_label
from medseg_diff.data.io import read_image

SHAPE = (16, 18, 20)  # not cubic: a swapped axis shows
DCMQI_BIN = Path(sys.executable).parent


def study_volumes(shape=SHAPE, affine=LPS_AFFINE, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Four integral modalities (stored exactly as int16) on ``affine``."""
    images = tiny_images(tiny_label(shape, BRATS2021, seed), BRATS2021, seed)
    return {m: (np.rint(a).astype(np.int16), np.asarray(affine, dtype=np.float64)) for m, a in images.items()}


def write_prediction_folder(folder: Path, case: str, reference: Path, seed: int = 1, variance: bool = False,
                            attention=("self", "cross")) -> dict[str, np.ndarray]:
    """What ``predict`` writes for a case, on the grid of ``reference``: seg (every brats2021 label), uncertainty,
    attention maps and, if asked, variance. Returns the arrays by file kind."""
    grid = read_image(reference)
    shape = grid.shape[:3]
    rng = np.random.default_rng(seed)
    arrays = {"seg": tiny_label(shape, BRATS2021, seed), "uncertainty": rng.uniform(0, 1.1, shape).astype(np.float32)}
    if variance:
        arrays["variance"] = rng.uniform(0, 0.25, shape).astype(np.float32)
    for name in attention:
        # as predict writes them: 1 = the 99.5th percentile, the hottest voxels above it
        arrays[f"attention_{name}"] = rng.uniform(0, 1.5, shape).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in arrays.items():
        image = nib.Nifti1Image(array, grid.affine)
        image.set_sform(grid.affine, code=1)
        image.set_qform(grid.affine, code=1)
        nib.save(image, str(folder / f"{case}_{kind}.nii.gz"))
    return arrays


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """``(errors, warnings)``: the lines of ``dciodvfy PATH`` starting with "Error" / "Warning"."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed (Debian/Ubuntu: apt-get install dicom3tools)")
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return [l for l in lines if l.startswith("Error")], [l for l in lines if l.startswith("Warning")]


def dcmqi(tool: str, source: Path, out: Path, *extra: str) -> list[Path]:
    """Run dcmqi's ``tool`` (segimage2itkimage, paramap2itkimage) writing NIfTI into ``out``; the files written."""
    exe = DCMQI_BIN / tool if (DCMQI_BIN / tool).exists() else shutil.which(tool)
    if exe is None:
        pytest.skip(f"dcmqi's {tool} is not installed (pip install dcmqi)")
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([str(exe), "--inputDICOM", str(source), "--outputDirectory", str(out), "--outputType",
                           "nifti", *extra], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return sorted(out.glob("*.nii.gz"))
