"""Training losses. Both models share ``segmentation_loss`` (Dice + BCE on the three regions), so the
baseline and the diffusion model are trained with the same loss on their mask estimate.

Diffusion step (Diff-UNet style, x0 prediction):
1. x0 = 2·regions - 1; t ~ U{0..T-1}; ε ~ N(0, I); x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε (DDPM eq. 4)
2. the network sees (x_t, t, image features) and outputs x0 logits (or ε / v)
3. loss = Dice + BCE on the x0 estimate + MSE (on x0, or on ε / v for those parameterisations)
   + the prior head's deep supervision against the regions pooled to its grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn

from medseg_diff.diffusion.schedules import training_target, x0_from_output

_DICE_LOGITS = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)
_DICE_PROBS = DiceLoss(sigmoid=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)


@dataclass
class LossOutput:
    total: Tensor  # scalar, differentiable
    parts: dict[str, float] = field(default_factory=dict)  # detached components, for logging


@dataclass(frozen=True)
class LossWeights:
    dice: float = 1.0
    bce: float = 1.0
    mse: float = 1.0
    prior: float = 0.5


def segmentation_loss(logits: Tensor, target: Tensor, weights: LossWeights) -> tuple[Tensor, dict[str, float]]:
    """Dice + BCE of region logits ``[B, 3, X, Y, Z]`` against {0, 1} regions of the same shape."""
    dice = _DICE_LOGITS(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    total = weights.dice * dice + weights.bce * bce
    return total, {"dice_loss": float(dice.detach()), "bce": float(bce.detach())}


def prior_loss(prior_logits: Tensor, regions: Tensor) -> tuple[Tensor, float]:
    """Deep supervision of the prior head: regions ``[B, 3, X, Y, Z]`` area-pooled to its grid."""
    target = F.adaptive_avg_pool3d(regions, prior_logits.shape[2:])
    loss = F.binary_cross_entropy_with_logits(prior_logits, target) + _DICE_PROBS(torch.sigmoid(prior_logits), target)
    return loss, float(loss.detach())


def bce_of_probabilities(probs: Tensor, target: Tensor) -> Tensor:
    """BCE of probabilities (not logits), in float32 with autocast off: ``F.binary_cross_entropy`` raises
    "unsafe to autocast" inside a CUDA autocast region, where the trainer computes the loss."""
    with torch.autocast(probs.device.type, enabled=False):
        return F.binary_cross_entropy(probs.float().clamp(1e-6, 1 - 1e-6), target.float())


class DiffusionLoss:
    """One training step's loss for ``DiffusionSegUNet`` with a MONAI scheduler."""

    def __init__(self, scheduler, weights: LossWeights):
        self.scheduler = scheduler
        self.weights = weights

    def __call__(self, model: nn.Module, image: Tensor, regions: Tensor, generator=None) -> LossOutput:
        # 1. noise the mask (DDPM eq. 4)
        x0 = regions * 2.0 - 1.0
        b = x0.shape[0]
        t = torch.randint(0, self.scheduler.num_train_timesteps, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.scheduler.add_noise(x0, noise, t)
        # 2. predict: ``model`` is an ``EncodeDenoise`` (possibly DDP-wrapped), one forward per step
        output, prior_logits = model(x_t, t, image)
        return self.from_output(output, prior_logits, x_t, x0, noise, t, regions)

    def from_output(self, output, prior_logits, x_t, x0, noise, t, regions) -> LossOutput:
        w = self.weights
        parts: dict[str, float] = {}
        # 3. losses on the x0 estimate
        if self.scheduler.prediction_type == "sample":
            seg, seg_parts = segmentation_loss(output, regions, w)
            mse = F.mse_loss(torch.sigmoid(output), regions)
        else:
            probs = (x0_from_output(self.scheduler, output, x_t, t) + 1.0) / 2.0
            dice = _DICE_PROBS(probs, regions)
            bce = bce_of_probabilities(probs, regions)
            seg = w.dice * dice + w.bce * bce
            seg_parts = {"dice_loss": float(dice.detach()), "bce": float(bce.detach())}
            mse = F.mse_loss(output, training_target(self.scheduler, x0, noise, t))
        parts.update(seg_parts)
        parts["mse"] = float(mse.detach())
        total = seg + w.mse * mse
        # 4. deep supervision of the prior head
        if prior_logits is not None and w.prior > 0:
            p_loss, parts["prior"] = prior_loss(prior_logits, regions)
            total = total + w.prior * p_loss
        parts["loss"] = float(total.detach())
        return LossOutput(total=total, parts=parts)


class EncodeDenoise(nn.Module):
    """Encoder + denoiser as one ``forward`` so that DistributedDataParallel sees a single forward pass.

    ``forward(x_t [B,3,...], t [B], image [B,4,...]) -> (output [B,3,...], prior_logits [B,3,x,y,z] | None)``
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x_t: Tensor, t: Tensor, image: Tensor, external_prior: Tensor | None = None):
        cond = self.net.encode(image, external_prior)
        return self.net(x_t, t, cond), cond.prior_logits
