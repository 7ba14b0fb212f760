"""MONAI ``AttentionUnet`` (Oktay et al. 2018), trained like the U-Net; its attention gates are the map ``gate``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medseg_diff.kinds.base import ModelKind, Objective
from medseg_diff.kinds.segmenters import AttentionGateSegmenter, Segmenter
from medseg_diff.kinds.unet import SegmentationObjective, strides_rule
from medseg_diff.models import build_attention_unet

if TYPE_CHECKING:
    from medseg_diff.config import Config


class AttentionUNetKind(ModelKind):
    kind = "attention_unet"
    network_name = "MonaiAttentionUNet"
    network_factory = staticmethod(build_attention_unet)

    @staticmethod
    def network_spec(cfg: Config) -> dict[str, Any]:
        a = cfg.model.attention_unet
        return {"name": "MonaiAttentionUNet", "kwargs": {"in_channels": 4, "out_channels": 3,
                                                         "channels": list(a.channels), "strides": list(a.strides),
                                                         "dropout": a.dropout}}

    @classmethod
    def config_stride(cls, cfg: Config) -> tuple[int, str]:
        return strides_rule(cfg, "attention_unet")

    def segmenter(self, net, validation=False, seed=0) -> Segmenter:
        return AttentionGateSegmenter(net, name=self.kind, attention=not validation)

    def objective(self) -> Objective:
        return SegmentationObjective(self)


KIND = AttentionUNetKind
