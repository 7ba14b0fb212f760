"""BraTS post-processing of a predicted label map, on the case's own grid (probability maps are left untouched):

1. **small lesions removed**: connected components (26-connectivity) of the whole tumour smaller than
   ``min_lesion_mm3`` are set to background -- the speckles a voxel classifier leaves, each of which the lesion-wise
   metrics count as a false-positive lesion;
2. **small enhancement relabelled**: when the case's whole enhancing tumour is smaller than ``min_enhancing_mm3``,
   its voxels become core (necrosis / non-enhancing tumour) -- BraTS practice, because an ET-free case scored with a
   few ET voxels gets ET Dice 0 (and a 373 mm HD95) instead of 1.

Both are volumes in mm³, so they mean the same at any voxel size; 0 turns a step off. What was done is returned
(``Postprocessed``) and recorded in ``prediction.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from medseg_diff.data.conventions import LabelConvention

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Postprocessed:
    """What post-processing did to one case."""

    min_lesion_mm3: float
    min_enhancing_mm3: float
    lesions_removed: int  # whole-tumour components removed
    voxels_removed: int
    enhancing_relabelled_voxels: int  # ET voxels turned into core (0 when ET was kept)

    def to_dict(self) -> dict:
        return asdict(self)


def postprocess(labels: np.ndarray, convention: LabelConvention, voxel_mm3: float, min_lesion_mm3: float = 0.0,
                min_enhancing_mm3: float = 0.0) -> tuple[np.ndarray, Postprocessed]:
    """``(labels after the two steps of the module docstring, what was done)``; ``labels [X, Y, Z]`` in
    ``convention``, ``voxel_mm3`` the volume of one voxel of this grid. The input array is not modified."""
    out = np.array(labels, copy=True)
    removed_lesions = removed_voxels = relabelled = 0
    if min_lesion_mm3 > 0:
        components, n = ndimage.label(out > 0, structure=_CONNECTIVITY)
        if n:
            sizes = np.bincount(components.ravel())[1:] * voxel_mm3
            small = np.flatnonzero(sizes < min_lesion_mm3) + 1
            if small.size:
                drop = np.isin(components, small)
                removed_lesions, removed_voxels = int(small.size), int(drop.sum())
                out[drop] = 0
    if min_enhancing_mm3 > 0:
        enhancing = out == convention.enhancing
        count = int(enhancing.sum())
        if 0 < count and count * voxel_mm3 < min_enhancing_mm3:
            out[enhancing] = convention.core
            relabelled = count
    return out, Postprocessed(float(min_lesion_mm3), float(min_enhancing_mm3), removed_lesions, removed_voxels,
                              relabelled)
