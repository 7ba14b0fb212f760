"""``medseg-diff check MANIFEST``: verify that every case of a manifest is usable.

Per case: every file exists, its checksum matches, it decodes fully (no truncation); image
modalities agree in shape and affine (tolerance ``AFFINE_ATOL`` on every affine entry: mm for the
translation, mm per voxel for the rotation-zoom part); no NaN/Inf; the brain is not empty (some
non-zero voxels in every modality); label values belong to the convention and the label grid matches
the images. Each problem names case, file and what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg_diff.data.conventions import get_convention
from medseg_diff.data.io import read_array
from medseg_diff.data.manifest import Manifest, ManifestCase, sha256_file
from medseg_diff.errors import DataError

#: Largest allowed absolute difference between two modalities' affine entries.
AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class Problem:
    case: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"case {self.case}: {self.file}: {self.message}"


def check_manifest(
    manifest: Manifest,
    continue_on_error: bool = False,
    verify_checksums: bool = True,
    on_case: Callable[[ManifestCase, list[Problem]], None] | None = None,
) -> list[Problem]:
    """Check every case; stop at the first case with problems unless ``continue_on_error``."""
    problems: list[Problem] = []
    for case in manifest.cases:
        found = list(check_case(manifest, case, verify_checksums))
        if on_case is not None:
            on_case(case, found)
        problems.extend(found)
        if found and not continue_on_error:
            break
    return problems


def check_case(manifest: Manifest, case: ManifestCase, verify_checksums: bool = True) -> Iterator[Problem]:
    """Yield every problem of one case (an empty iterator for a good case)."""
    conv = get_convention(manifest.convention)
    # 1. files exist and checksums match
    for rel in list(case.images.values()) + ([case.label] if case.label else []):
        path = manifest.path_of(rel)
        if not path.exists():
            yield Problem(case.id, str(path), "file not found")
            return
        expected = case.sha256.get(rel)
        if verify_checksums and expected is None:
            yield Problem(case.id, str(path), "no checksum recorded in the manifest")
        elif verify_checksums and sha256_file(path) != expected:
            yield Problem(case.id, str(path), "checksum changed since the manifest was built (SHA-256 mismatch)")
    # 2. images decode, are finite and non-empty, and agree in grid
    grid: tuple[tuple[int, ...], np.ndarray, str] | None = None
    for modality, rel in case.images.items():
        path = manifest.path_of(rel)
        try:
            data, affine = read_array(path)
        except DataError as err:
            yield Problem(case.id, str(path), err.problem)
            continue
        yield from _image_problems(case.id, path, modality, data, manifest.image_layout)
        shape = data.shape[:3]
        if grid is None:
            grid = (shape, affine, str(path))
        else:
            yield from _grid_problems(case.id, path, shape, affine, grid)
    # 3. label decodes, matches the grid, holds only the convention's values
    if case.label:
        path = manifest.path_of(case.label)
        try:
            label, affine = read_array(path)
        except DataError as err:
            yield Problem(case.id, str(path), err.problem)
            return
        if label.ndim != 3:
            yield Problem(case.id, str(path), f"label must be 3D, got shape {label.shape}")
            return
        if not np.all(np.isfinite(label)):
            yield Problem(case.id, str(path), "label contains NaN/Inf")
            return
        unknown = conv.unknown_labels(label)
        if unknown:
            yield Problem(
                case.id, str(path),
                f"unknown label values {unknown}; {conv.name} allows {list(conv.labels)}",
            )
        if grid is not None:
            yield from _grid_problems(case.id, path, label.shape, affine, grid)


def _image_problems(case_id: str, path: Path, modality: str, data: np.ndarray, layout: str) -> Iterator[Problem]:
    expected_ndim = 4 if layout == "4d" else 3
    if data.ndim != expected_ndim:
        yield Problem(case_id, str(path), f"{modality}: expected a {expected_ndim}D image, got shape {data.shape}")
        return
    if layout == "4d" and data.shape[3] != 4:
        yield Problem(case_id, str(path), f"expected 4 channels (FLAIR, T1w, t1gd, T2w), got {data.shape[3]}")
    finite = np.isfinite(data)
    if not finite.all():
        yield Problem(case_id, str(path), f"{modality}: {int((~finite).sum())} NaN/Inf voxels")
        return
    channels = np.moveaxis(data, -1, 0) if layout == "4d" else data[None]
    for c, channel in enumerate(channels):
        if not np.any(channel):
            what = modality if layout != "4d" else f"channel {c}"
            yield Problem(case_id, str(path), f"{what}: empty volume (all voxels are zero)")
        elif float(channel.max()) == float(channel.min()):
            yield Problem(case_id, str(path), f"{modality}: constant volume (value {float(channel.max())})")


def grid_mismatch(shape, affine, ref_shape, ref_affine, ref_path) -> list[str]:
    """What differs between a volume's grid and a reference grid (shape; affine beyond ``AFFINE_ATOL`` mm):
    the one grid rule of the package, used by ``check``, ``predict`` and ``evaluate``. Empty when they agree."""
    problems = []
    if tuple(shape[:3]) != tuple(ref_shape[:3]):
        problems.append(f"shape {tuple(shape[:3])} differs from {tuple(ref_shape[:3])} of {ref_path}")
    diff = float(np.max(np.abs(np.asarray(affine) - np.asarray(ref_affine))))
    if diff > AFFINE_ATOL:
        problems.append(f"affine differs from that of {ref_path} by up to {diff:.4g} (tolerance {AFFINE_ATOL})")
    return problems


def _grid_problems(case_id, path, shape, affine, grid) -> Iterator[Problem]:
    ref_shape, ref_affine, ref_path = grid
    for problem in grid_mismatch(shape, affine, ref_shape, ref_affine, ref_path):
        yield Problem(case_id, str(path), problem)
