"""The label and modality vocabulary shown to people: region and label names, their colours, their SNOMED CT codes,
and the plain names of the modalities. One home, low in the graph: the montage, the report, the viewer, the colour
tables and the DICOM Segmentation writer all import it (``data.conventions`` holds the label *values*).

Okabe-Ito colours (colour-blind safe): ONE colour per concept in the montage, the report, the viewer and the Slicer /
ITK-SNAP tables and DICOM SEG. Regions (the nested BraTS evaluation sets, drawn as contours) and labels (the values in
the segmentation file) are different concepts and get different colours -- except enhancing tumour, which is both the
ET region and the ET label (the same voxels), so it keeps one colour.
"""

from __future__ import annotations

from dataclasses import dataclass

from medseg_diff.data.conventions import BRATS2023, MODALITIES, LabelConvention

REGION_RGB: dict[str, tuple[int, int, int]] = {
    "WT": (240, 228, 66),  # yellow: whole tumour (every tumour label)
    "TC": (86, 180, 233),  # sky blue: tumour core (NCR + ET)
    "ET": (213, 94, 0),  # vermillion: enhancing tumour
}
#: label role (LabelConvention attribute) -> colour
LABEL_RGB: dict[str, tuple[int, int, int]] = {
    "edema": (0, 158, 115),  # bluish green: edema only (not WT, which also holds the core)
    "core": (204, 121, 167),  # reddish purple: necrotic / non-enhancing core only (not TC, which also holds ET)
    "enhancing": REGION_RGB["ET"],  # the ET label is the ET region
}
REGION_NAMES: dict[str, str] = {
    "WT": "whole tumour",
    "TC": "tumour core",
    "ET": "enhancing tumour",
}

#: SNOMED CT "Morphologically Altered Structure": the category of every tumour segment (DICOM SEG).
SNOMED_CATEGORY = ("49755003", "SCT", "Morphologically Altered Structure")
SNOMED_NECROSIS = ("6574001", "SCT", "Necrosis")
SNOMED_EDEMA = ("79654002", "SCT", "Edema")
SNOMED_NEOPLASM = ("108369006", "SCT", "Neoplasm")

#: Plain names of the canonical modalities; BraTS-2023 file names (t1n, t1c, t2w, t2f) are aliases of them.
_PLAIN: dict[str, str] = {"flair": "FLAIR", "t1ce": "T1ce", "t2": "T2", "t1": "T1"}
#: canonical modality -> its BraTS-2023 name (from the convention, the one place the suffixes are written)
MODALITY_ALIASES: dict[str, str] = dict(zip(MODALITIES, BRATS2023.modality_suffixes))
#: Plain names of the modalities, canonical and alias, as the montage and the report print them.
MODALITY_NAMES: dict[str, str] = {key: _PLAIN[m] for m in ("flair", "t1ce", "t2", "t1")
                                  for key in (m, MODALITY_ALIASES[m])}
#: Modalities tried, in order, for the grey background of the montage (canonical and BraTS-2023 names).
DISPLAY_MODALITIES: tuple[str, ...] = tuple(MODALITY_NAMES)
#: Modalities tried, in order, for the second underlay of the prediction (enhancing tumour is judged on T1ce).
CONTRAST_MODALITIES: tuple[str, ...] = ("t1ce", MODALITY_ALIASES["t1ce"])


@dataclass(frozen=True)
class LabelEntry:
    """One label value of a convention, as the colour tables, the report and the DICOM SEG name it."""

    value: int
    short: str  # no spaces (3D Slicer colour-table names)
    description: str
    rgb: tuple[int, int, int]


def label_entries(convention: LabelConvention) -> tuple[LabelEntry, ...]:
    """The tumour labels of ``convention`` (background excluded), ordered by value."""
    if convention.name == "msd":
        names = {
            convention.edema: ("edema", "edema"),
            convention.core: ("non-enhancing_tumour", "non-enhancing tumour"),
            convention.enhancing: ("enhancing_tumour", "enhancing tumour"),
        }
    else:
        names = {
            convention.core: ("NCR", "NCR - necrotic tumour core"),
            convention.edema: ("ED", "ED - peritumoural edema"),
            convention.enhancing: ("ET", "ET - enhancing tumour"),
        }
    role = {convention.edema: "edema", convention.core: "core", convention.enhancing: "enhancing"}
    return tuple(LabelEntry(value, *names[value], LABEL_RGB[role[value]]) for value in sorted(names))


def snomed_type(entry: LabelEntry, convention: LabelConvention) -> tuple[str, str, str]:
    """SNOMED CT (value, scheme, meaning) of a label: Necrosis (BraTS NCR), Edema, Neoplasm (enhancing and MSD's
    non-enhancing tumour)."""
    if entry.value == convention.edema:
        return SNOMED_EDEMA
    if entry.value == convention.core and convention.name != "msd":
        return SNOMED_NECROSIS
    return SNOMED_NEOPLASM
