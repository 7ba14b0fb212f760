"""A label map as a DICOM Segmentation (highdicom): one BINARY segment per tumour label of the convention.

Segments are numbered in ``data.vocabulary.label_entries`` order (by label value): brats2021 NCR = 1, ED = 2, ET = 3.
Each carries SNOMED CT codes (category "Morphologically Altered Structure"; type Necrosis, Edema or Neoplasm), its
colour of the montage and colour tables (RecommendedDisplayCIELabValue), the label's short name as SegmentLabel and
its description, and the algorithm (medseg-diff, its version, family "Artificial Intelligence"). BINARY is the
type dcmqi (``segimage2itkimage``) and every viewer read; frames without any segment are omitted.

The label map ``[X, Y, Z]`` on a RAS affine is moved onto the source series' frames through the affines
(``geometry.volume_to_frames``), so its voxel order does not matter, only that it lies on the series' grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg_diff.data.conventions import LabelConvention
from medseg_diff.data.vocabulary import SNOMED_CATEGORY, label_entries, snomed_type
from medseg_diff.data.dicom.geometry import volume_to_frames


@dataclass(frozen=True)
class Equipment:
    """What every DICOM object we write says about where it came from (General / Enhanced Equipment)."""

    model_name: str = "medseg-diff"  # ManufacturerModelName
    run_id: str | None = None  # DeviceSerialNumber ("none" without a run)
    manufacturer: str = "medseg-diff"

    @property
    def version(self) -> str:
        from medseg_diff import __version__

        return __version__

    def equipment(self) -> dict:
        """Keyword arguments of highdicom's SOP classes."""
        return {"manufacturer": self.manufacturer, "manufacturer_model_name": self.model_name[:64],
                "software_versions": self.version, "device_serial_number": (self.run_id or "none")[:64]}


def segment_descriptions(convention: LabelConvention, provenance: Equipment) -> list:
    """``hd.seg.SegmentDescription`` per tumour label, numbered from 1 in ``label_entries`` order."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="medseg-diff", family=codes.cid7162.ArtificialIntelligence, version=provenance.version,
        source=provenance.model_name if provenance.model_name != "medseg-diff" else None)
    out = []
    for number, entry in enumerate(label_entries(convention), start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=entry.short,
            segmented_property_category=CodedConcept(*SNOMED_CATEGORY),
            segmented_property_type=CodedConcept(*snomed_type(entry, convention)),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*entry.rgb),
        )
        description.SegmentDescription = entry.description
        out.append(description)
    return out


def segment_frames(labels: np.ndarray, affine: np.ndarray, source: Sequence, convention: LabelConvention
                   ) -> np.ndarray:
    """``[F, rows, columns]`` uint8 segment numbers (0 = none) of a label map on the frames of ``source``."""
    frames = volume_to_frames(np.asarray(labels), affine, source)
    out = np.zeros(frames.shape, dtype=np.uint8)
    for number, entry in enumerate(label_entries(convention), start=1):
        out[frames == entry.value] = number
    return out


def segmentation_dataset(labels: np.ndarray, affine: np.ndarray, source: Sequence, convention: LabelConvention,
                         *, series_uid: str, sop_uid: str, series_number: int, when, provenance: Equipment,
                         series_description: str = "medseg-diff tumour segmentation"):
    """The ``hd.seg.Segmentation`` of ``labels`` (``[X, Y, Z]`` on RAS ``affine``) over the single-frame images
    ``source`` (pydicom headers in slice order; pixel data not needed). ``when``: a ``datetime`` for every date and
    time in it (content, series, instance creation), so equal inputs give equal objects."""
    import highdicom as hd

    frames = segment_frames(labels, affine, source, convention)
    seg = hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(convention, provenance),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        content_label="TUMOUR",
        content_description=f"brain tumour labels ({convention.name}), research use only",
        series_description=series_description,
        content_date=when.date(), content_time=when.time(), series_date=when.date(), series_time=when.time(),
        **provenance.equipment(),
    )
    return finish_dataset(seg, when)


def finish_dataset(ds, when):
    """Make what highdicom stamps from the clock or at random a function of the input: instance creation and
    contribution date/time = ``when``; the dimension organization UID derived from the SOP instance UID. Then equal
    inputs give equal bytes. Also adds the type 2 ContentCreatorName (empty) that highdicom leaves out (dcmqi
    warns)."""
    from pydicom.uid import generate_uid
    from pydicom.valuerep import DA, DT, TM

    if "ContentCreatorName" not in ds:
        ds.ContentCreatorName = ""

    ds.InstanceCreationDate = DA(when.date())
    ds.InstanceCreationTime = TM(when.time())
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)
    organization = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), "dimension organization"])
    for item in [*ds.get("DimensionOrganizationSequence", []), *ds.get("DimensionIndexSequence", [])]:
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = organization
    return ds
