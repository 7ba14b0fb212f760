"""A glioma-like tumour: irregular core with a necrotic centre and an enhancing rim, white-matter edema.

Shapes are level sets of ``distance / radius + amplitude · smooth noise`` (never plain spheres),
drawn in the tumour-bearing template space ``q`` (see geometry.py) so that the mass effect and the
per-case warp deform them like the anatomy around them. Labels use the internal codes NCR, ED, ET
below; the writer maps them to a BraTS convention.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from medseg_diff.data.synth.anatomy import Anatomy
from medseg_diff.data.synth.fields import LocalNoise, local_noise
from medseg_diff.data.synth.geometry import MassEffect, rotation_matrix

#: internal label codes (mapped to a convention's core/edema/enhancing by the writer)
NCR, ED, ET = 1, 2, 3

#: case kinds and their probabilities: "small" has a < 1 cm³ tumour core (so ET < 1 cm³),
#: "faint" a barely enhancing rim; together ≥ 20 % of cases keep ET Dice from saturating.
KINDS: dict[str, float] = {"typical": 0.64, "small": 0.18, "faint": 0.18}
#: probabilities of a case with no enhancing tumour (all core necrotic / non-enhancing), and of a
#: solid enhancing core with no necrosis
P_NO_ET, P_NO_NCR = 0.05, 0.04
#: white-matter probability at which the edema level set is neither pushed out nor held back
WM_LEVEL = 0.7
#: no edema is drawn farther than this from the tumour centre (mm)
MAX_REACH_MM = 80.0


@dataclass(frozen=True)
class Tumour:
    """One case's tumour: geometry (mm, template space), appearance and its smooth noise fields.

    ``rotation`` ``[3, 3]`` and ``axes`` ``[3]`` (relative semi-axes) make the ellipsoidal distance;
    ``enhancement`` is the T1ce signal of ET relative to white matter.
    """

    kind: str
    centre: np.ndarray
    rotation: np.ndarray
    axes: np.ndarray
    core_radius_mm: float
    rim_mm: float
    rim_coverage: float
    core_noise_amp: float
    edema_radius_mm: float
    edema_noise_amp: float
    edema_wm_affinity: float
    enhancement: float
    has_ncr: bool
    has_et: bool
    mass: MassEffect
    noise: dict[str, LocalNoise]

    def core_reach_mm(self) -> float:
        """Radius (mm) around the centre outside which there is no tumour core."""
        return self.core_radius_mm * float(self.axes.max()) * (1 + 3 * self.core_noise_amp)

    def edema_reach_mm(self) -> float:
        """Radius (mm) around the centre outside which there is no edema."""
        spread = 1 + 3 * self.edema_noise_amp + WM_LEVEL * self.edema_wm_affinity
        return min(self.edema_radius_mm * float(self.axes.max()) * spread, MAX_REACH_MM)

    def reach_mm(self) -> float:
        """Radius (mm) around the centre outside which no label and no mass effect is drawn."""
        return max(self.edema_reach_mm(), self.core_reach_mm(), self.mass.reach_mm())


@dataclass(frozen=True)
class TumourMap:
    """Tumour labels at a set of P points: ``labels`` ``[P]`` (0, NCR, ED, ET), ``edema_weight`` ``[P]``
    (0–1, how strongly edema replaces normal tissue signal), ``texture`` ``[P]`` (unit-variance noise).
    """

    labels: np.ndarray
    edema_weight: np.ndarray
    texture: np.ndarray


def draw_tumour(rng: np.random.Generator, anatomy: Anatomy) -> Tumour:
    """A random tumour placed in deep white matter of either hemisphere, any lobe.

    Steps: 1. kind and composition; 2. sizes; 3. centre in white matter deep enough for the core;
    4. shape (ellipsoid + noise amplitudes); 5. mass effect; 6. smooth noise fields around the centre.
    """
    # 1. kind and composition
    kind = str(rng.choice(list(KINDS), p=list(KINDS.values())))
    composition = str(rng.choice(["full", "no_et", "no_ncr"], p=[1 - P_NO_ET - P_NO_NCR, P_NO_ET, P_NO_NCR]))
    # 2. sizes (mm), rim coverage and enhancement
    core, rim, edema, enhancement, coverage, composition = _draw_sizes(rng, kind, composition)
    # 3. centre (MNI mm), jittered within a template voxel
    centre = _white_matter_point(rng, anatomy, min_depth_mm=1.3 * core + 6.0)
    # 4. shape
    rotation = rotation_matrix(rng.uniform(-np.pi, np.pi, size=3))
    axes = np.clip(np.exp(rng.normal(0.0, 0.12, size=3)), 0.8, 1.25)
    core_amp, edema_amp, affinity = rng.uniform(0.12, 0.28), rng.uniform(0.2, 0.4), rng.uniform(0.3, 0.6)
    # 5. mass effect: stronger for bigger tumours
    size = core + 0.3 * edema
    mass = MassEffect(centre=centre, strength=float(rng.uniform(0.3, 0.6) * min(1.0, size / 25.0)), sigma_mm=size)
    tumour = Tumour(
        kind=kind, centre=centre, rotation=rotation, axes=axes, core_radius_mm=core, rim_mm=rim,
        rim_coverage=coverage, core_noise_amp=float(core_amp), edema_radius_mm=edema,
        edema_noise_amp=float(edema_amp), edema_wm_affinity=float(affinity), enhancement=enhancement,
        has_ncr=composition != "no_ncr", has_et=composition != "no_et", mass=mass, noise={},
    )
    # 6. noise fields (correlation lengths in mm) on cubes just big enough for their use
    core_reach, edema_reach = tumour.core_reach_mm() + 2.0, tumour.edema_reach_mm() + 2.0
    noise = {
        "core": local_noise(rng, centre, core_reach, float(np.clip(0.35 * core, 2.0, 7.0))),
        "rim_width": local_noise(rng, centre, core_reach, 4.0),
        "rim_coverage": local_noise(rng, centre, core_reach, 6.0),
        "texture": local_noise(rng, centre, core_reach, 3.0),
        "edema": local_noise(rng, centre, edema_reach, rng.uniform(6.0, 10.0)),
    }
    return replace(tumour, noise=noise)


def _draw_sizes(rng: np.random.Generator, kind: str, composition: str) -> tuple[float, float, float, float, float, str]:
    """(core radius, rim width, edema radius (mm), T1ce enhancement, rim coverage, composition).

    Rim coverage is the noise level above which the rim enhances (−inf: a closed ring).
    """
    coverage = -np.inf if rng.random() < 0.5 else rng.uniform(-1.0, 0.2)
    if kind == "small":  # metastasis-like: closed ring or solid, edema out of proportion
        core, rim, edema = rng.uniform(3.5, 6.0), rng.uniform(1.5, 3.0), rng.uniform(8.0, 26.0)
        enhancement, coverage = rng.uniform(1.25, 1.8), -np.inf
        if rng.random() < 0.3:
            composition = "no_ncr"
    else:
        core = rng.uniform(10.0, 24.0) if kind == "typical" else rng.uniform(8.0, 18.0)
        rim = rng.uniform(4.0, 9.0)
        edema = min(core * rng.uniform(1.4, 2.4), 38.0)
        enhancement = rng.uniform(1.35, 1.9) if kind == "typical" else rng.uniform(1.02, 1.15)
    return float(core), float(rim), float(edema), float(enhancement), float(coverage), composition


def evolve_tumour(tumour: Tumour, rng: np.random.Generator) -> Tumour:
    """The same tumour at a later scan: core and edema grown or shrunk a little (radius × 0.85–1.25 and × 0.85–1.3:
    progression or response), mass effect following the size, enhancement ±3 %. Place, shape, composition and noise
    fields are kept, so the follow-up is recognisably the same lesion.

    The noise fields cover the baseline's reach only; beyond it they are 0, where (for growth ≤ 1.25 and the noise
    amplitudes drawn) the level sets are already outside the lesion.
    """
    core_growth, edema_growth = rng.uniform(0.85, 1.25), rng.uniform(0.85, 1.3)
    core, edema = tumour.core_radius_mm * core_growth, tumour.edema_radius_mm * edema_growth
    size_before = tumour.core_radius_mm + 0.3 * tumour.edema_radius_mm
    size = core + 0.3 * edema
    strength = tumour.mass.strength * min(1.0, size / 25.0) / min(1.0, size_before / 25.0)
    mass = MassEffect(centre=tumour.centre, strength=float(min(strength, 0.7)), sigma_mm=size)
    enhancement = max(1.0, tumour.enhancement * float(np.exp(rng.normal(0.0, 0.03))))
    return replace(tumour, core_radius_mm=float(core), edema_radius_mm=float(edema), mass=mass,
                   enhancement=enhancement)


def grow_tumour(tumour: Tumour, q: np.ndarray, wm: np.ndarray, csf: np.ndarray, brain: np.ndarray) -> TumourMap:
    """Labels at tumour-bearing template points ``q`` ``[3, P]`` given the (mass-displaced) tissue there.

    ``wm``, ``csf`` ``[P]`` are tissue probabilities and ``brain`` ``[P]`` (bool) the brain mask at
    the displaced points. Steps: 1. ellipsoidal distance; 2. tumour core (TC) level set; 3. rim of
    varying width → ET, partly non-enhancing (→ NCR), the inside → NCR; 4. composition overrides;
    5. edema along white matter, outside CSF and the core. Connectivity is left to ``keep_connected``.
    """
    labels = np.zeros(q.shape[1], dtype=np.uint8)
    texture = np.zeros(q.shape[1], dtype=np.float32)
    # 1. ellipsoidal distance (mm)
    d = q - tumour.centre.astype(np.float32)[:, None]
    rot = tumour.rotation.astype(np.float32)
    r2 = np.zeros(q.shape[1], dtype=np.float32)
    for a in range(3):  # local axis a: (Rᵀ d)_a / axes_a, summed explicitly (no BLAS)
        local = (rot[0, a] * d[0] + rot[1, a] * d[1] + rot[2, a] * d[2]) / np.float32(tumour.axes[a])
        r2 += local * local
    r = np.sqrt(r2)
    # 2. tumour core: level set of r / R + noise, inside the brain (evaluated near the centre only)
    near = np.flatnonzero(r < tumour.core_reach_mm())
    qn, rn = q[:, near], r[near]
    f_core = rn / np.float32(tumour.core_radius_mm) + np.float32(tumour.core_noise_amp) * tumour.noise["core"](qn)
    core = (f_core < 1.0) & brain[near]
    # 3. rim: within rim width (mm) of the core boundary; partial coverage leaves non-enhancing rim
    depth = (1.0 - f_core) * np.float32(tumour.core_radius_mm)
    width = np.float32(tumour.rim_mm) * np.clip(1.0 + 0.45 * tumour.noise["rim_width"](qn), 0.3, 2.0)
    rim = core & (depth < width) & (tumour.noise["rim_coverage"](qn) > tumour.rim_coverage)
    # 4. composition: no enhancement at all, or a solid enhancing core
    core_labels = np.where(core, NCR, 0).astype(np.uint8)
    core_labels[rim & tumour.has_et] = ET
    if not tumour.has_ncr:
        core_labels[core] = ET
    labels[near] = core_labels
    texture[near] = tumour.noise["texture"](qn)
    # 5. edema: white matter pulls the level set outwards, grey matter and CSF hold it back
    f_edema = (
        r / np.float32(tumour.edema_radius_mm)
        + np.float32(tumour.edema_noise_amp) * tumour.noise["edema"](q)
        - np.float32(tumour.edema_wm_affinity) * (wm - WM_LEVEL)
    )
    edema = (f_edema < 1.0) & brain & (csf < 0.5) & (labels == 0)
    labels[edema] = ED
    texture[edema] = tumour.noise["edema"](q[:, edema])
    weight = np.where(edema, np.clip(0.45 + 2.0 * (1.0 - f_edema), 0.45, 1.0), 0.0).astype(np.float32)
    return TumourMap(labels=labels, edema_weight=weight, texture=texture)


def keep_connected(labels: np.ndarray) -> np.ndarray:
    """Labels ``[X, Y, Z]`` with every tumour component that holds no core (NCR/ET) voxel removed.

    Edema drawn along white matter can leave islands away from the tumour; real edema is one
    region around the core, so only 26-connected components that contain core voxels are kept.
    """
    components, count = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return labels
    with_core = np.unique(components[(labels == NCR) | (labels == ET)])
    keep = np.zeros(count + 1, dtype=bool)
    keep[with_core[with_core > 0]] = True
    return np.where(keep[components], labels, 0).astype(np.uint8)


def _white_matter_point(rng: np.random.Generator, anatomy: Anatomy, min_depth_mm: float) -> np.ndarray:
    """A random point (MNI mm ``[3]``) in cerebral white matter at least ``min_depth_mm`` inside the brain.

    Candidates: white matter > 0.9, above the cerebellum (z > −10 mm), off the midline (|x| > 12 mm).
    Falls back to the deepest such voxel when the tumour is too big for any candidate.
    """
    index = np.argwhere(anatomy.wm > 0.9)
    world = anatomy.index_to_world(index)
    depth = anatomy.depth[tuple(index.T)]
    cerebral = (world[:, 2] > -10.0) & (np.abs(world[:, 0]) > 12.0)
    deep = cerebral & (depth >= min_depth_mm)
    pool = np.flatnonzero(deep) if deep.any() else np.array([np.flatnonzero(cerebral)[np.argmax(depth[cerebral])]])
    point = world[pool[rng.integers(len(pool))]]
    return point + rng.uniform(-0.5, 0.5, size=3) * anatomy.resolution
