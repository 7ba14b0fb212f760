"""The options a stage takes, as small dataclasses instead of twenty keyword arguments.

``Sampling``: how the model predicts (where, and overrides of the checkpoint's sampler and windows); ``Cases``:
which cases and what comes with them; ``Writing``: how results are written; ``Scoring`` and ``Tracking``: what
``evaluate`` measures and where it logs; ``Shard``: this process's share of the cases when several predict into one
folder. Every field defaults to what the CLI does without the flag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg_diff.data.dicom.rules import SeriesRule


@dataclass(frozen=True)
class Sampling:
    """How the model predicts: ``--device``, ``--steps`` K, ``--ensemble`` N, ``--seed``, ``--overlap``,
    ``--min-lesion-mm3``, ``--min-enhancing-mm3`` (None: the checkpoint's); ``local_rank``: the GPU that ``auto`` and
    ``cuda`` mean (``cuda:LOCAL_RANK``, one per process under torchrun)."""

    device: str = "auto"
    sample_steps: int | None = None
    ensemble: int | None = None
    seed: int | None = None
    overlap: float | None = None
    min_lesion_mm3: float | None = None
    min_enhancing_mm3: float | None = None
    local_rank: int = 0

    def postprocess(self) -> dict[str, float | None]:
        """The post-processing overrides (``infer.min_lesion_mm3`` / ``infer.min_enhancing_mm3``)."""
        return {"min_lesion_mm3": self.min_lesion_mm3, "min_enhancing_mm3": self.min_enhancing_mm3}


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based, like torchrun's ``RANK`` and a Slurm array ``--array=0-(N-1)``): the
    cases whose position in the case ids sorted as strings, counted from 0, leaves ``index`` modulo ``count``.
    ``count`` processes with indices ``0 .. count-1`` take every case exactly once, whatever each one's order."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"the number of shards must be >= 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count} does not exist: shards are numbered from 0 to "
                             f"{self.count - 1} (0-based, like torchrun's RANK)")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"I/N"`` (``--shard``); ``ValueError`` saying what is wrong otherwise."""
        index, sep, count = text.partition("/")
        if not (sep and index.isdigit() and count.isdigit()):
            raise ValueError(f"--shard {text}: expected I/N in whole numbers, e.g. 0/4 (the first of 4 shards)")
        try:
            return cls(int(index), int(count))
        except ValueError as err:
            raise ValueError(f"--shard {text}: {err}") from None

    def select(self, case_ids: Sequence[str]) -> set[str]:
        """The ids of ``case_ids`` that belong to this shard."""
        return {case for i, case in enumerate(sorted(set(case_ids))) if i % self.count == self.index}

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Launch:
    """What torchrun (or any launcher setting its variables) says about this process: its shard
    (``RANK``/``WORLD_SIZE``) and its GPU (``LOCAL_RANK``)."""

    shard: Shard
    local_rank: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "Launch | None":
        """From ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (default 0); None when ``RANK`` and ``WORLD_SIZE`` are
        both unset. ``ValueError`` naming the variable when one is missing or not a valid number."""
        if "RANK" not in environ and "WORLD_SIZE" not in environ:
            return None
        values = {}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            text = environ.get(key, "0" if key == "LOCAL_RANK" else None)
            if text is None:
                raise ValueError(f"{key} is not set, though {'WORLD_SIZE' if key == 'RANK' else 'RANK'} is: set both "
                                 "(torchrun does), or neither")
            try:
                values[key] = int(text)
            except ValueError:
                raise ValueError(f"{key}={text!r} is not an integer") from None
        if values["LOCAL_RANK"] < 0:
            raise ValueError(f"LOCAL_RANK={values['LOCAL_RANK']} is negative")
        try:
            shard = Shard(values["RANK"], values["WORLD_SIZE"])
        except ValueError as err:
            raise ValueError(f"RANK={values['RANK']}, WORLD_SIZE={values['WORLD_SIZE']}: {err}") from None
        return cls(shard, values["LOCAL_RANK"])


@dataclass(frozen=True)
class Cases:
    """Which cases of the source: ``subset`` of a manifest (``all``, ``train``, ``test``), its data ``root``, the
    label ``convention`` of a folder, only ``case_ids`` (in that order), only this process's ``shard`` of them, a
    mask prior per case from ``prior_dir``, the ``series_rule`` of DICOM studies, and whether a manifest's SHA-256
    are checked first."""

    subset: str = "all"
    root: str | Path | None = None
    convention: str | None = None
    case_ids: Sequence[str] | None = None
    shard: Shard | None = None
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
    models that take one, how many cases of each model get a report, bootstrap resamples, the lesion-wise task, and
    how many processes score the cases (``--workers``; the results do not depend on it)."""

    subset: str = "test"
    fold: int = 0
    root: str | Path | None = None
    prior_dir: str | Path | None = None
    export_cases: int = 2
    continue_on_error: bool = False
    n_boot: int = 10000
    lesion_task: str = "GLI"
    workers: int = 1


@dataclass(frozen=True)
class Tracking:
    """Where ``evaluate`` logs: MLflow on or off, the tracking URI (also where model URIs are fetched from), the
    experiment (default: the data set's name)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None
