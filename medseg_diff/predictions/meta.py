"""``prediction.json``: the record of a prediction folder, and the one module that writes or reads its keys.

Written by ``predict`` (the model, its checkpoint and run, the input files, timing, the maps written, the
provenance of :class:`~medseg_diff.predictions.types.Provenance`, Dice against the case's label file when it has one);
read by ``export`` (to rebuild the case without the model), ``evaluate`` (timing), the DICOM writer (model, run,
reference modality, maps) and ``predict`` itself (is a folder another model's?). Folders written by older versions
lack some keys: every reader gets None for a missing key.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medseg_diff.errors import DataError
from medseg_diff.predictions import layout

#: keys a folder must have for its case to be rebuilt (``export``)
REQUIRED = ("case_id", "convention", "reference", "model", "inputs")


@dataclass
class PredictionMeta:
    """The content of ``prediction.json`` (key order = field order, as written)."""

    case_id: str
    model: str | None = None  # the model's name in this run (--name, else its kind)
    model_kind: str | None = None
    run_id: str | None = None  # the training run
    checkpoint: str | None = None
    model_uri: str | None = None  # the MLflow model URI the checkpoint was fetched through
    convention: str | None = None  # label convention of the input and of CASE_seg.nii.gz
    reference: str | None = None  # the input file whose grid every volume is on
    inputs: dict | None = None  # the case's record: image files, label, prior
    seconds: float | None = None
    peak_memory_mb: float | None = None
    spacing_mm: list | None = None  # the grid the model predicted on
    attention: list | None = None  # this model's maps (others in the folder may be stale); None: not recorded
    variance: bool | None = None  # a variance map was written; None: not recorded
    provenance: dict | None = None  # Provenance.to_dict()
    dice: dict | None = None  # at predict time, against the label file
    dice_source: str | None = None
    postprocess: dict | None = None  # what BraTS post-processing did (inference.postprocess); None: not recorded

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str) + "\n"

    @classmethod
    def from_dict(cls, raw: dict) -> "PredictionMeta":
        """From a parsed ``prediction.json``; unknown keys are ignored, missing ones are None."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known} | {"case_id": raw.get("case_id")})

    def origin(self) -> dict:
        """What makes one prediction of a case another's (model, run, checkpoint): DICOM UIDs are derived from it."""
        return {"model": self.model, "model_kind": self.model_kind, "run_id": self.run_id,
                "checkpoint": self.checkpoint, "model_uri": self.model_uri}


def write_meta(folder: Path, meta: PredictionMeta) -> Path:
    """Write ``folder/prediction.json`` atomically (a hidden temporary file renamed into place)."""
    folder = Path(folder)
    tmp = folder / f".{layout.META}.tmp"
    tmp.write_text(meta.to_json(), encoding="utf-8")
    os.replace(tmp, folder / layout.META)
    return folder / layout.META


def load_raw(path: Path) -> dict:
    """The parsed ``prediction.json`` at ``path``; ``DataError`` naming it when unreadable or not an object."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(path, f"unreadable ({err})") from err
    if not isinstance(raw, dict):
        raise DataError(path, "is not a prediction record (expected a JSON object)")
    return raw


def read_meta(folder: Path, required: bool = True) -> PredictionMeta:
    """``folder``'s record. ``required``: refuse, naming the file, a folder without one or without the keys
    :data:`REQUIRED`."""
    path = Path(folder) / layout.META
    try:
        raw = load_raw(path)
    except FileNotFoundError:
        raise DataError(path, "not a prediction folder (no prediction.json); run predict first") from None
    if required:
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise DataError(path, f"lacks {', '.join(repr(k) for k in missing)}; predict the case again")
    return PredictionMeta.from_dict(raw)


def read_meta_if_any(folder: Path, case: str | None = None) -> PredictionMeta | None:
    """``folder``'s record when it has one that is a JSON object (None otherwise); ``DataError`` naming the file (and
    ``case``) when it cannot be read or parsed."""
    path = Path(folder) / layout.META
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"unreadable ({err})", case=case) from None
    return PredictionMeta.from_dict(raw) if isinstance(raw, dict) else None
