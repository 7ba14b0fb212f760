"""MONAI dictionary transforms: training, validation and (invertible) inference pipelines.

Keys: ``IMAGE`` (4 modalities, canonical order), ``LABEL`` (BraTS labels → [TC, WT, ET] regions),
``PRIOR`` (optional external mask prior → [TC, WT, ET] probabilities). One random draw is shared by
every key (MONAI dictionary transforms do this), so image, label and prior stay aligned.

Training augmentation after the crops is a preset (``train_transforms(augment=...)``, ``data.augment``): ``none``,
``light`` (flips, intensity scale/shift: what training always did) or ``brats`` (nnU-Net-like: affine, noise, blur,
contrast, gamma, bias field, simulated low resolution).

Inference pipelines are invertible: ``invert_prediction`` puts a prediction made on the transformed
grid back on the input file's exact grid (shape and affine), RAS and LPS inputs alike.

Air outside the head: ``SuppressBackgroundd`` (right after loading, on the file's grid, in the training and
the evaluation pipeline alike) removes a constant background offset per modality and zeroes noisy air, so
that the foreground crop is the head's box and normalisation statistics come from the head only; see
``head_mask`` for the exact definition. It changes intensities only, so it needs no inverse.

Intensities of any sign and type: the background is the dominant intensity of the volume's border, whatever its
sign (``background_level``), or for noisy air whose values go below 0 the channel's minimum (a magnitude image
is >= 0, so negative values mean the data were shifted: signed storage, z-scoring). It becomes exactly 0 and the
head is what differs from it, so a z-scored copy, a copy shifted by -10000 and a copy rescaled to int8 (-128 ...
127) of a case are preprocessed as the case itself -- ``NormalizeIntensityd(nonzero=True)`` then takes its
statistics over the same head voxels, which makes the result invariant to ``x -> a x + b`` (a > 0), up to the
rounding of the stored values. A background that is already 0 (BraTS) is left exactly as it is.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from monai.transforms import (
    BorderPadd,
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    SpatialPadd,
    Spacingd,
)

from medseg_diff.data.check import background_level
from medseg_diff.data.conventions import MODALITIES, MSD_CHANNEL_ORDER, LabelConvention
from medseg_diff.data.io import MedsegReader

IMAGE, LABEL, PRIOR, PRED = "image", "label", "prior", "pred"
#: Key under which ``eval_transforms(head_mask_key=HEAD)`` keeps the head mask on the input file's grid.
HEAD = "head"

#: Relative tolerance of a constant background (of the volume's max - min); passed to ``background_level``,
#: and voxels within it of the offset become exactly 0 when the offset is removed.
OFFSET_REL_TOL = 1e-4
#: Noisy air: threshold = this many times the air level, the 25th percentile of the (offset-free) border
#: shell (robust to head touching up to 3/4 of the border). For Rician (Rayleigh) air noise of scale σ that
#: percentile is 0.76σ, so the threshold is 9.1σ: not one of the ~10⁷ air voxels of a 240x240x155 volume
#: exceeds it by chance.
HEAD_NOISE_FACTOR = 12.0
#: ... kept within these fractions of the head's 99th percentile (of the channel's voxels above 4.5 × the air
#: level, i.e. without the air): the upper bound for a head that fills most of the border (whose 25th
#: percentile is then tissue, not air).
HEAD_MIN_FRACTION = 0.01
HEAD_MAX_FRACTION = 0.25
#: A channel that is exactly 0 (or below) in at least this fraction of its voxels has a clean background even
#: when the head touches most of the border: a skull-stripped brain leaves ~40% of even its own bounding box
#: at 0, whereas noisy air is almost never exactly 0.
HEAD_CLEAN_ZEROS = 0.2
#: With a threshold > 0, pieces of the mask smaller than this fraction of its largest piece are air
#: (isolated noise voxels above the threshold), not head.
HEAD_MIN_PIECE = 1e-3


class ReorderMSDChannelsd(MapTransform):
    """MSD Task01 4D images hold (FLAIR, T1w, t1gd, T2w); reorder channels to MODALITIES."""

    def __init__(self, keys=(IMAGE,), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.index = [MSD_CHANNEL_ORDER.index(m) for m in MODALITIES]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key][self.index]
        return d


class LabelsToRegionsd(MapTransform):
    """BraTS labels ``[1, X, Y, Z]`` → float regions ``[3, X, Y, Z]`` (TC, WT, ET) per the convention.

    Array maths lives in ``LabelConvention.to_regions``; this wrapper loops over keys and keeps the
    MetaTensor's metadata. Inputs that already have 3 channels are taken as region probabilities.
    For ``outline_keys`` (an external prior), a 1-channel map is a BraTS label map when its file is a
    segmentation (``*_seg.nii.gz`` / ``*-seg.nii.gz``, e.g. a prediction folder of the baseline) or when it
    holds values above 1; otherwise (values in [0, 1]) it is a rough tumour outline and becomes the WT
    channel, TC and ET zero.
    """

    def __init__(self, keys, convention: LabelConvention, outline_keys=(), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.convention = convention
        self.outline_keys = set(outline_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if x.shape[0] == 3:
                continue
            if x.shape[0] != 1:
                raise ValueError(f"'{key}' must have 1 channel (labels) or 3 (TC, WT, ET), got {x.shape[0]}")
            arr = np.asarray(x[0], dtype=np.float32)
            if key in self.outline_keys and not _is_segmentation_file(x) and float(arr.max(initial=0.0)) <= 1.0:
                zeros = np.zeros_like(arr)
                regions = np.stack([zeros, np.clip(arr, 0.0, 1.0), zeros])
            else:
                regions = self.convention.to_regions(np.rint(arr).astype(np.int64)).astype(np.float32)
            d[key] = _with_meta(torch.as_tensor(regions), x) if hasattr(x, "meta") else torch.as_tensor(regions)
        return d


#: A constant background covers at least this fraction of the border shell (the rest may be head touching it).
BACKGROUND_MIN_FRACTION = 0.5


def noise_floor(channel: np.ndarray) -> float | None:
    """The level to subtract from a channel whose air is **noisy** and that holds values below 0: its minimum.
    None when every value is >= 0 (the floor is 0, as for any magnitude image) or the background is clean (at least
    ``BACKGROUND_MIN_FRACTION`` of the border, or ``HEAD_CLEAN_ZEROS`` of the channel, exactly 0: a few negative
    voxels inside a skull-stripped brain, e.g. from interpolation, do not move a zero background).

    Rician/Rayleigh air noise of a magnitude image lies above 0 and its minimum over the thousands of air voxels is
    within a few percent of σ of 0; negative values under noisy air therefore mean the data were shifted (signed
    storage, z-scoring) and the minimum is where 0 was. Offsets > 0 under noisy air are left alone: a smooth bias
    field in the air looks the same, and ``head_threshold`` already measures the air level above 0.
    """
    channel = np.asarray(channel)
    finite = channel if np.all(np.isfinite(channel)) else channel[np.isfinite(channel)]
    if finite.size == 0:
        return None
    low = float(np.min(finite))
    if not low < 0:
        return None
    if np.count_nonzero(finite == 0) >= HEAD_CLEAN_ZEROS * finite.size:
        return None
    border = _border_values(channel)
    span = float(np.max(finite)) - low
    if border.size and float(np.mean(np.abs(border) <= OFFSET_REL_TOL * span)) >= BACKGROUND_MIN_FRACTION:
        return None
    return low


def remove_background_offset(channel: np.ndarray) -> tuple[np.ndarray, float | None]:
    """``(channel without its background, offset)``; ``(channel, None)`` unchanged when the background is 0
    (BraTS: the background is exactly 0; noisy air above 0).

    The offset is the constant background of either sign (``background_level``: a TCGA FLAIR's 0.0219, a z-scored
    volume's -0.8, an int8 volume's -128, a volume shifted by -10000) or, for noisy air that goes below 0, the
    channel's minimum (``noise_floor``). ``value - offset`` where that is above ``OFFSET_REL_TOL`` × (max - min of
    the channel), else exactly 0 (so a near-constant background and everything below it become 0). NaN/Inf stay as
    they are (reported later).
    """
    channel = np.asarray(channel)
    offset = background_level(channel, rel_tol=OFFSET_REL_TOL)
    if offset is None:
        offset = noise_floor(channel)
    if offset is None:
        return channel, None
    finite = np.isfinite(channel)
    values = channel[finite] if not finite.all() else channel
    tol = OFFSET_REL_TOL * (float(values.max()) - float(values.min()))
    shifted = channel.astype(np.float32, copy=True) - np.float32(offset)
    shifted[shifted <= tol] = 0.0  # NaN compares False: kept
    return shifted, offset


def _border_values(volume: np.ndarray) -> np.ndarray:
    """The voxels of the border shell (as ``background_offset``: 2% of the smallest side thick, at least 1)."""
    w = max(1, int(round(0.02 * min(volume.shape))))
    w = max(1, min(w, min(volume.shape) // 2))
    faces = [volume[:w], volume[-w:], volume[w:-w, :w], volume[w:-w, -w:], volume[w:-w, w:-w, :w],
             volume[w:-w, w:-w, -w:]]
    values = np.concatenate([f.ravel() for f in faces])
    return values[np.isfinite(values)]


def head_threshold(channel: np.ndarray) -> float:
    """Intensity above which a voxel of an offset-free ``channel`` is head rather than air.

    0 when the background is clean, i.e. the air level (25th percentile of the border shell) is 0 -- at least a
    quarter of the border is exactly 0 -- or at least ``HEAD_CLEAN_ZEROS`` of the channel is <= 0 (skull-stripped
    BraTS, tightly cropped or not, or a removed constant offset); then the head is exactly ``channel > 0``, as
    before. Otherwise (noisy air, a bias field in the air) ``HEAD_NOISE_FACTOR``
    × the air level, kept within [``HEAD_MIN_FRACTION``, ``HEAD_MAX_FRACTION``] × the 99th percentile of the
    channel's voxels above 4.5 × the air level.
    """
    channel = np.asarray(channel)
    border = _border_values(channel)
    air = float(np.percentile(border, 25)) if border.size else 0.0
    if not air > 0 or np.count_nonzero(channel <= 0) >= HEAD_CLEAN_ZEROS * channel.size:
        return 0.0
    above = channel[channel > 4.5 * air]
    if above.size == 0:
        above = channel[channel > 0]
    p99 = float(np.percentile(above, 99))
    return float(np.clip(HEAD_NOISE_FACTOR * air, HEAD_MIN_FRACTION * p99, HEAD_MAX_FRACTION * p99))


def head_mask(channels: np.ndarray, thresholds: Sequence[float] | None = None,
              fill: bool = True) -> np.ndarray:
    """``[X, Y, Z]`` bool: the head of offset-free ``channels [C, X, Y, Z]`` (``remove_background_offset``).

    A voxel is head when **any** channel exceeds its ``head_threshold`` (``thresholds``, computed when not
    given): ``> 0`` for a clean background, so for skull-stripped BraTS this is exactly "any modality > 0"
    (plus filled cavities). When some threshold is > 0 (noisy air), pieces smaller than ``HEAD_MIN_PIECE`` of
    the largest (26-connected) are dropped as noise. Cavities the head encloses are filled (``fill``): a dark
    ventricle or resection cavity is not air.
    """
    if thresholds is None:
        thresholds = [head_threshold(c) for c in channels]
    mask = np.zeros(channels.shape[1:], dtype=bool)
    for c, t in zip(channels, thresholds):
        mask |= c > t
    if any(t > 0 for t in thresholds) and mask.any():
        pieces, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        if n > 1:
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            keep = sizes >= HEAD_MIN_PIECE * sizes.max()
            keep[0] = False
            mask = keep[pieces]
    if fill and mask.any():
        mask = ndimage.binary_fill_holes(mask)
    return mask


class SuppressBackgroundd(MapTransform):
    """Air outside the head becomes background (0), per image key ``[C, X, Y, Z]``:

    1. per channel, a constant background offset is removed (``remove_background_offset``);
    2. channels whose air is not clean (``head_threshold`` > 0: noise, a bias field) are set to 0 outside
       ``head_mask``; clean channels (BraTS) are left exactly as they are.

    Afterwards "any channel > 0" — what ``CropForegroundd`` crops to and ``NormalizeIntensityd(nonzero=True)``
    takes its statistics from — is the head (without its filled cavities), never the whole frame. A case with
    neither offset nor noisy air passes through untouched. Intensities only: not invertible and needing no
    inverse (``invert_prediction`` undoes the geometric steps). With ``mask_key``, the ``head_mask`` (on this
    grid, i.e. the input file's when the transform runs before any geometric step) is kept under that key.
    """

    def __init__(self, keys=(IMAGE,), mask_key: str | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            removed = [remove_background_offset(c) for c in arr]
            channels = [c for c, _ in removed]
            thresholds = [head_threshold(c) for c in channels]
            noisy = [c for c, t in enumerate(thresholds) if t > 0]
            changed = bool(noisy) or any(offset is not None for _, offset in removed)
            mask = None
            if noisy or self.mask_key is not None:
                mask = head_mask(np.stack(channels), thresholds)
            if changed:
                dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32
                stacked = np.stack(channels).astype(dtype, copy=False)
                for c in noisy:
                    stacked[c][~mask & np.isfinite(stacked[c])] = 0  # NaN/Inf stay, to be reported
                out = torch.as_tensor(stacked)
                d[key] = _with_meta(out, x) if hasattr(x, "meta") else out
            if self.mask_key is not None:
                d[self.mask_key] = mask
        return d


def _is_segmentation_file(x) -> bool:
    """True when the MetaTensor was loaded from a BraTS-style segmentation file (``*_seg`` / ``*-seg``)."""
    name = str(getattr(x, "meta", {}).get("filename_or_obj", "")).lower()
    stem = name.split("/")[-1].removesuffix(".gz").removesuffix(".nii")
    return stem.endswith(("_seg", "-seg"))


def _with_meta(tensor: torch.Tensor, like) -> torch.Tensor:
    from monai.data import MetaTensor

    return MetaTensor(tensor, meta=dict(like.meta), applied_operations=list(like.applied_operations))


def load_transforms(keys: Sequence[str], convention: LabelConvention) -> list:
    """Load + channel-first (+ MSD channel reorder) for ``keys``."""
    steps = [
        LoadImaged(keys=keys, reader=MedsegReader(), image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(keys=keys, allow_missing_keys=True),
    ]
    if convention.name == "msd":
        steps.append(ReorderMSDChannelsd(keys=(IMAGE,)))
    return steps


def _geometry(keys: Sequence[str], spacing: Sequence[float] | None, modes: Sequence[str]) -> list:
    """RAS orientation and (optional) resampling to ``spacing`` mm."""
    steps = [Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True)]
    if spacing is not None:
        steps.append(Spacingd(keys=keys, pixdim=tuple(spacing), mode=tuple(modes), allow_missing_keys=True))
    return steps


#: ``data.augment`` presets (config.py, configs/base.yaml): what ``train_transforms`` does after the crops.
AUGMENT_PRESETS = ("none", "light", "brats")

#: ``brats``: the spatial transform, after nnU-Net (v1 ``default_3D_augmentation_params`` and
#: ``get_moreDA_augmentation``; v2 ``nnUNetTrainer.get_training_transforms`` keeps the probabilities): a rotation of
#: up to ±30° about each axis and an isotropic-range scale in [0.85, 1.25] (MONAI draws it per axis), trilinear for
#: the image and the prior, nearest for the label. nnU-Net draws rotation and scaling with 0.2 each; one
#: ``RandAffined`` applies both with 0.2 (one resampling, not two).
AFFINE_PROB = 0.2
AFFINE_ROTATE = np.pi / 6
AFFINE_SCALE = (0.85, 1.25)


def affine_context(roi_size: Sequence[int]) -> tuple[int, ...]:
    """Voxels of context added on each side of a crop before the ``brats`` affine, so that a crop rotated by up to
    ``AFFINE_ROTATE`` about one axis and zoomed out by ``AFFINE_SCALE[1]`` samples image, not padding (nnU-Net crops
    a larger patch for its spatial transform the same way): ``ceil(side x (s (cos a + sin a) - 1) / 2)``, 12 for a
    32-voxel side, 34 for 96. Rotations about several axes at once can still reach the zero padding at the corners."""
    grow = AFFINE_SCALE[1] * (np.cos(AFFINE_ROTATE) + np.sin(AFFINE_ROTATE)) - 1.0
    return tuple(int(np.ceil(side * grow / 2)) for side in roi_size)


class _Uncached:
    """Runs ``transform`` but is no MONAI ``Transform``: ``CacheDataset`` and ``PersistentDataset`` cache a pipeline
    up to the first random step **or** the first step that is not a ``Transform``, so what this wraps runs on every
    draw and the cache holds the same volumes whichever ``data.augment`` preset built the pipeline (a disk cache
    written by a ``light`` run stays valid for a ``brats`` run, and the padded volume costs no cache memory)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, data):
        return self.transform(data)


#: ``augment: brats`` scales contrast per channel (``RandScaleIntensityFixedMeand(channel_wise=True)``), which
#: MONAI has from 1.6; the rest of the package works with MONAI 1.4 (pyproject's floor, ``make test-floors``).
BRATS_MIN_MONAI = "1.6"


def _need_monai_for_brats() -> None:
    """``augment: brats`` on a MONAI older than ``BRATS_MIN_MONAI``: a ConfigError naming the key, before any work."""
    import monai
    from monai.utils import version_leq

    if not version_leq(BRATS_MIN_MONAI, monai.__version__):
        from medseg_diff.errors import ConfigError

        raise ConfigError("data.augment", f"'brats' needs MONAI >= {BRATS_MIN_MONAI} (per-channel contrast), this "
                                          f"environment has {monai.__version__}: pip install 'monai>="
                                          f"{BRATS_MIN_MONAI}', or use augment: light")


def train_transforms(
    convention: LabelConvention,
    spacing: Sequence[float] | None,
    roi_size: Sequence[int],
    num_samples: int = 2,
    pos_neg: tuple[float, float] = (1.0, 1.0),
    flip_prob: float = 0.5,
    intensity_prob: float = 1.0,
    augment: str = "light",
) -> Compose:
    """Load → regions → air to 0 (``SuppressBackgroundd``) → RAS → spacing → foreground crop → normalise →
    pos/neg crops → augmentation (``augment``). Images are preprocessed exactly as by ``eval_transforms``.

    ``augment`` (``data.augment``, one of ``AUGMENT_PRESETS``):

    * ``none``: the crops only (no flip, intensities exactly those ``eval_transforms`` gives);
    * ``light`` (what training always did before the presets existed; the same steps, so the same draws for a
      seed): flips along each axis (``flip_prob``), intensity scale ×(1 ± 0.1) and shift ± 0.1 (``intensity_prob``);
    * ``brats``: nnU-Net's recipe in MONAI steps: the crops taken with ``affine_context`` voxels of context, the
      affine (``AFFINE_PROB``), the centre crop back to ``roi_size``, then ``light``, then (probabilities per crop,
      nnU-Net's) multiplicative brightness ×[0.75, 1.25] 0.15, a bias field 0.1 (MONAI's default; not in nnU-Net),
      Gaussian noise 0.1, Gaussian blur σ ∈ [0.5, 1] 0.2, contrast ×[0.75, 1.25] about the mean 0.15, simulated low
      resolution ×[0.5, 1] 0.25, inverted gamma [0.7, 1.5] 0.1, gamma [0.7, 1.5] 0.3 (both keep mean and sd).

    Keys: the image, the label and, when the record has one, the prior (``PRIOR``: a 1-channel outline or label
    map, made regions here as ``eval_transforms`` does); spatial steps move all of them with one random draw
    (MONAI dictionary transforms), the label by nearest neighbour, the prior (probabilities) trilinearly as
    ``eval_transforms`` resamples it. Intensity steps touch the image only.
    """
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENT_PRESETS)}, got {augment!r}")
    if augment == "brats":
        _need_monai_for_brats()
    keys = [IMAGE, LABEL, PRIOR]
    modes = ("bilinear", "nearest", "bilinear")
    opt = dict(allow_missing_keys=True)
    context = affine_context(roi_size) if augment == "brats" else (0,) * len(roi_size)
    crop_size = tuple(side + 2 * c for side, c in zip(roi_size, context))
    steps = (
        load_transforms(keys, convention)
        + [LabelsToRegionsd(keys=[LABEL, PRIOR], convention=convention, outline_keys=(PRIOR,), **opt),
           SuppressBackgroundd(keys=IMAGE)]
        + _geometry(keys, spacing, modes)
        + [
            CropForegroundd(keys=keys, source_key=IMAGE, allow_smaller=True, **opt),
            NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True),
            SpatialPadd(keys=keys, spatial_size=tuple(roi_size), **opt),
        ]
    )
    if augment == "brats":
        # context on every side, so that a crop centred anywhere the roi_size crop could be centred fits
        steps.append(_Uncached(BorderPadd(keys=keys, spatial_border=[c for c in context for _ in "lr"], **opt)))
    steps.append(RandCropByPosNegLabeld(
        keys=keys, label_key=LABEL, spatial_size=crop_size, pos=pos_neg[0], neg=pos_neg[1],
        num_samples=num_samples, image_key=IMAGE, image_threshold=0.0, **opt,
    ))
    if augment == "brats":
        low, high = AFFINE_SCALE
        steps += [
            RandAffined(keys=keys, prob=AFFINE_PROB, rotate_range=(AFFINE_ROTATE,) * 3,
                        scale_range=((low - 1.0, high - 1.0),) * 3, mode=modes, padding_mode="zeros", **opt),
            CenterSpatialCropd(keys=keys, roi_size=tuple(roi_size), **opt),
        ]
    if augment in ("light", "brats"):
        steps += [
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=0, **opt),
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1, **opt),
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=2, **opt),
            RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=intensity_prob),
            RandShiftIntensityd(keys=IMAGE, offsets=0.1, prob=intensity_prob),
        ]
    if augment == "brats":
        # nnU-Net's intensity steps and probabilities (get_moreDA_augmentation / get_training_transforms): noise with
        # variance in [0, 0.1] (MONAI: sd in [0, sqrt(0.1)]), per-channel choices there are whole-image ones here
        steps += [
            RandScaleIntensityd(keys=IMAGE, factors=0.25, prob=0.15),
            RandBiasFieldd(keys=IMAGE, degree=3, coeff_range=(0.0, 0.1), prob=0.1),
            RandGaussianNoised(keys=IMAGE, std=float(np.sqrt(0.1)), prob=0.1),
            RandGaussianSmoothd(keys=IMAGE, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
            RandScaleIntensityFixedMeand(keys=IMAGE, factors=0.25, fixed_mean=True, preserve_range=True,
                                         channel_wise=True, prob=0.15),
            RandSimulateLowResolutiond(keys=IMAGE, zoom_range=(0.5, 1.0), downsample_mode="nearest",
                                       upsample_mode="trilinear", prob=0.25),
            RandAdjustContrastd(keys=IMAGE, gamma=(0.7, 1.5), invert_image=True, retain_stats=True, prob=0.1),
            RandAdjustContrastd(keys=IMAGE, gamma=(0.7, 1.5), invert_image=False, retain_stats=True, prob=0.3),
        ]
    steps.append(EnsureTyped(keys=keys, track_meta=False, **opt))
    return Compose(steps)


def eval_transforms(
    convention: LabelConvention,
    spacing: Sequence[float] | None,
    with_label: bool = True,
    with_prior: bool = False,
    crop_foreground: bool = True,
    head_mask_key: str | None = None,
) -> Compose:
    """Deterministic, invertible pipeline for validation and inference on whole volumes.

    Load → (regions) → air to 0 (``SuppressBackgroundd``) → RAS → spacing → foreground crop → normalise.
    The metadata that ``invert_prediction`` needs travels on the image MetaTensor. With ``head_mask_key``
    (e.g. ``HEAD``), the ``head_mask`` on the input file's grid is kept under that key (bool ``[X, Y, Z]``).
    """
    keys = [IMAGE] + ([LABEL] if with_label else []) + ([PRIOR] if with_prior else [])
    modes = ["bilinear"] + (["nearest"] if with_label else []) + (["bilinear"] if with_prior else [])
    region_keys = [k for k in (LABEL, PRIOR) if k in keys]
    steps = load_transforms(keys, convention)
    if region_keys:
        steps.append(LabelsToRegionsd(keys=region_keys, convention=convention, outline_keys=(PRIOR,)))
    steps.append(SuppressBackgroundd(keys=IMAGE, mask_key=head_mask_key))
    steps += _geometry(keys, spacing, modes)
    if crop_foreground:
        steps.append(CropForegroundd(keys=keys, source_key=IMAGE, allow_smaller=True))
    steps.append(NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True))
    return Compose(steps)


def invert_prediction(
    data: dict, transform: Compose, keys: Sequence[str] = (PRED,), nearest: bool = False
) -> dict:
    """Map ``data[key]`` (made on the transformed grid of ``data[IMAGE]``) back to the input's grid.

    ``data[IMAGE]`` must be the MetaTensor the pipeline produced (it carries the applied operations).
    Each key gets ``[C, X, Y, Z]`` on the original grid; ``nearest`` for label maps.
    """
    inverter = Invertd(
        keys=list(keys), transform=transform, orig_keys=[IMAGE] * len(keys), nearest_interp=nearest, to_tensor=True
    )
    return inverter(data)
