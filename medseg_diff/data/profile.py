"""What a model was trained on, measured from the data at training time and stored in its checkpoint: the data set,
whether it is synthetic, how many cases, their voxel size and the grid the network saw (``data.spacing``, or the
data's own voxel size when that is null), and the manifest's content hash. Inference reads it from the checkpoint,
never from the working folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_diff.data.io import read_image
from medseg_diff.data.manifest import Manifest, ManifestCase
from medseg_diff.errors import ConfigError

#: voxel sizes within this many mm are the same grid (header rounding)
SPACING_ATOL = 1e-3
#: the header description ``medseg-diff synth`` writes into every phantom
SYNTH_MARK = "medseg-diff synth"


def _first_image(manifest: Manifest, case: ManifestCase) -> Path:
    return manifest.path_of(next(iter(case.images.values())))


def _header(path: Path) -> tuple[str, tuple[float, float, float]]:
    """(header description, voxel size in mm) of an image, reading only its header where the format allows."""
    try:
        header = nib.load(str(path)).header  # NIfTI: lazy, the header only
        description = bytes(header["descrip"]).decode("ascii", "replace").lower()
    except Exception:  # MHA / NRRD / DICOM: through the package's reader
        header, description = read_image(path).header, ""
    return description, tuple(float(z) for z in header.get_zooms()[:3])


def native_spacing(manifest: Manifest, cases: Sequence[ManifestCase]) -> tuple[float, float, float]:
    """The voxel size (mm) every case of ``cases`` shares; ``ConfigError`` naming ``data.spacing`` and two cases
    that disagree, since a network trained on mixed grids has no one scale to predict at."""
    seen: dict[tuple[float, float, float], str] = {}
    for case in cases:
        _, zooms = _header(_first_image(manifest, case))
        match = next((z for z in seen if np.allclose(z, zooms, atol=SPACING_ATOL)), None)
        if match is None:
            seen[zooms] = case.id
        if len(seen) > 1:
            (a, first), (b, other) = list(seen.items())[:2]
            raise ConfigError("data.spacing", f"is null (train at the data's own voxel size), but the training cases "
                                              f"differ: {first} {_mm(a)}, {other} {_mm(b)}; set data.spacing to the "
                                              f"grid to resample every case to (e.g. [1.0, 1.0, 1.0])")
    if not seen:
        raise ConfigError("data.spacing", "is null and there are no training cases to measure the voxel size of")
    return next(iter(seen))


def training_record(manifest: Manifest, train: Sequence[ManifestCase], val: Sequence[ManifestCase],
                    spacing: Sequence[float] | None) -> dict:
    """The ``training_data`` entry of a checkpoint: ``dataset``, ``convention``, ``cases`` (trained on),
    ``validation_cases`` (the best checkpoint chosen on), ``synthetic`` (every case a medseg-diff phantom, by its
    header, or the manifest says so by name), ``voxel_mm`` (the cases' own voxel size; None when they differ),
    ``spacing_mm`` (the grid the network was trained at: ``spacing`` or ``voxel_mm``), ``manifest_sha256``
    (``Manifest.content_hash``: the data and its split)."""
    cases = list(train) + list(val)
    descriptions, zooms = zip(*(_header(_first_image(manifest, c)) for c in cases)) if cases else ((), ())
    synthetic = bool(cases) and (all(SYNTH_MARK in d for d in descriptions)
                                 or any(w in manifest.name.lower() for w in ("synth", "phantom")))
    same = bool(zooms) and all(np.allclose(z, zooms[0], atol=SPACING_ATOL) for z in zooms)
    voxel = [float(v) for v in zooms[0]] if same else None
    grid = [float(v) for v in spacing] if spacing is not None else voxel
    return {"dataset": manifest.name, "convention": manifest.convention, "cases": len(train),
            "validation_cases": len(val), "synthetic": synthetic, "voxel_mm": voxel, "spacing_mm": grid, "manifest_sha256": manifest.content_hash()}


def describe(record: dict) -> str:
    """Plain words for a ``training_record``, e.g. "synthetic BraTS-like phantoms (medseg-diff synth), 3 mm voxels:
    data set 'synthetic-brats', 11 training cases, brats2021 labels"."""
    what = "synthetic BraTS-like phantoms (medseg-diff synth)" if record.get("synthetic") else "images"
    if record.get("voxel_mm"):
        what += f", {_mm(record['voxel_mm'])} voxels"
    grid = record.get("spacing_mm")
    resampled = f"; resampled to {_mm(grid)} for training" if grid and grid != record.get("voxel_mm") else ""
    return (f"{what}: data set '{record.get('dataset')}', {record.get('cases')} training cases, "
            f"{record.get('convention')} labels{resampled}")


def _mm(zooms) -> str:
    values = [float(z) for z in zooms]
    if max(values) - min(values) < SPACING_ATOL:
        return f"{values[0]:g} mm"
    return " \u00d7 ".join(f"{z:g}" for z in values) + " mm"
