"""A float map (uncertainty, variance, attention) as a DICOM Parametric Map (highdicom), float32 frames.

Each map is moved onto the source series' frames through the affines (``geometry.volume_to_frames``) and stored
as 32-bit float pixel data with an identity Real World Value Mapping in its unit (UCUM): predictive entropy in
``{nat}`` (dimensionless, annotated "nat"), a variance of probabilities and attention maps in ``1`` (no units).
Frames are in the source series' slice order (see ``_sort_frames_along_normal``: what dcmqi / 3D Slicer expect),
with Frame Anatomy "brain, unpaired".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg_diff.data.dicom.geometry import volume_to_frames
from medseg_diff.dicom.seg import Equipment, finish_dataset

UCUM_NO_UNITS = ("1", "UCUM", "no units")
UCUM_NATS = ("{nat}", "UCUM", "nat")
UCUM_BITS = ("bit", "UCUM", "bit")
BRAIN = ("12738006", "SCT", "Brain")


@dataclass(frozen=True)
class MapKind:
    """What a map is: its LUT label / content label (short, upper case), explanation and unit."""

    label: str  # LUTLabel and ContentLabel (CS: A-Z 0-9 _ space, up to 16 characters)
    explanation: str  # LUTExplanation and ContentDescription
    unit: tuple[str, str, str]  # (code value, scheme, meaning)
    window: tuple[float, float] | None = None  # the display window (VOI LUT); None: the map's minimum to maximum


def uncertainty_kind(units: str = "nats") -> MapKind:
    unit = UCUM_BITS if units == "bits" else UCUM_NATS
    return MapKind("UNCERTAINTY", f"predictive entropy of the tumour regions ({units})", unit)


def variance_kind() -> MapKind:
    return MapKind("VARIANCE", "ensemble member variance of the region probabilities", UCUM_NO_UNITS)


def attention_kind(name: str) -> MapKind:
    """The kind of attention map ``name`` ("self", "cross", ...): label ``ATTN_NAME``, cut to 16 characters."""
    import re

    tag = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_") or "MAP"
    return MapKind(f"ATTN_{tag}"[:16], f"{name} attention of the network, 1 = its 99.5th percentile", UCUM_NO_UNITS,
                   window=(0.0, 1.0))


def parametric_map_dataset(values: np.ndarray, affine: np.ndarray, source: Sequence, kind: MapKind, *,
                           series_uid: str, sop_uid: str, series_number: int, when, provenance: Equipment,
                           series_description: str | None = None):
    """The ``hd.pm.ParametricMap`` of ``values`` (``[X, Y, Z]`` on RAS ``affine``) over the single-frame images
    ``source`` (headers in slice order). ``when``: a ``datetime`` for every date and time in it."""
    import highdicom as hd
    from highdicom.sr import CodedConcept

    frames = np.ascontiguousarray(volume_to_frames(np.asarray(values, dtype=np.float32), affine, source))
    if not np.all(np.isfinite(frames)):
        raise ValueError(f"{kind.label.lower()} map has NaN/Inf values")
    low, high = float(frames.min()), float(frames.max())
    shown = kind.window if kind.window is not None else (low, high)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=kind.label, lut_explanation=kind.explanation[:64], unit=CodedConcept(*kind.unit),
        value_range=(low, high), slope=1.0, intercept=0.0)
    pm = hd.pm.ParametricMap(
        source_images=list(source),
        pixel_array=frames,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(  # LINEAR_EXACT: a width below 1 is allowed
            window_center=(shown[0] + shown[1]) / 2, window_width=max(shown[1] - shown[0], 1e-6),
            voi_lut_function="LINEAR_EXACT")],
        content_label=kind.label,
        content_description=kind.explanation[:64],
        series_description=series_description or f"medseg-diff {kind.explanation}"[:64],
        content_date=when.date(), content_time=when.time(), series_date=when.date(), series_time=when.time(),
        **provenance.equipment(),
    )
    _set_anatomy(pm)
    _sort_frames_along_normal(pm)
    return finish_dataset(pm, when)


def _sort_frames_along_normal(pm) -> None:
    """Put the frames in the source series' order, ascending along the normal ``u x v`` of their orientation.

    highdicom sorts them the other way (along ``v x u``). Both are valid DICOM, but dcmqi's ``paramap2itkimage``
    (and so 3D Slicer) puts frame ``i`` at slice ``i`` counted from the lowest position along ``u x v``: it would
    show the map mirrored along the slice axis. The per-frame functional groups (position, source image, dimension
    index) move with their frames."""
    items = list(pm.PerFrameFunctionalGroupsSequence)
    iop = np.asarray(pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient,
                     dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    distance = [float(np.asarray(i.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64) @ normal)
                for i in items]
    order = np.argsort(distance, kind="stable")
    if np.array_equal(order, np.arange(len(items))):
        return
    frames = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(len(items), int(pm.Rows), int(pm.Columns))
    pm.FloatPixelData = np.ascontiguousarray(frames[order]).tobytes()
    pm.PerFrameFunctionalGroupsSequence = [items[i] for i in order]


def _set_anatomy(pm) -> None:
    """Frame Anatomy (brain, unpaired) for every frame: without it the General Series' Laterality is required."""
    from pydicom.dataset import Dataset
    from highdicom.sr import CodedConcept

    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [CodedConcept(*BRAIN)]
    anatomy.FrameLaterality = "U"
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
