"""The baseline: MONAI's plain 3D U-Net (no attention, no diffusion) mapping 4 modalities to 3 region logits."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.networks.nets import UNet


def baseline_stride(strides: Sequence[int]) -> int:
    """The multiple every spatial size must be for a U-Net with these down-sampling strides."""
    return math.prod(int(s) for s in strides)


def build_baseline_unet(
    in_channels: int = 4,
    out_channels: int = 3,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    dropout: float = 0.0,
) -> UNet:
    """MONAI ``UNet``: ``[B, in_channels, X, Y, Z] -> [B, out_channels, X, Y, Z]`` logits.

    The returned module carries ``stride`` (int): spatial sizes must be multiples of it.
    """
    if len(strides) != len(channels) - 1:
        raise ValueError(f"strides {tuple(strides)} needs one entry fewer than channels {tuple(channels)}")
    net = UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        dropout=dropout,
    )
    net.stride = baseline_stride(strides)
    return net
