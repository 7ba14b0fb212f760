"""Geometry of a stack of single-frame DICOM images, and exact maps between voxel grids.

DICOM places pixel ``(row r, column c)`` of a frame at ``ImagePositionPatient + c * PixelSpacing[1] * u +
r * PixelSpacing[0] * v`` in LPS millimetres, with ``u, v`` the two halves of ImageOrientationPatient (along a row,
down a column). Frames are sorted along the normal ``u x v`` (as ITK / GDCM sort them), so a series is the
grid ``(c, r, f)`` with the RAS affine of :func:`frame_affine`, the same affine ``data.io`` gives the series it
reads through SimpleITK.

A NIfTI volume ``[X, Y, Z]`` on the same grid (in any axis order or direction) is moved onto the frames by
:func:`resample_exact`, which only permutes, flips and shifts axes: it refuses grids that differ by more than that
(a rotation, another voxel size, a fractional shift), since a label map must not be interpolated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: LPS <-> RAS: negate the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ORIENTATION_TOL = 1e-4  # direction cosines that differ by less are equal
_POSITION_TOL = 1e-2  # mm (positions are written with ~6 decimals; some scanners round to 1e-3)
_GRID_TOL = 1e-3  # voxels: how far from integral a grid mapping may be


def orientation(ds) -> tuple[np.ndarray, np.ndarray]:
    """``(u, v)``: unit LPS vectors along a row (increasing column) and down a column (increasing row)."""
    iop = np.asarray([float(x) for x in ds.ImageOrientationPatient], dtype=np.float64)
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise ValueError(f"ImageOrientationPatient must hold 6 numbers, got {list(ds.ImageOrientationPatient)}")
    u, v = iop[:3], iop[3:]
    if abs(np.linalg.norm(u) - 1) > 1e-3 or abs(np.linalg.norm(v) - 1) > 1e-3 or abs(float(u @ v)) > 1e-3:
        raise ValueError(f"ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors")
    return u, v


def position(ds) -> np.ndarray:
    """ImagePositionPatient (LPS mm) of a frame's first pixel."""
    ipp = np.asarray([float(x) for x in ds.ImagePositionPatient], dtype=np.float64)
    if ipp.shape != (3,) or not np.all(np.isfinite(ipp)):
        raise ValueError(f"ImagePositionPatient must hold 3 numbers, got {list(ds.ImagePositionPatient)}")
    return ipp


def slice_order(datasets: Sequence) -> list[int]:
    """Indices of ``datasets`` sorted along the slice normal ``u x v`` of the first (ascending, as ITK sorts)."""
    u, v = orientation(datasets[0])
    normal = np.cross(u, v)
    distance = [float(position(ds) @ normal) for ds in datasets]
    return sorted(range(len(datasets)), key=lambda i: distance[i])


def frame_affine(datasets: Sequence) -> np.ndarray:
    """The RAS affine of the grid ``(column c, row r, frame f)`` of single-frame images **in slice order**.

    Raises ``ValueError`` saying what is wrong when the frames do not form one regular grid: orientations, sizes
    or pixel spacings that differ, two frames at one position (several echoes or volumes in one series), or gaps.
    """
    first = datasets[0]
    u, v = orientation(first)
    rows, cols = int(first.Rows), int(first.Columns)
    spacing = [float(s) for s in first.PixelSpacing]  # [between rows, between columns]
    if len(spacing) != 2 or min(spacing) <= 0 or not np.all(np.isfinite(spacing)):
        raise ValueError(f"PixelSpacing must be two numbers > 0, got {list(first.PixelSpacing)}")
    for ds in datasets[1:]:
        du, dv = orientation(ds)
        if np.abs(du - u).max() > _ORIENTATION_TOL or np.abs(dv - v).max() > _ORIENTATION_TOL:
            raise ValueError("its images have different orientations (ImageOrientationPatient); a localizer?")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ValueError(f"its images have different sizes ({rows}x{cols} and {ds.Rows}x{ds.Columns})")
        if np.abs(np.asarray([float(s) for s in ds.PixelSpacing]) - spacing).max() > 1e-4:
            raise ValueError(f"its images have different pixel spacings ({spacing} and {list(ds.PixelSpacing)})")
    positions = np.stack([position(ds) for ds in datasets])
    if len(datasets) > 1:
        step = (positions[-1] - positions[0]) / (len(datasets) - 1)
        gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
        if gaps.min() < _POSITION_TOL:
            raise ValueError(f"two of its {len(datasets)} images lie at one position (several echoes, phases or "
                             "volumes in one series?)")
        expected = positions[0] + np.arange(len(datasets))[:, None] * step
        worst = float(np.linalg.norm(positions - expected, axis=1).max())
        if worst > max(_POSITION_TOL, 0.01 * float(np.linalg.norm(step))):
            raise ValueError(f"its slices are not evenly spaced (gaps from {gaps.min():.4g} to {gaps.max():.4g} mm; "
                             "a missing slice?)")
    else:
        thickness = float(getattr(first, "SpacingBetweenSlices", None) or getattr(first, "SliceThickness", 1) or 1)
        step = np.cross(u, v) * thickness
    lps = np.eye(4)
    lps[:3, 0] = u * spacing[1]
    lps[:3, 1] = v * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return LPS_TO_RAS @ lps


def grid_map(src_affine: np.ndarray, dst_affine: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """``(axes, signs, offsets)`` with ``src index[axes[a]] = signs[a] * dst index[a] + offsets[a]`` for the grids of
    two affines that differ only by an axis permutation, flips and a whole-voxel shift; ``ValueError`` otherwise."""
    m = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    rot, shift = m[:3, :3], m[:3, 3]
    perm = np.rint(rot)
    if np.abs(rot - perm).max() > _GRID_TOL or not np.array_equal(np.abs(perm).sum(0), np.ones(3)) \
            or not np.array_equal(np.abs(perm).sum(1), np.ones(3)):
        raise ValueError("the grids differ by more than an axis permutation or flip (another voxel size, a rotation)"
                         f"; voxel-to-voxel map:\n{np.round(m, 4)}")
    if np.abs(shift - np.rint(shift)).max() > _GRID_TOL:
        raise ValueError(f"the grids are shifted by a fraction of a voxel ({np.round(shift, 4).tolist()} voxels)")
    axes = [int(np.flatnonzero(perm[:, a])[0]) for a in range(3)]
    signs = [int(perm[axes[a], a]) for a in range(3)]
    offsets = [int(np.rint(shift[axes[a]])) for a in range(3)]
    return axes, signs, offsets


def resample_exact(src: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int],
                   fill=0) -> np.ndarray:
    """``src`` ([A, B, C] on ``src_affine``) on the grid ``dst_shape`` / ``dst_affine`` without interpolation:
    each destination voxel takes the source voxel at the same world position, ``fill`` outside the source.
    The grids must differ only by axis order, flips and whole-voxel shifts (:func:`grid_map`)."""
    src = np.asarray(src)
    axes, signs, offsets = grid_map(src_affine, dst_affine)
    out = src.transpose(axes)  # out axis a is src axis axes[a]
    valid = np.ones(tuple(dst_shape), dtype=bool)
    for a in range(3):
        index = signs[a] * np.arange(dst_shape[a]) + offsets[a]
        inside = (index >= 0) & (index < out.shape[a])
        out = np.take(out, np.clip(index, 0, out.shape[a] - 1), axis=a)
        shape = [1, 1, 1]
        shape[a] = -1
        valid &= inside.reshape(shape)
    return np.where(valid, out, np.asarray(fill, dtype=out.dtype))


def volume_to_frames(volume: np.ndarray, affine: np.ndarray, datasets: Sequence) -> np.ndarray:
    """A NIfTI volume ``[X, Y, Z]`` (RAS ``affine``) as frames ``[F, rows, columns]`` of ``datasets`` (in slice
    order); ``ValueError`` unless the volume covers exactly the frames' grid."""
    grid = frame_affine(datasets)
    shape = (int(datasets[0].Columns), int(datasets[0].Rows), len(datasets))
    axes, signs, offsets = grid_map(affine, grid)
    for a in range(3):
        ends = sorted((offsets[a], signs[a] * (shape[a] - 1) + offsets[a]))
        if ends[0] != 0 or ends[1] != volume.shape[axes[a]] - 1:
            raise ValueError(f"the volume (shape {tuple(volume.shape)}) does not cover exactly the series' "
                             f"{shape[2]} frames of {shape[1]}x{shape[0]} pixels")
    return resample_exact(volume, affine, grid, shape).transpose(2, 1, 0)
