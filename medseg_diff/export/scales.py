"""The colour scales of the heat maps, shared by the PNG montage (``export.montage``) and the report's interactive
viewer (``export.overlays.viewer_html`` gives ``export.viewer`` the same ranges).

Entropy and variance: fixed, absolute scales (one scale for every model and case, values above the top marked in
``OVER_RGB``). Attention: a multiple of the brain's average, coloured inside the brain above 1x on the fixed scale
1x to ``ATTENTION_SCALE_TOP``.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib
import numpy as np

from medseg_diff.export.types import ATTENTION_SCALE_TOP, ENTROPY_SCALE_TOP, VARIANCE_SCALE_TOP
from medseg_diff.predictions.types import CaseOverlay

#: colour of heat-map values above the top of a fixed scale (the colour bar's top reads "≥ top"): Okabe-Ito
#: orange, used for nothing else (white would be lost on bright FLAIR tumour)
OVER_RGB = (230 / 255, 159 / 255, 0.0)
_ALPHA_RAMP = 0.3  # heat-map opacity rises from 0 at the bottom of its scale to its maximum at 30 % of it


@dataclass(frozen=True)
class HeatScale:
    """How a heat map's values become colours: ``cmap`` over [low, top]; values at or below ``low`` and outside
    the brain are transparent; with ``over_range``, values above ``top`` are drawn in ``OVER_RGB``."""

    low: float
    top: float
    cmap: str
    label: str  # colour-bar label
    max_alpha: float
    over_range: bool  # values can exceed ``top``: the colour bar's top reads "≥ top"
    over_colour: bool = True  # ... and they are drawn in ``OVER_RGB`` (else in the colour map's top colour)


def heat_scale(overlay: CaseOverlay, kind: str, name: str | None = None) -> HeatScale:
    """The colour scale of a heat-map row. Entropy and variance: fixed and absolute, the same for every model and
    case (0 to ``ENTROPY_SCALE_TOP`` / ``VARIANCE_SCALE_TOP``, values above drawn in ``OVER_RGB``). Attention:
    multiples of the brain's average, 1 to ``ATTENTION_SCALE_TOP`` (fixed; values above in the top colour);
    voxels at or below the average are not coloured."""
    if kind == "attention":
        return HeatScale(1.0, ATTENTION_SCALE_TOP, "inferno",
                         "attention, \u00d7 the brain's average;\ncoloured above average", 0.6, True, False)
    if kind == "uncertainty":
        units = overlay.uncertainty_units
        return HeatScale(0.0, ENTROPY_SCALE_TOP[units], "viridis", f"predictive entropy ({units})", 0.8, True)
    if kind == "variance":
        return HeatScale(0.0, VARIANCE_SCALE_TOP, "viridis", "variance across members", 0.8, True)
    raise ValueError(f"no heat scale for row kind {kind!r}")


def heat_rgba(values: np.ndarray, scale: HeatScale, brain: np.ndarray | None = None) -> np.ndarray:
    """``[..., 4]`` colours of ``values`` on ``scale``: transparent at or below ``scale.low`` and outside
    ``brain``; opacity rising to ``scale.max_alpha`` over the first 30 % of the scale; above ``scale.top``
    (with ``over_range``) ``OVER_RGB`` at full ``max_alpha``."""
    values = np.asarray(values, dtype=np.float32)
    fraction = (values - scale.low) / max(scale.top - scale.low, 1e-12)
    rgba = matplotlib.colormaps[scale.cmap](np.clip(fraction, 0.0, 1.0))
    alpha = scale.max_alpha * np.clip(fraction / _ALPHA_RAMP, 0.0, 1.0)
    if scale.over_range and scale.over_colour:
        over = values > scale.top
        rgba[over, :3] = OVER_RGB
        alpha[over] = scale.max_alpha
    alpha[values <= scale.low] = 0.0
    if brain is not None:
        alpha[~np.asarray(brain, dtype=bool)] = 0.0
    rgba[..., 3] = alpha
    return rgba


def colour_bar_ticks(scale: HeatScale) -> tuple[list[float], list[str]]:
    """Tick values and labels of a heat scale's colour bar; an over-range top reads "≥ top"."""
    values = [scale.low, (scale.low + scale.top) / 2, scale.top]
    labels = [f"{v:.2g}" for v in values]
    if scale.over_range:
        labels[-1] = f"\u2265 {scale.top:.2g}"
    return values, labels
