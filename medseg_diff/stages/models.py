"""A trained model from wherever it is kept: a checkpoint file, or an MLflow model URI (``models:/NAME/VERSION``,
``models:/NAME@alias``, ``runs:/RUN_ID/PATH``) whose checkpoint is fetched from the tracking server first
(``tracking.registry``), then rebuilt by ``inference.loading``."""

from __future__ import annotations

from pathlib import Path

import logging

import torch

from medseg_diff.data.profile import describe
from medseg_diff.inference.loading import LoadedModel, check_overrides, is_model_uri
from medseg_diff.inference.loading import load_model as load_checkpoint_model

log = logging.getLogger(__name__)


def load_model(source: str | Path, device: torch.device | str = "cpu", sample_steps: int | None = None,
               ensemble: int | None = None, seed: int | None = None, overlap: float | None = None,
               tracking_uri: str | None = None, postprocess: dict[str, float] | None = None) -> LoadedModel:
    """``inference.loading.load_model`` of a checkpoint file or of the checkpoint an MLflow model URI names.

    ``sample_steps`` / ``ensemble`` / ``seed`` override the sampler of the training config, ``overlap`` its
    sliding-window overlap (``infer.overlap``); they are checked before anything is fetched. A model trained only
    on synthetic phantoms says so in one warning line."""
    if not is_model_uri(source):
        model = load_checkpoint_model(source, device, sample_steps, ensemble, seed, overlap, postprocess=postprocess)
    else:
        check_overrides(sample_steps, ensemble, overlap, {k: v for k, v in (postprocess or {}).items() if v is not None})
        from medseg_diff.tracking.registry import checkpoint_of_model  # MLflow is imported only for a model URI

        fetched = checkpoint_of_model(str(source), tracking_uri)
        model = load_checkpoint_model(source, device, sample_steps, ensemble, seed, overlap, fetched=fetched,
                                      postprocess=postprocess)
    if (model.training or {}).get("synthetic"):
        log.warning("%s was trained only on synthetic phantoms (%s): on a real scan its output shows what the "
                    "pipeline does, not a validated segmentation", source, describe(model.training))
    return model
