"""The model-specific part of training and inference: one small class per model, one interface.

The trainer is generic; it asks a ``Task`` for the network, the module that DDP wraps, the loss of a
batch and a ``Segmenter`` for whole-volume prediction. Baseline and diffusion differ only here.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg_diff.config import Config
from medseg_diff.diffusion.loss import DiffusionLoss, EncodeDenoise, LossOutput, LossWeights, segmentation_loss
from medseg_diff.diffusion.sampler import DDIMSampler
from medseg_diff.diffusion.schedules import build_scheduler
from medseg_diff.engine.infer import DiffusionSegmenter, Segmenter, UNetSegmenter
from medseg_diff.models import DiffusionSegUNet, baseline_stride, build_baseline_unet


class Task(Protocol):
    kind: str
    net: nn.Module
    stride: int
    uses_ema: bool

    def train_module(self) -> nn.Module: ...

    def loss(self, module: nn.Module, image: Tensor, regions: Tensor, generator: torch.Generator | None) -> LossOutput: ...

    def segmenter(self, net: nn.Module, validation: bool = False, seed: int = 0) -> Segmenter: ...


def _weights(cfg: Config) -> LossWeights:
    return LossWeights(dice=cfg.loss.dice, bce=cfg.loss.bce, mse=cfg.loss.mse, prior=cfg.loss.prior)


class UNetTask:
    """Plain 3D U-Net (MONAI ``UNet``): Dice + BCE on its logits."""

    kind = "unet"
    uses_ema = False

    def __init__(self, cfg: Config):
        u = cfg.model.unet
        self.net = build_baseline_unet(channels=u.channels, strides=u.strides, num_res_units=u.num_res_units,
                                       dropout=u.dropout)
        self.stride = baseline_stride(u.strides)
        self.weights = _weights(cfg)

    def train_module(self) -> nn.Module:
        return self.net

    def loss(self, module, image, regions, generator=None) -> LossOutput:
        total, parts = segmentation_loss(module(image), regions, self.weights)
        parts["loss"] = float(total.detach())
        return LossOutput(total, parts)

    def segmenter(self, net, validation=False, seed=0) -> Segmenter:
        return UNetSegmenter(net, name=self.kind)


class DiffusionTask:
    """Conditional diffusion U-Net: x0 (or ε / v) prediction, DDIM ensembles at inference."""

    kind = "diffusion"
    uses_ema = True

    def __init__(self, cfg: Config):
        d = cfg.model.denoiser
        self.net = DiffusionSegUNet(
            in_channels=4, out_channels=3, channels=d.channels, res_blocks=d.res_blocks,
            linear_attention_levels=d.linear_attention_levels, cross_attention_levels=d.cross_attention_levels,
            heads=d.heads, dim_head=d.dim_head, prior_source=d.prior_source, norm_groups=d.norm_groups,
            patch_size=d.patch_size, encoder_channels=[d.encoder_factor * c for c in d.channels],
            stem_channels=d.stem_channels,
        )
        self.stride = self.net.stride
        self.prior_source = d.prior_source
        self.diffusion = cfg.diffusion
        self.scheduler = build_scheduler(cfg.diffusion.timesteps, cfg.diffusion.schedule, cfg.diffusion.prediction,
                                         cfg.diffusion.snr_shift)
        self.loss_fn = DiffusionLoss(self.scheduler, _weights(cfg))

    def train_module(self) -> nn.Module:
        return EncodeDenoise(self.net)

    def loss(self, module, image, regions, generator=None) -> LossOutput:
        prior = simulated_prior(regions, generator) if self.prior_source == "external" else None
        return self.loss_fn(_with_prior(module, prior), image, regions, generator)

    def segmenter(self, net, validation=False, seed=0) -> Segmenter:
        d = self.diffusion
        steps, ensemble = (d.val_sample_steps, d.val_ensemble) if validation else (d.sample_steps, d.ensemble)
        scheduler = build_scheduler(d.timesteps, d.schedule, d.prediction, d.snr_shift)
        sampler = DDIMSampler(scheduler, steps=steps, ensemble=ensemble,
                              step_uncertainty_weighting=d.step_uncertainty_weighting, seed=seed)
        return DiffusionSegmenter(net, sampler, name=self.kind, external_prior=self.prior_source == "external",
                                  attention=not validation)


def _with_prior(module: nn.Module, prior: Tensor | None):
    if prior is None:
        return module
    return lambda x_t, t, image: module(x_t, t, image, prior)


def simulated_prior(regions: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A rough outline standing in for an external prior while training ``prior_source="external"``.

    The ground-truth regions ``[B, 3, X, Y, Z]`` are blurred (box filter, 5 voxels) and scaled by a
    random confidence in [0.5, 1] per case, as a coarse prior from another model or a clinician would be.
    """
    blurred = F.avg_pool3d(regions, kernel_size=5, stride=1, padding=2, count_include_pad=False)
    scale = 0.5 + 0.5 * torch.rand((regions.shape[0], 1, 1, 1, 1), generator=generator, device=regions.device)
    return blurred * scale


def build_task(cfg: Config) -> Task:
    """The task for ``cfg.model.kind``."""
    return DiffusionTask(cfg) if cfg.model.kind == "diffusion" else UNetTask(cfg)
