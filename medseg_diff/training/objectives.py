"""Training objectives: the loss of a batch and the module that DDP wraps, one per model kind.

Everything else model-specific (network, segmenter, prior) is the adapter's (``inference.adapters``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from medseg_diff.diffusion.loss import (
    DiffusionLoss,
    DiffusionTraining,
    EncodeDenoise,
    LossOutput,
    LossWeights,
    segmentation_loss,
)
from medseg_diff.inference.adapters import DiffusionAdapter, ModelAdapter


class Objective(Protocol):
    def train_module(self) -> nn.Module: ...

    def loss(self, module: nn.Module, image: Tensor, regions: Tensor,
             generator: torch.Generator | None = None) -> LossOutput: ...


def loss_weights(adapter: ModelAdapter) -> LossWeights:
    w = adapter.cfg.loss
    return LossWeights(dice=w.dice, bce=w.bce, mse=w.mse, prior=w.prior, attention=w.attention)


class SegmentationObjective:
    """Plain U-Net: Dice + BCE on its logits."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter, self.weights = adapter, loss_weights(adapter)

    def train_module(self) -> nn.Module:
        return self.adapter.net

    def loss(self, module, image, regions, generator=None) -> LossOutput:
        total, parts = segmentation_loss(module(image), regions, self.weights)
        parts["loss"] = float(total.detach())
        return LossOutput(total, parts)


class DiffusionObjective:
    """Conditional diffusion: noise the mask at a random t, denoise, x0 (or ε / v) losses."""

    def __init__(self, adapter: DiffusionAdapter):
        self.adapter = adapter
        d = adapter.cfg.diffusion
        self.scheduler = adapter.scheduler()
        training = DiffusionTraining(mode=d.mode, recycle=d.recycle,
                                     self_condition=0.5 if adapter.cfg.model.denoiser.self_condition else 0.0)
        self.loss_fn = DiffusionLoss(self.scheduler, loss_weights(adapter), training)

    def train_module(self) -> nn.Module:
        return EncodeDenoise(self.adapter.net, self.scheduler)

    def loss(self, module, image, regions, generator=None) -> LossOutput:
        prior = self.adapter.training_prior(regions, generator)
        return self.loss_fn(module, image, regions, generator, external_prior=prior)


def build_objective(adapter: ModelAdapter) -> Objective:
    """The objective of the adapter's model kind."""
    return DiffusionObjective(adapter) if isinstance(adapter, DiffusionAdapter) else SegmentationObjective(adapter)
