"""The options a stage takes, as small dataclasses instead of twenty keyword arguments.

``Sampling``: how the model predicts (where, and overrides of the checkpoint's sampler and windows); ``Cases``:
which cases and what comes with them; ``Writing``: how results are written; ``Scoring`` and ``Tracking``: what
``evaluate`` measures and where it logs. Every field defaults to what the CLI does without the flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg_diff.data.dicom.rules import SeriesRule


@dataclass(frozen=True)
class Sampling:
    """How the model predicts: ``--device``, ``--steps`` K, ``--ensemble`` N, ``--seed``, ``--overlap``,
    ``--min-lesion-mm3``, ``--min-enhancing-mm3`` (None: the checkpoint's)."""

    device: str = "auto"
    sample_steps: int | None = None
    ensemble: int | None = None
    seed: int | None = None
    overlap: float | None = None
    min_lesion_mm3: float | None = None
    min_enhancing_mm3: float | None = None

    def postprocess(self) -> dict[str, float | None]:
        """The post-processing overrides (``infer.min_lesion_mm3`` / ``infer.min_enhancing_mm3``)."""
        return {"min_lesion_mm3": self.min_lesion_mm3, "min_enhancing_mm3": self.min_enhancing_mm3}


@dataclass(frozen=True)
class Cases:
    """Which cases of the source: ``subset`` of a manifest (``all``, ``train``, ``test``), its data ``root``, the
    label ``convention`` of a folder, only ``case_ids`` (in that order), a mask prior per case from ``prior_dir``,
    the ``series_rule`` of DICOM studies, and whether a manifest's SHA-256 are checked first."""

    subset: str = "all"
    root: str | Path | None = None
    convention: str | None = None
    case_ids: Sequence[str] | None = None
    prior_dir: str | Path | None = None
    series_rule: SeriesRule | None = None
    verify_checksums: bool = True


@dataclass(frozen=True)
class Writing:
    """How results are written: the model's ``name`` in them (default: its kind), whether a folder of another
    model or run is replaced, whether a bad case is reported and skipped instead of ending the run, and the DICOM
    series numbers a PACS already holds (new ones are numbered above them)."""

    name: str | None = None
    overwrite: bool = False
    continue_on_error: bool = False
    taken_series_numbers: Sequence[int] = ()


@dataclass(frozen=True)
class Scoring:
    """What ``evaluate`` scores: the manifest's ``subset`` and ``fold``, its data ``root``, a prior per case for
    models that take one, how many cases of each model get a report, bootstrap resamples, the lesion-wise task."""

    subset: str = "test"
    fold: int = 0
    root: str | Path | None = None
    prior_dir: str | Path | None = None
    export_cases: int = 2
    continue_on_error: bool = False
    n_boot: int = 10000
    lesion_task: str = "GLI"


@dataclass(frozen=True)
class Tracking:
    """Where ``evaluate`` logs: MLflow on or off, the tracking URI (also where model URIs are fetched from), the
    experiment (default: the data set's name)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None
