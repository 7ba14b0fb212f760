"""Datasets over manifest cases: records for MONAI transforms, cached so that the GPU is not starved.

``cache="memory"`` uses ``CacheDataset`` (the deterministic head of the pipeline — load, orient,
resample, crop, normalise — runs once per case and is kept in RAM); ``"disk"`` uses
``PersistentDataset`` (the same, pickled under ``cache_dir``, reused across runs); ``"none"`` uses a
plain ``Dataset``.
"""

from __future__ import annotations

from pathlib import Path

from monai.data import CacheDataset, Dataset, PersistentDataset

from medseg_diff.data.conventions import MODALITIES
from medseg_diff.data.discovery import CaseFiles
from medseg_diff.data.manifest import Manifest, ManifestCase
from medseg_diff.data.transforms import IMAGE, LABEL, PRIOR
from medseg_diff.errors import DataError

CASE_ID = "case_id"


def case_record(manifest: Manifest, case: ManifestCase, prior: str | Path | None = None,
                with_label: bool = True) -> dict:
    """The dict a MONAI pipeline starts from: image path(s) in MODALITIES order, label, case id."""
    missing = manifest.missing_images(case)
    if missing:
        raise DataError(manifest.source, f"manifest entry has no image for {', '.join(repr(m) for m in missing)}",
                        case=case.id)
    if manifest.image_layout == "4d":
        image: str | list[str] = str(manifest.path_of(case.images["4d"]))
    else:
        image = [str(manifest.path_of(case.images[m])) for m in MODALITIES]
    record = {IMAGE: image, CASE_ID: case.id}
    if with_label and case.label:
        record[LABEL] = str(manifest.path_of(case.label))
    if prior is not None:
        record[PRIOR] = str(prior)
    return record


def files_record(case: CaseFiles, prior: str | Path | None = None, with_label: bool = True) -> dict:
    """Same as ``case_record`` for a discovered case folder (no manifest)."""
    image = str(case.images["4d"]) if "4d" in case.images else [str(case.images[m]) for m in MODALITIES]
    record = {IMAGE: image, CASE_ID: case.case_id}
    if with_label and case.label:
        record[LABEL] = str(case.label)
    if prior is not None:
        record[PRIOR] = str(prior)
    return record


def make_dataset(records: list[dict], transform, cache: str = "memory", cache_dir: str | Path | None = None,
                 num_workers: int = 0, progress: bool = False) -> Dataset:
    """A MONAI dataset over ``records`` with the requested caching."""
    if cache == "memory":
        return CacheDataset(records, transform, cache_rate=1.0, num_workers=num_workers or None, progress=progress)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("data.cache 'disk' needs data.cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(records, transform, cache_dir=cache_dir)
    return Dataset(records, transform)
