"""Healthy brain anatomy for the phantoms: the MNI152 (2009c) maps that nilearn ships offline.

The T1 template, grey/white-matter probability maps and the brain mask are loaded once per process
and kept at one of two working resolutions (1 mm, or 2 mm for coarse outputs). CSF is what the mask
holds beyond GM + WM (ventricles, sulci). The part of the T1 template that the three tissue classes
do not explain (deep grey nuclei, partial-volume transitions, ...) is kept as ``detail`` and added
back to every modality, so the phantoms keep the template's anatomy rather than three flat classes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: spacings (mm) at or above this use the 2 mm working template, below it the 1 mm one.
COARSE_TEMPLATE_FROM_MM = 1.5


@dataclass(frozen=True)
class Anatomy:
    """Tissue maps on the template grid, all float32 ``[X, Y, Z]`` in RAS voxel order.

    ``gm``, ``wm``, ``csf`` are probabilities (summing to ``mask`` inside the brain), ``mask`` is the
    brain mask in {0, 1}, ``detail`` the T1 template minus its tissue-class fit (about ±0.1),
    ``depth`` the distance (mm) of each voxel to the outside of the brain, ``support`` (bool) the
    mask dilated by two voxels: outside it every map interpolates to 0.
    ``affine`` maps voxel indices to MNI world millimetres (RAS).
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    detail: np.ndarray
    depth: np.ndarray
    support: np.ndarray
    affine: np.ndarray

    @property
    def resolution(self) -> float:
        """Voxel size of the template grid in mm."""
        return float(self.affine[0, 0])

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """World (RAS mm) points ``[3, ...]`` → fractional voxel indices ``[3, ...]`` (float32)."""
        res = np.float32(self.resolution)
        origin = self.affine[:3, 3].astype(np.float32).reshape((3,) + (1,) * (points.ndim - 1))
        return (points - origin) / res

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Integer voxel indices ``[N, 3]`` → world (RAS mm) points ``[N, 3]``."""
        return index * self.resolution + self.affine[:3, 3]


def template_resolution(spacing: float) -> int:
    """Working template resolution (1 or 2 mm) for an output ``spacing`` in mm."""
    return 2 if spacing >= COARSE_TEMPLATE_FROM_MM else 1


@functools.lru_cache(maxsize=2)
def load_anatomy(resolution: int) -> Anatomy:
    """The MNI152 anatomy at ``resolution`` mm (1 or 2), cached in-process.

    Steps: 1. load the 1 mm maps nilearn ships (fast: no resampling); 2. for 2 mm, average 2×2×2
    blocks (a box anti-alias filter, and much faster than nilearn's own ``resolution=2`` resampling);
    3. derive CSF, the tissue-fit residual ``detail`` and the depth map.
    """
    if resolution not in (1, 2):
        raise ValueError(f"template resolution must be 1 or 2 mm, got {resolution}")
    # 1. the 1 mm maps (nilearn imported lazily: it is slow to import and workers never need it)
    t1, gm, wm, mask, affine = _load_mni152_1mm()
    # 2. optional 2 mm block average
    if resolution == 2:
        t1, gm, wm, mask = (_block_mean(v, 2) for v in (t1, gm, wm, mask))
        affine = affine.copy()
        affine[:3, :3] *= 2
        affine[:3, 3] += 0.5  # a 2 mm voxel centre sits between two 1 mm centres
        mask = (mask >= 0.5).astype(np.float32)
    # 3. derived maps
    gm, wm, csf = _tissue_probabilities(gm, wm, mask)
    detail = _template_detail(t1, gm, wm, csf, mask)
    depth = ndimage.distance_transform_edt(mask > 0, sampling=float(resolution)).astype(np.float32)
    # C order: nibabel arrays are Fortran-ordered, which makes every later lookup ~5× slower
    maps = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in
            dict(gm=gm, wm=wm, csf=csf, mask=mask, detail=detail, depth=depth).items()}
    support = ndimage.binary_dilation(mask > 0, structure=np.ones((3, 3, 3), dtype=bool), iterations=2)
    return Anatomy(affine=affine, support=support, **maps)


def sample(volume: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``volume`` ``[X, Y, Z]`` at fractional indices ``[3, ...]`` → ``[...]``; 0 outside."""
    return ndimage.map_coordinates(volume, index, order=1, mode="constant", cval=0.0, prefilter=False)


def sample_tissue(anatomy: Anatomy, points: np.ndarray) -> dict[str, np.ndarray]:
    """Tissue maps (csf, gm, wm, detail, mask) at world points ``[3, N]`` → ``[N]`` float32 each.

    Only points whose nearest template voxel is in ``support`` are interpolated (the brain is a
    fifth of the field of view); the rest are 0. The mask is csf + gm + wm (they sum to it).
    """
    index = anatomy.world_to_index(points)
    nearest = [np.clip(np.rint(index[a]), 0, n - 1).astype(np.intp) for a, n in enumerate(anatomy.mask.shape)]
    inside = np.flatnonzero(anatomy.support[tuple(nearest)])
    index_in = index[:, inside]
    maps = {}
    for name in ("csf", "gm", "wm", "detail"):
        maps[name] = np.zeros(points.shape[1], dtype=np.float32)
        maps[name][inside] = sample(getattr(anatomy, name), index_in)
    maps["mask"] = maps["csf"] + maps["gm"] + maps["wm"]
    return maps


def _load_mni152_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t1, gm, wm, mask, affine): the nilearn MNI152 2009 maps at 1 mm, float32 ``[197, 233, 189]``."""
    from nilearn import datasets

    images = (
        datasets.load_mni152_template(resolution=1),
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
        datasets.load_mni152_brain_mask(resolution=1),
    )
    t1, gm, wm, mask = (np.asarray(im.get_fdata(dtype=np.float32), dtype=np.float32) for im in images)
    return t1, gm, wm, (mask > 0.5).astype(np.float32), np.asarray(images[0].affine, dtype=np.float64)


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``³ blocks of ``volume`` ``[X, Y, Z]`` (zero-padded up to a multiple)."""
    pad = [(0, (-n) % factor) for n in volume.shape]
    v = np.pad(volume, pad)
    x, y, z = (n // factor for n in v.shape)
    return v.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5), dtype=np.float32)


def _tissue_probabilities(gm: np.ndarray, wm: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """(gm, wm, csf) inside ``mask``, with csf = mask − gm − wm clipped to [0, 1]."""
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    csf = np.clip(mask - gm - wm, 0, 1)
    return gm.astype(np.float32), wm.astype(np.float32), csf.astype(np.float32)


def _template_detail(t1, gm, wm, csf, mask) -> np.ndarray:
    """T1 template minus its least-squares fit by the three tissue maps, inside the mask ``[X, Y, Z]``.

    Normal equations summed by numpy (pairwise, no BLAS) so the fit is bit-identical in any process.
    """
    inside = mask > 0.5
    design = [v[inside].astype(np.float64) for v in (csf, gm, wm)]
    target = t1[inside].astype(np.float64)
    gram = np.array([[np.sum(a * b) for b in design] for a in design])
    coef = np.linalg.solve(gram, np.array([np.sum(a * target) for a in design]))
    fit = coef[0] * csf + coef[1] * gm + coef[2] * wm
    return ((t1 - fit) * mask).astype(np.float32)
