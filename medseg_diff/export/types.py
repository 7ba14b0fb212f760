"""Typed output of the clinician export and its fixed colour scales. Its input, :class:`CaseOverlay`, is the
prediction in memory (``predictions.types``); label and modality names and colours are ``data.vocabulary``'s."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


#: Entropy of one region at p = 0.5 (ln 2 nats = 1 bit): the top of the fixed uncertainty colour scale. The map
#: is summed over the 3 regions, so it can reach 3 x this; values above the top are marked as over range.
ENTROPY_SCALE_TOP: dict[str, float] = {"nats": math.log(2.0), "bits": 1.0}
#: Variance of a probability in [0, 1] is at most 1/4 (members split evenly between 0 and 1); the map averages
#: the 3 regions, so one region split evenly gives 1/12: the top of the fixed variance colour scale.
VARIANCE_MAX = 0.25
VARIANCE_SCALE_TOP = VARIANCE_MAX / 3
#: Top of the attention colour scale, in multiples of the brain's average attention (the bottom is 1 = average).
ATTENTION_SCALE_TOP = 2.0


@dataclass(frozen=True)
class OutputFile:
    """A written file as the report lists it."""

    path: Path
    description: str


@dataclass
class ExportResult:
    """Paths that :func:`medseg_diff.export.export_case` wrote (all in ``out_dir``)."""

    out_dir: Path
    seg: Path
    slicer_colour_table: Path
    itksnap_labels: Path
    montage: Path
    report: Path
    uncertainty: Path | None = None
    variance: Path | None = None
    probabilities: Path | None = None
    attention: dict[str, Path] = field(default_factory=dict)

    def paths(self) -> list[Path]:
        """Every written path."""
        maybe = [self.uncertainty, self.variance, self.probabilities, *self.attention.values()]
        fixed = [self.seg, self.slicer_colour_table, self.itksnap_labels, self.montage, self.report]
        return fixed + [p for p in maybe if p is not None]


