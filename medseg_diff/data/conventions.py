"""BraTS label conventions and the [TC, WT, ET] region encoding the models predict.

| convention | files                                   | labels                                   |
|------------|-----------------------------------------|------------------------------------------|
| brats2021  | CASE/CASE_{t1,t1ce,t2,flair,seg}.nii.gz | 1 NCR, 2 ED, 4 ET                        |
| brats2023  | CASE/CASE-{t1n,t1c,t2w,t2f,seg}.nii.gz  | 1 NCR, 2 ED, 3 ET                        |
| msd        | imagesTr/X.nii.gz (4D), labelsTr/X      | 1 edema, 2 non-enhancing, 3 enhancing    |

Regions (BraTS evaluation): WT = every tumour label, TC = NCR (or MSD's non-enhancing) ∪ ET, ET.
Channel order of every region tensor in this package: ``REGIONS = ("TC", "WT", "ET")``.

Patients (``LabelConvention.patient_id``): a BraTS 2023+ case id carries a timepoint, ``BraTS-GLI-00001-000`` and
``BraTS-GLI-00001-001`` are two scans of patient ``BraTS-GLI-00001``; in the other conventions (and for ids not of
that form) a case is its own patient. Splits keep a patient's cases together (``data.manifest``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: Canonical modality order of every image tensor: [t1, t1ce, t2, flair].
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Channel order of every region tensor.
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")


@dataclass(frozen=True)
class LabelConvention:
    """One data set family's label values and file naming.

    ``core`` is the label that belongs to TC but not ET (NCR in BraTS, non-enhancing in MSD),
    ``edema`` the label in WT only, ``enhancing`` the ET label.
    """

    name: str
    core: int
    edema: int
    enhancing: int
    #: file suffix of each canonical modality, in MODALITIES order ("" for 4D MSD images)
    modality_suffixes: tuple[str, ...]
    seg_suffix: str
    separator: str
    #: case ids of one patient's scans: a regular expression whose group ``patient`` is the patient id (None: every
    #: case is its own patient)
    patient_pattern: str | None = None

    def patient_id(self, case_id: str) -> str:
        """The patient a case id belongs to by this convention's naming: ``BraTS-GLI-00001-001`` ->
        ``BraTS-GLI-00001`` in BraTS 2023+; the case id itself when the convention has no timepoints or the id does
        not follow them."""
        match = re.fullmatch(self.patient_pattern, case_id) if self.patient_pattern else None
        return match.group("patient") if match else case_id

    @property
    def labels(self) -> tuple[int, ...]:
        """Every allowed label value, background included."""
        return tuple(sorted({0, self.core, self.edema, self.enhancing}))

    def to_regions(self, label: np.ndarray) -> np.ndarray:
        """Label map ``[X, Y, Z]`` → boolean regions ``[3, X, Y, Z]`` in REGIONS order."""
        label = np.asarray(label)
        et = label == self.enhancing
        tc = (label == self.core) | et
        wt = tc | (label == self.edema)
        return np.stack([tc, wt, et])

    def from_regions(self, regions: np.ndarray) -> np.ndarray:
        """Regions ``[3, X, Y, Z]`` (bool or probabilities thresholded at 0.5) → labels ``[X, Y, Z]`` (uint8).

        Nested BraTS post-processing: WT → edema, then TC → core, then ET → enhancing, each
        overwriting the last, so a predicted ET voxel is ET even where WT was missed.
        """
        regions = np.asarray(regions)
        if regions.dtype != bool:
            regions = regions > 0.5
        tc, wt, et = regions[0], regions[1], regions[2]
        label = np.zeros(regions.shape[1:], dtype=np.uint8)
        label[wt] = self.edema
        label[tc] = self.core
        label[et] = self.enhancing
        return label

    def unknown_labels(self, label: np.ndarray) -> list[int]:
        """Label values present in ``label`` that this convention does not define."""
        values = np.unique(np.asarray(label))
        bad = [v for v in values.tolist() if not float(v).is_integer() or int(v) not in self.labels]
        return [int(v) if float(v).is_integer() else v for v in bad]


BRATS2021 = LabelConvention(
    name="brats2021",
    core=1,
    edema=2,
    enhancing=4,
    modality_suffixes=("t1", "t1ce", "t2", "flair"),
    seg_suffix="seg",
    separator="_",
)
BRATS2023 = LabelConvention(
    name="brats2023",
    core=1,
    edema=2,
    enhancing=3,
    modality_suffixes=("t1n", "t1c", "t2w", "t2f"),
    seg_suffix="seg",
    separator="-",
    # BraTS-<task>-<patient number>-<timepoint>: BraTS-GLI-00001-000, BraTS-MET-00110-001, BraTS-GLI-02073-100
    patient_pattern=r"(?P<patient>[Bb][Rr][Aa][Tt][Ss]-[A-Za-z]+-[0-9]+)-[0-9]{3}",
)
MSD = LabelConvention(
    name="msd",
    core=2,  # "non-enhancing tumour"
    edema=1,
    enhancing=3,
    modality_suffixes=("", "", "", ""),
    seg_suffix="",
    separator="",
)
#: MSD Task01 stores the four modalities as one 4D image in this order; index i of the
#: 4D image holds MSD_CHANNEL_ORDER[i]. Reordered to MODALITIES on load.
MSD_CHANNEL_ORDER: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")

CONVENTIONS: dict[str, LabelConvention] = {c.name: c for c in (BRATS2021, BRATS2023, MSD)}


def get_convention(name: str) -> LabelConvention:
    """The convention called ``name`` (brats2021, brats2023, msd)."""
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown label convention '{name}'; known: {', '.join(CONVENTIONS)}") from None
