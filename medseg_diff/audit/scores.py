"""Scores of what a map looks at, shared by the mechanism audit and the study (benchmarks/study.py).

All inputs are numpy arrays on one grid ``[X, Y, Z]``: an attention (or saliency) map, a boolean target region
(e.g. the truth's whole tumour dilated by 3 voxels, :func:`dilated`) and a boolean head mask (the voxels the
"average" is taken over).

* :func:`enrichment` -- mean of the map inside ``region & head`` divided by its mean over ``head``: 1 = no
  preference, 3 = the region gets three times the head's average.
* :func:`pointing_game` -- whether the map's maximum within the head lies inside the region (Zhang et al.,
  "Top-down neural attention by excitation backprop", 2016/2018).
* :func:`normalised_entropy` -- entropy of attention weights over ``M`` tokens divided by ``log M``: 1 = uniform
  (a global average pool), 0 = all weight on one token.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation, generate_binary_structure


def dilated(mask: np.ndarray, voxels: int) -> np.ndarray:
    """``mask`` (bool) dilated by ``voxels`` steps of the 26-connected neighbourhood (a cube of side
    ``2 voxels + 1``); an empty mask stays empty."""
    mask = np.asarray(mask, dtype=bool)
    if voxels <= 0 or not mask.any():
        return mask
    return binary_dilation(mask, structure=generate_binary_structure(3, 3), iterations=voxels)


def _checked(attention: np.ndarray, region: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    attention = np.asarray(attention, dtype=np.float64)
    region, head = np.asarray(region, dtype=bool), np.asarray(head, dtype=bool)
    if not attention.shape == region.shape == head.shape:
        raise ValueError(f"map {attention.shape}, region {region.shape} and head {head.shape} must share one grid")
    if not np.isfinite(attention[head]).all():
        raise ValueError("the map holds NaN or Inf inside the head")
    return attention, region & head, head


def enrichment(attention: np.ndarray, region: np.ndarray, head: np.ndarray) -> float:
    """Mean of ``attention`` in ``region & head`` over its mean in ``head``; NaN when either is empty or the
    head's mean is not positive."""
    attention, inside, head = _checked(attention, region, head)
    if not inside.any() or not head.any():
        return float("nan")
    average = attention[head].mean()
    return float(attention[inside].mean() / average) if average > 0 else float("nan")


def pointing_game(attention: np.ndarray, region: np.ndarray, head: np.ndarray) -> bool:
    """True when the map's maximum over the head lies in ``region`` (ties: any maximal voxel counts)."""
    attention, inside, head = _checked(attention, region, head)
    if not head.any():
        raise ValueError("empty head mask")
    peak = attention[head].max()
    return bool((attention[inside] >= peak).any()) if inside.any() else False


def normalised_entropy(weights: np.ndarray, axis: int = -1) -> float:
    """Mean over all other axes of ``H(w) / log M`` for weights ``w`` that sum to 1 along ``axis`` (M entries)."""
    w = np.asarray(weights, dtype=np.float64)
    m = w.shape[axis]
    if m < 2:
        return 0.0
    w = np.clip(w, 1e-12, 1.0)
    return float((-(w * np.log(w)).sum(axis=axis) / np.log(m)).mean())
