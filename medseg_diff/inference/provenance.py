"""Where a prediction of a model comes from (``predictions.types.Provenance``): its checkpoint, the training data
its stored config names, and the sampler and sliding-window settings it predicts with."""

from __future__ import annotations

import datetime as _dt
import functools
from pathlib import Path

from medseg_diff.data.manifest import load_manifest
from medseg_diff.errors import MedsegError
from medseg_diff.inference.loading import LoadedModel
from medseg_diff.predictions.types import Provenance


def model_provenance(model: LoadedModel) -> Provenance:
    """Where a prediction of ``model`` comes from: its checkpoint, the training data its stored config names, and
    the sampler and sliding-window settings it predicts with."""
    cfg = model.cfg
    sampler = model.adapter.sampler_settings()
    manifest = cfg.data.manifest
    return Provenance(
        model_kind=model.kind, checkpoint=str(Path(model.checkpoint).absolute()), model_uri=model.source,
        run_id=model.run_id, epoch=model.epoch,
        training_data=training_data(manifest, cfg.data.root, _tuple(cfg.data.spacing)) if manifest else None,
        training_manifest=manifest,
        sample_steps=sampler["sample_steps"] if sampler else None,
        ensemble=sampler["ensemble"] if sampler else None,
        seed=cfg.experiment.seed if sampler else None,
        overlap=cfg.infer.overlap, roi_size=tuple(cfg.infer.roi_size or cfg.data.roi_size),
        spacing_mm=_tuple(cfg.data.spacing), threshold=cfg.infer.threshold,
        predicted_at=f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
    )


@functools.lru_cache(maxsize=8)
def training_data(manifest: str, root: str | None = None, spacing: tuple[float, ...] | None = None) -> str:
    """Plain words for the data set a training manifest describes, e.g. "synthetic BraTS-like phantoms (medseg-diff
    synth), 3 mm voxels: data set 'synthetic-brats', 6 cases, brats2021 labels". Phantoms are recognised by the
    header description ``medseg-diff synth`` writes, or a manifest name that says synthetic / phantom."""
    try:
        m = load_manifest(manifest, root=root)
    except (MedsegError, OSError):
        return f"the data set of manifest {manifest} (not readable when predicting: name and content unknown)"
    description, zooms = _first_image_header(m)
    synthetic = "synthetic" in description or any(w in m.name.lower() for w in ("synth", "phantom"))
    what = "synthetic BraTS-like phantoms (medseg-diff synth)" if synthetic else "images"
    if zooms:
        what += f", {_mm(zooms)} voxels"
    resampled = f"; resampled to {_mm(spacing)} for training" if spacing else ""
    return f"{what}: data set '{m.name}', {len(m.cases)} cases, {m.convention} labels{resampled}"


def _first_image_header(manifest) -> tuple[str, tuple[float, ...] | None]:
    """(header description, voxel size in mm) of the first image of a manifest; ("", None) when unreadable."""
    import nibabel as nib

    if not manifest.cases:
        return "", None
    path = manifest.path_of(next(iter(manifest.cases[0].images.values())))
    try:
        header = nib.load(str(path)).header
        return bytes(header["descrip"]).decode("ascii", "replace").lower(), tuple(header.get_zooms()[:3])
    except Exception:  # not NIfTI (MHA, DICOM) or unreadable: described without it
        return "", None


def _tuple(values) -> tuple | None:
    return None if values is None else tuple(values)


def _mm(zooms) -> str:
    values = [float(z) for z in zooms]
    if max(values) - min(values) < 1e-3:
        return f"{values[0]:g} mm"
    return " \u00d7 ".join(f"{z:g}" for z in values) + " mm"
