"""The plain 3D U-Net (MONAI ``UNet``): sigmoid of its logits, entropy as uncertainty, Dice + BCE."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import nn

from medseg_diff.diffusion.loss import LossOutput, segmentation_loss
from medseg_diff.kinds.base import ModelKind, Objective, loss_weights
from medseg_diff.kinds.segmenters import Segmenter, UNetSegmenter
from medseg_diff.models import build_baseline_unet

if TYPE_CHECKING:
    from medseg_diff.config import Config


class SegmentationObjective:
    """A network trained directly for segmentation: Dice + BCE on its logits."""

    def __init__(self, kind: ModelKind):
        self.adapter, self.weights = kind, loss_weights(kind.cfg)

    def train_module(self) -> nn.Module:
        return self.adapter.net

    def loss(self, module, image, regions, generator=None) -> LossOutput:
        total, parts = segmentation_loss(module(image), regions, self.weights)
        parts["loss"] = float(total.detach())
        return LossOutput(total, parts)


def strides_rule(cfg: Config, section: str) -> tuple[int, str]:
    """The U-Nets' stride: the product of ``model.SECTION.strides`` (``models.baseline.baseline_stride``)."""
    strides = getattr(cfg.model, section).strides
    return math.prod(strides), f"the product of model.{section}.strides {list(strides)}"


class UNetKind(ModelKind):
    kind = "unet"
    network_name = "MonaiUNet"
    network_factory = staticmethod(build_baseline_unet)

    @staticmethod
    def network_spec(cfg: Config) -> dict[str, Any]:
        u = cfg.model.unet
        return {"name": "MonaiUNet", "kwargs": {"in_channels": 4, "out_channels": 3, "channels": list(u.channels),
                                                "strides": list(u.strides), "num_res_units": u.num_res_units,
                                                "dropout": u.dropout}}

    @classmethod
    def config_stride(cls, cfg: Config) -> tuple[int, str]:
        return strides_rule(cfg, "unet")

    def segmenter(self, net, validation=False, seed=0) -> Segmenter:
        return UNetSegmenter(net, name=self.kind)

    def objective(self) -> Objective:
        return SegmentationObjective(self)


KIND = UNetKind
