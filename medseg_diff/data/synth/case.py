"""One phantom case in memory: anatomy warped per case, a tumour grown in it, four modalities rendered.

A patient ``index`` may be scanned several times (``timepoint`` 0, 1, ...): every scan has the patient's anatomy
(the same deformation and scale) and tumour (same place and shape), and each follow-up adds a new head position in
the scanner, a tumour grown or shrunk a little from the scan before, and a new session's contrast, bias field and
noise. Timepoint 0 is the case as drawn before timepoints existed, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from medseg_diff.data.conventions import MODALITIES
from medseg_diff.data.synth.anatomy import Anatomy, load_anatomy, sample, sample_tissue, template_resolution
from medseg_diff.data.synth.contrast import Tissue, draw_appearance, render_modality
from medseg_diff.data.synth.geometry import OutputGrid, output_grid, random_warp, reposition, warp_grid
from medseg_diff.data.synth.tumour import Tumour, draw_tumour, evolve_tumour, grow_tumour, keep_connected


@dataclass(frozen=True)
class SynthCase:
    """A rendered case: ``volumes`` maps each of MODALITIES to int16 ``[X, Y, Z]`` and ``"seg"`` to
    internal labels (0, NCR, ED, ET) uint8 ``[X, Y, Z]``; ``grid`` holds shape and LPS affine;
    ``tissue`` the healthy tissue probabilities and brain mask behind the images (for checks).
    """

    volumes: dict[str, np.ndarray]
    grid: OutputGrid
    tumour: Tumour
    tissue: Tissue


def case_rngs(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent generators for each part of case ``index``; they depend on (seed, index) only."""
    names = ("warp", "tumour", "appearance", "noise")
    children = np.random.SeedSequence([seed, index]).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def follow_up_rngs(seed: int, index: int, timepoint: int) -> dict[str, np.random.Generator]:
    """Independent generators of what changes at scan ``timepoint`` (≥ 1) of patient ``index``: head position,
    tumour change, the session's appearance and noise; they depend on (seed, index, timepoint) only."""
    names = ("pose", "change", "appearance", "noise")
    children = np.random.SeedSequence([seed, index, timepoint]).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def make_case(seed: int, index: int, spacing: float, anatomy: Anatomy | None = None, timepoint: int = 0) -> SynthCase:
    """Draw and render scan ``timepoint`` of patient ``index`` of the phantom set ``seed`` at ``spacing`` mm.

    Steps: 1. random pose + smooth deformation (output voxel → template point q), a follow-up placed anew;
    2. tumour, a follow-up's changed scan by scan; 3. mass effect near the tumour; 4. healthy tissue at the displaced
    points; 5. tumour labels; 6. the four modalities with their artefacts.
    """
    if timepoint < 0:
        raise ValueError(f"timepoint must be >= 0, got {timepoint}")
    rngs = case_rngs(seed, index)
    anatomy = anatomy if anatomy is not None else load_anatomy(template_resolution(spacing))
    grid = output_grid(spacing)
    # 1-2. the patient's pose, deformation and tumour; a follow-up: tumour changed scan by scan, head placed anew
    warp, tumour = random_warp(rngs["warp"]), draw_tumour(rngs["tumour"], anatomy)
    for scan in range(1, timepoint + 1):
        later = follow_up_rngs(seed, index, scan)
        tumour = evolve_tumour(tumour, later["change"])
        if scan == timepoint:
            warp = reposition(warp, later["pose"])
            rngs = {**rngs, "appearance": later["appearance"], "noise": later["noise"]}
    # 1. case space → tumour-bearing template space, [3, N]
    q = warp_grid(grid, warp).reshape(3, -1)
    # 3. mass effect, only where it is not negligible
    near = _points_within(q, tumour.centre, tumour.reach_mm())
    q_near = q[:, near]
    source = q.copy()
    depth = sample(anatomy.depth, anatomy.world_to_index(q_near))
    source[:, near] = tumour.mass.pull_back(q_near, depth)
    # 4. healthy tissue at the displaced points
    tissue_flat = sample_tissue(anatomy, source)
    # 5. tumour labels near its centre, inside the brain
    in_brain = tissue_flat["mask"] > 0.5
    tmap = grow_tumour(tumour, q_near, tissue_flat["wm"][near], tissue_flat["csf"][near], in_brain[near])
    labels = np.zeros(q.shape[1], dtype=np.uint8)
    labels[near] = tmap.labels
    labels = keep_connected(labels.reshape(grid.shape)).reshape(-1)
    tmap = replace(tmap, labels=labels[near])
    # 6. modalities
    tissue = Tissue(
        csf=tissue_flat["csf"].reshape(grid.shape), gm=tissue_flat["gm"].reshape(grid.shape),
        wm=tissue_flat["wm"].reshape(grid.shape), detail=tissue_flat["detail"].reshape(grid.shape),
        brain=(in_brain | (labels > 0)).reshape(grid.shape),
    )
    look = draw_appearance(rngs["appearance"], tumour.enhancement)
    volumes = {m: render_modality(m, tissue, near, tmap, look, grid.spacing, rngs["noise"]) for m in MODALITIES}
    volumes["seg"] = labels.reshape(grid.shape)
    return SynthCase(volumes=volumes, grid=grid, tumour=tumour, tissue=tissue)


def _points_within(points: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """Flat indices of the points ``[3, N]`` closer than ``radius`` mm to ``centre`` ``[3]``."""
    d2 = np.zeros(points.shape[1], dtype=np.float32)
    for a in range(3):
        d2 += (points[a] - np.float32(centre[a])) ** 2
    return np.flatnonzero(d2 < np.float32(radius) ** 2)
