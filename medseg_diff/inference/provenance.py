"""Where a prediction of a model comes from (``predictions.types.Provenance``): its checkpoint, what it was trained
on (from the checkpoint: ``LoadedModel.training``, never from the working folder), and the sampler and
sliding-window settings it predicts with."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from medseg_diff.data.profile import describe
from medseg_diff.inference.loading import LoadedModel
from medseg_diff.predictions.types import Provenance


def model_provenance(model: LoadedModel) -> Provenance:
    """Where a prediction of ``model`` comes from: its checkpoint, the training data its checkpoint records, and
    the sampler and sliding-window settings it predicts with."""
    cfg = model.cfg
    sampler = model.adapter.sampler_settings()
    training = model.training or {}
    return Provenance(
        model_kind=model.kind, checkpoint=str(Path(model.checkpoint).absolute()), model_uri=model.source,
        run_id=model.run_id, epoch=model.epoch,
        training_data=describe(training) if "dataset" in training else None,
        training_manifest=cfg.data.manifest,
        synthetic_training=training.get("synthetic"),
        sample_steps=sampler["sample_steps"] if sampler else None,
        ensemble=sampler["ensemble"] if sampler else None,
        seed=cfg.experiment.seed if sampler else None,
        overlap=cfg.infer.overlap, roi_size=tuple(cfg.infer.roi_size or cfg.data.roi_size),
        spacing_mm=_tuple(cfg.data.spacing), threshold=cfg.infer.threshold,
        predicted_at=f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
    )


def _tuple(values) -> tuple | None:
    return None if values is None else tuple(values)
