"""MONAI dictionary transforms: training, validation and (invertible) inference pipelines.

Keys: ``IMAGE`` (4 modalities, canonical order), ``LABEL`` (BraTS labels → [TC, WT, ET] regions),
``PRIOR`` (optional external mask prior → [TC, WT, ET] probabilities). One random draw is shared by
every key (MONAI dictionary transforms do this), so image, label and prior stay aligned.

Inference pipelines are invertible: ``invert_prediction`` puts a prediction made on the transformed
grid back on the input file's exact grid (shape and affine), RAS and LPS inputs alike.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    Spacingd,
)

from medseg_diff.data.conventions import MODALITIES, MSD_CHANNEL_ORDER, LabelConvention
from medseg_diff.data.io import MedsegReader

IMAGE, LABEL, PRIOR, PRED = "image", "label", "prior", "pred"


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


def train_transforms(
    convention: LabelConvention,
    spacing: Sequence[float] | None,
    roi_size: Sequence[int],
    num_samples: int = 2,
    pos_neg: tuple[float, float] = (1.0, 1.0),
    flip_prob: float = 0.5,
    intensity_prob: float = 1.0,
) -> Compose:
    """Load → RAS → spacing → regions → foreground crop → normalise → pos/neg crops → flips → intensity."""
    keys = [IMAGE, LABEL]
    return Compose(
        load_transforms(keys, convention)
        + [LabelsToRegionsd(keys=LABEL, convention=convention)]
        + _geometry(keys, spacing, ("bilinear", "nearest"))
        + [
            CropForegroundd(keys=keys, source_key=IMAGE, allow_smaller=True),
            NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True),
            SpatialPadd(keys=keys, spatial_size=tuple(roi_size)),
            RandCropByPosNegLabeld(
                keys=keys, label_key=LABEL, spatial_size=tuple(roi_size), pos=pos_neg[0], neg=pos_neg[1],
                num_samples=num_samples, image_key=IMAGE, image_threshold=0.0,
            ),
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=0),
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1),
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=2),
            RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=intensity_prob),
            RandShiftIntensityd(keys=IMAGE, offsets=0.1, prob=intensity_prob),
            EnsureTyped(keys=keys, track_meta=False),
        ]
    )


def eval_transforms(
    convention: LabelConvention,
    spacing: Sequence[float] | None,
    with_label: bool = True,
    with_prior: bool = False,
    crop_foreground: bool = True,
) -> Compose:
    """Deterministic, invertible pipeline for validation and inference on whole volumes.

    Load → RAS → spacing → (regions) → foreground crop → normalise. The metadata that
    ``invert_prediction`` needs travels on the image MetaTensor.
    """
    keys = [IMAGE] + ([LABEL] if with_label else []) + ([PRIOR] if with_prior else [])
    modes = ["bilinear"] + (["nearest"] if with_label else []) + (["bilinear"] if with_prior else [])
    region_keys = [k for k in (LABEL, PRIOR) if k in keys]
    steps = load_transforms(keys, convention)
    if region_keys:
        steps.append(LabelsToRegionsd(keys=region_keys, convention=convention, outline_keys=(PRIOR,)))
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
