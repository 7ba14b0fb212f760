"""MONAI's Attention U-Net (Oktay et al. 2018, "Attention U-Net: Learning Where to Look for the Pancreas").

A U-Net whose skip connections pass through additive attention gates: at each decoder level the gate
``psi = sigmoid(W_psi relu(W_g g + W_x x))`` (``[B, 1, *skip grid]``, in (0, 1)) scales the skip features ``x``
by where the coarser decoder signal ``g`` points. The gates are learned without supervision, from the
segmentation loss alone; ``gate_modules`` names the modules whose outputs are those gates, so that inference can
read them with forward hooks (``inference.sliding_window.AttentionGateSegmenter``).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import AttentionUnet
from monai.networks.nets.attentionunet import AttentionBlock
from torch import nn

from medseg_diff.models.baseline import baseline_stride


class AttentionUNet(AttentionUnet):
    """MONAI ``AttentionUnet``, 3D: ``[B, in_channels, X, Y, Z] -> [B, out_channels, X, Y, Z]`` logits.

    ``stride``: every spatial size must be a multiple of it (the product of ``strides``).
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 3, channels: Sequence[int] = (16, 32, 64, 128),
                 strides: Sequence[int] = (2, 2, 2), dropout: float = 0.0):
        if len(channels) < 2:
            raise ValueError(f"channels {tuple(channels)} needs at least 2 levels")
        if len(strides) != len(channels) - 1:
            raise ValueError(f"strides {tuple(strides)} needs one entry fewer than channels {tuple(channels)}")
        super().__init__(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=tuple(channels),
                         strides=tuple(strides), dropout=dropout)
        self.stride = baseline_stride(strides)

    def gate_modules(self) -> list[nn.Module]:
        """The ``psi`` branch of every attention gate (its output is the gate ``[B, 1, *grid]``), finest first."""
        return [m.psi for m in self.modules() if isinstance(m, AttentionBlock)]


def build_attention_unet(
    in_channels: int = 4,
    out_channels: int = 3,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    dropout: float = 0.0,
) -> AttentionUNet:
    """The Attention U-Net from a checkpoint's ``network`` kwargs (``kinds.attention_unet``)."""
    return AttentionUNet(in_channels, out_channels, channels, strides, dropout)
