"""MR contrasts of the four BraTS modalities, and the scanner artefacts laid over them.

Signal = tissue mixture (CSF/GM/WM probabilities × per-tissue means) + template detail, replaced by
tumour signal where the labels say so; then per-modality bias field, partial-volume blur, per-case
scale and Rician noise; finally skull-stripped like BraTS (exactly 0 outside the brain mask).

Tissue means (arbitrary units, white matter ≈ 700–950) follow the usual appearance:
T1: WM > GM > CSF, tumour hypointense, ET slightly hypo; T1ce: as T1 with a bright enhancing rim;
T2: CSF brightest, NCR very bright, edema bright, WM < GM; FLAIR: CSF suppressed, edema bright,
NCR intermediate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg_diff.data.conventions import MODALITIES
from medseg_diff.data.synth.fields import cosine_field, random_cosine_coefficients
from medseg_diff.data.synth.tumour import ED, ET, NCR, TumourMap

#: tissue order of the signal table
TISSUES: tuple[str, ...] = ("csf", "gm", "wm", "ed", "ncr", "et")
#: mean signal of each tissue per modality; T1ce ET is white matter × the tumour's enhancement
SIGNAL: dict[str, tuple[float, ...]] = {
    "t1": (330.0, 640.0, 900.0, 600.0, 380.0, 680.0),
    "t1ce": (360.0, 680.0, 940.0, 630.0, 400.0, float("nan")),
    "t2": (2100.0, 1080.0, 760.0, 1600.0, 1950.0, 1150.0),
    "flair": (230.0, 880.0, 660.0, 1450.0, 850.0, 1150.0),
}
#: gain applied to the template detail (T1 template units ≈ 0–1); negative where contrast inverts
DETAIL_GAIN: dict[str, float] = {"t1": 900.0, "t1ce": 900.0, "t2": -900.0, "flair": -500.0}
#: relative texture (heterogeneity) of each tumour label
TEXTURE: dict[int, float] = {NCR: 0.12, ED: 0.10, ET: 0.10}


@dataclass(frozen=True)
class Tissue:
    """Healthy tissue of a case on the output grid, float32 ``[X, Y, Z]`` each; ``brain`` bool."""

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    detail: np.ndarray
    brain: np.ndarray

    @functools.cached_property
    def brain_index(self) -> np.ndarray:
        """Flat indices of the brain voxels ``[B]``."""
        return np.flatnonzero(self.brain)


@dataclass(frozen=True)
class Appearance:
    """Per-case, per-modality contrast and artefact draws (independent of the output spacing).

    ``signal[m]`` ``[6]`` tissue means (TISSUES order), ``bias[m]`` ``[K, K, K]`` log-bias cosine
    coefficients, ``blur_mm`` the partial-volume blur (Gaussian sigma), ``scale[m]`` the global
    intensity scale, ``noise[m]`` the Rician sigma relative to white matter.
    """

    signal: dict[str, np.ndarray]
    bias: dict[str, np.ndarray]
    blur_mm: float
    scale: dict[str, float]
    noise: dict[str, float]


def draw_appearance(rng: np.random.Generator, enhancement: float) -> Appearance:
    """Random contrasts (each tissue mean ±5 %), bias fields (±~12 %), blur, scale and noise level."""
    signal, bias, scale, noise = {}, {}, {}, {}
    for m in MODALITIES:
        means = np.array(SIGNAL[m]) * np.exp(rng.normal(0.0, 0.05, size=len(TISSUES)))
        if m == "t1ce":
            means[TISSUES.index("et")] = means[TISSUES.index("wm")] * enhancement
        signal[m] = means
        bias[m] = random_cosine_coefficients(rng, 3, rng.uniform(0.05, 0.15), with_mean=False)
        scale[m] = float(np.exp(rng.normal(0.0, 0.2)))
        noise[m] = float(rng.uniform(0.015, 0.045))
    return Appearance(signal=signal, bias=bias, blur_mm=float(rng.uniform(0.5, 1.0)), scale=scale, noise=noise)


def render_modality(
    modality: str, tissue: Tissue, where: np.ndarray, tumour: TumourMap, look: Appearance,
    spacing: float, rng: np.random.Generator,
) -> np.ndarray:
    """One modality as int16 ``[X, Y, Z]``: 0 outside the brain, ≥ 1 inside.

    ``where`` ``[P]`` are the flat indices of the points ``tumour`` describes. Steps: 1. healthy
    tissue mixture + detail; 2. tumour signal; 3. bias field; 4. partial-volume blur;
    5. global scale and Rician noise; 6. skull-strip and quantise.
    """
    mu = dict(zip(TISSUES, look.signal[modality].astype(np.float32)))
    # 1. healthy tissue
    image = tissue.csf * mu["csf"] + tissue.gm * mu["gm"] + tissue.wm * mu["wm"]
    image += np.float32(DETAIL_GAIN[modality]) * tissue.detail
    # 2. tumour: edema blends into the tissue, NCR and ET replace it
    flat = image.reshape(-1)
    _paint_tumour(flat, where, tumour, mu)
    # 3. multiplicative bias field
    image *= np.exp(cosine_field(look.bias[modality], image.shape))
    # 4. partial-volume blur
    image = ndimage.gaussian_filter(image, sigma=look.blur_mm / spacing, mode="constant", truncate=3.0)
    # 5. scale and Rician noise (magnitude of a complex signal with Gaussian noise on both
    #    channels), drawn only inside the brain: everything outside is stripped in step 6
    inside = tissue.brain_index
    signal = image.reshape(-1)[inside] * np.float32(look.scale[modality])
    sigma = np.float32(look.noise[modality] * mu["wm"] * look.scale[modality])
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    signal = np.sqrt(real * real + imag * imag)
    # 6. skull-strip (BraTS background is exactly 0) and quantise
    out = np.zeros(image.shape, dtype=np.int16)
    out.reshape(-1)[inside] = np.clip(np.rint(signal), 1, np.iinfo(np.int16).max).astype(np.int16)
    return out


def _paint_tumour(flat: np.ndarray, where: np.ndarray, tumour: TumourMap, mu: dict[str, np.float32]) -> None:
    """Write tumour signal into ``flat`` ``[X·Y·Z]`` (in place) at the flat indices ``where`` ``[P]``."""
    labels, texture = tumour.labels, tumour.texture
    for label, name in ((NCR, "ncr"), (ET, "et")):
        sel = labels == label
        flat[where[sel]] = mu[name] * (1.0 + np.float32(TEXTURE[label]) * texture[sel])
    sel = labels == ED
    weight = tumour.edema_weight[sel]
    edema = mu["ed"] * (1.0 + np.float32(TEXTURE[ED]) * texture[sel])
    flat[where[sel]] = flat[where[sel]] * (1.0 - weight) + edema * weight
