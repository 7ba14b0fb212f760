"""Output grid (BraTS field of view, LPS affine) and the per-case warp from case space to the template.

Coordinates: every point is in world millimetres (RAS, as NIfTI and nibabel define them). The output
grid's voxel axes run towards Left, Posterior, Superior like real BraTS files
(affine ``diag(-s, -s, s)``), and its centre sits on the template brain's centre, so the world
coordinates of a phantom are MNI coordinates up to the per-case warp.

A case is drawn by pulling each output point ``p`` back into the template: ``q = G(p)`` (random
global rotation/scale/shift + smooth displacement: the "patient" anatomy with its tumour), then
``M(q)`` (mass effect: tissue around the tumour is pushed outwards, i.e. looked up closer to the
tumour centre). The tumour itself is drawn in ``q`` coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from medseg_diff.data.synth.fields import cosine_field, random_cosine_coefficients

#: BraTS field of view in mm (240 × 240 × 155 voxels of 1 mm).
FOV_MM: tuple[float, float, float] = (240.0, 240.0, 155.0)
#: World point (MNI mm) put at the centre of the field of view: the template brain's bounding-box
#: centre, raised 2 mm so that the vertex keeps a margin and only the lowest brainstem is cut, as in BraTS.
BRAIN_CENTRE_MM: tuple[float, float, float] = (0.0, -17.0, 7.0)
#: the mass effect fades to zero over this distance (mm) towards the brain surface
SKULL_RAMP_MM = 20.0


@dataclass(frozen=True)
class OutputGrid:
    """The voxel grid of every file of a case: ``shape`` ``(X, Y, Z)`` and its LPS ``affine`` ``[4, 4]``."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: float

    def axis_world(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinates along each voxel axis: x ``[X]``, y ``[Y]``, z ``[Z]`` (float32)."""
        return tuple(
            (self.affine[a, a] * np.arange(n) + self.affine[a, 3]).astype(np.float32)
            for a, n in enumerate(self.shape)
        )


def output_grid(spacing: float) -> OutputGrid:
    """The BraTS-like grid at ``spacing`` mm: shape round(FOV / spacing), LPS, brain centred."""
    shape = tuple(int(np.floor(f / spacing + 0.5)) for f in FOV_MM)
    axes = np.array([-spacing, -spacing, spacing])
    affine = np.eye(4)
    affine[:3, :3] = np.diag(axes)
    affine[:3, 3] = np.asarray(BRAIN_CENTRE_MM) - axes * (np.asarray(shape) - 1) / 2.0
    return OutputGrid(shape=shape, affine=affine, spacing=float(spacing))


@dataclass(frozen=True)
class CaseWarp:
    """Per-case global pose and smooth displacement (case space → tumour-bearing template space).

    ``rotation`` ``[3, 3]`` and ``scale`` act about BRAIN_CENTRE_MM; ``shift_mm`` ``[3]``;
    ``displacement`` ``[3, K, K, K]`` cosine coefficients (mm) over the field of view.
    """

    rotation: np.ndarray
    scale: float
    shift_mm: np.ndarray
    displacement: np.ndarray


def random_warp(
    rng: np.random.Generator, max_angle_deg: float = 5.0, scale_range: tuple[float, float] = (0.93, 1.03),
    max_shift_mm: float = 3.0, displacement_rms_mm: float = 1.8,
) -> CaseWarp:
    """A small random rotation (each axis ±max_angle), isotropic scale, shift and smooth displacement."""
    angles = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg, size=3))
    rotation = rotation_matrix(angles)
    scale = float(rng.uniform(*scale_range))
    shift = rng.uniform(-max_shift_mm, max_shift_mm, size=3)
    displacement = np.stack([random_cosine_coefficients(rng, 4, displacement_rms_mm, False) for _ in range(3)])
    return CaseWarp(rotation=rotation, scale=scale, shift_mm=shift, displacement=displacement)


def reposition(warp: CaseWarp, rng: np.random.Generator, max_angle_deg: float = 3.0,
               max_shift_mm: float = 4.0) -> CaseWarp:
    """The same head placed anew in the scanner (a follow-up scan): a small extra rotation (each axis ±max_angle)
    and shift; scale and deformation, i.e. the patient's anatomy, are kept."""
    extra = rotation_matrix(np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg, size=3)))
    shift = warp.shift_mm + rng.uniform(-max_shift_mm, max_shift_mm, size=3)
    return replace(warp, rotation=extra @ warp.rotation, shift_mm=shift)


def warp_grid(grid: OutputGrid, warp: CaseWarp) -> np.ndarray:
    """``q = G(p)`` for every output voxel: template-space world points ``[3, X, Y, Z]`` (float32).

    Steps: 1. voxel → world (separable, LPS affine); 2. inverse pose about the brain centre
    (the case brain is the template rotated by R and scaled by s, so q = Rᵀ (p − c) / s + c − shift);
    3. add the smooth displacement.
    """
    # 1. world coordinates of the voxel axes, relative to the brain centre
    centre = np.asarray(BRAIN_CENTRE_MM, dtype=np.float32)
    rel = [a - c for a, c in zip(grid.axis_world(), centre)]
    x, y, z = rel[0][:, None, None], rel[1][None, :, None], rel[2][None, None, :]
    # 2. inverse pose
    inv = (warp.rotation.T / warp.scale).astype(np.float32)
    q = np.empty((3,) + grid.shape, dtype=np.float32)
    for a in range(3):
        q[a] = inv[a, 0] * x + inv[a, 1] * y + inv[a, 2] * z + np.float32(centre[a] - warp.shift_mm[a])
    # 3. smooth displacement (mm)
    for a in range(3):
        q[a] += cosine_field(warp.displacement[a], grid.shape)
    return q


@dataclass(frozen=True)
class MassEffect:
    """Radial push of the tissue away from ``centre`` ``[3]`` (mm), held back by the skull.

    Pull-back: ``M(q) = c + (q − c) (1 − strength · g · exp(−r² / 2σ²))`` with r = |q − c| and
    g = min(1, depth(q) / SKULL_RAMP_MM) (depth: distance to the brain surface). Monotone in r for
    strength < 1; tissue moves by at most ≈ 0.6 · strength · σ mm; the brain outline stays put, so
    the push compresses the cortex against the skull (sulcal effacement) instead of swelling the brain.
    """

    centre: np.ndarray
    strength: float
    sigma_mm: float

    def reach_mm(self) -> float:
        """Distance beyond which the push is negligible (4σ: below 0.0014 · strength · σ mm)."""
        return 4.0 * self.sigma_mm

    def pull_back(self, q: np.ndarray, depth_mm: np.ndarray) -> np.ndarray:
        """Template points ``[3, P]`` that end up at the tumour-bearing points ``q`` ``[3, P]``.

        ``depth_mm`` ``[P]`` is the distance of each ``q`` to the outside of the brain.
        """
        c = self.centre.astype(np.float32)[:, None]
        d = q - c
        r2 = np.sum(d * d, axis=0)
        skull = np.minimum(depth_mm / np.float32(SKULL_RAMP_MM), np.float32(1.0))
        push = np.float32(self.strength) * skull * np.exp(-r2 / np.float32(2 * self.sigma_mm**2))
        return c + d * (1.0 - push)


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """Rotation ``[3, 3]`` = Rz · Ry · Rx for angles (radians) about x, y, z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx
