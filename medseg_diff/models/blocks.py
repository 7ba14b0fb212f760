"""Building blocks of the 3D denoiser and image encoder: normalisation, time embedding, residual blocks.

Shapes use ``B`` batch, ``C`` channels, ``X, Y, Z`` space; ``T`` the time-embedding width.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn


def group_norm(channels: int, groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count ``<= groups`` that divides ``channels``."""
    return nn.GroupNorm(math.gcd(channels, groups), channels)


def space_to_depth(x: Tensor, patch: int) -> Tensor:
    """Lossless patching: ``[B, C, X, Y, Z] -> [B, C*p^3, X/p, Y/p, Z/p]`` (identity for ``p = 1``).

    Each ``p^3`` block of voxels becomes one position with ``C*p^3`` channels (pixel unshuffle; "simple
    diffusion", Hoogeboom et al. 2023). :func:`depth_to_space` is its exact inverse.
    """
    if patch == 1:
        return x
    return rearrange(x, "b c (x p) (y q) (z r) -> b (c p q r) x y z", p=patch, q=patch, r=patch)


def depth_to_space(x: Tensor, patch: int) -> Tensor:
    """Inverse of :func:`space_to_depth`: ``[B, C*p^3, x, y, z] -> [B, C, x*p, y*p, z*p]``."""
    if patch == 1:
        return x
    return rearrange(x, "b (c p q r) x y z -> b c (x p) (y q) (z r)", p=patch, q=patch, r=patch)


def as_timesteps(t: Tensor | int | float, batch: int, device: torch.device) -> Tensor:
    """Timesteps as a float tensor ``[B]``: accepts a Python number, a 0-d tensor or a ``[B]`` tensor."""
    t = torch.as_tensor(t, device=device, dtype=torch.float32)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or of shape [{batch}], got {tuple(t.shape)}")
    return t


# Not MONAI's get_timestep_embedding: it returns [cos, sin], ours [sin, cos], the order checkpoints' time MLPs expect
class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of (integer or float) timesteps, ``[B] -> [B, dim]``.

    ``emb[:, i] = sin(t * f_i)``, ``emb[:, dim/2 + i] = cos(t * f_i)`` with ``f_i = max_period^(-i / (dim/2))``
    (DDPM, Ho et al. 2020, appendix B). Timesteps are on the scheduler's scale (0..999).
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        self.dim = dim
        self.max_period = max_period

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        exponent = torch.arange(half, device=t.device, dtype=torch.float32) / half
        freqs = self.max_period ** (-exponent)  # [dim/2]
        args = rearrange(t.float(), "b -> b 1") * rearrange(freqs, "f -> 1 f")
        return torch.cat([args.sin(), args.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by an MLP: ``[B] -> [B, time_dim]``."""

    def __init__(self, base_dim: int, time_dim: int):
        super().__init__()
        self.sinusoid = SinusoidalTimeEmbedding(base_dim)
        self.mlp = nn.Sequential(nn.Linear(base_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoid(t))


# Not MONAI's DiffusionUNetResnetBlock: it adds Linear(silu(temb)) before norm2 (ours: FiLM scale+shift after norm2)
class ResBlock3d(nn.Module):
    """Pre-activation residual block with FiLM time conditioning.

    ``h = conv1(silu(norm1(x)))``; ``h = norm2(h) * (1 + scale) + shift`` with ``(scale, shift)`` from the time
    embedding; ``out = conv2(silu(h)) + skip(x)`` where ``skip`` is a 1x1 conv when the width changes.
    ``x [B, in_ch, X, Y, Z]``, ``temb [B, time_dim]`` (omit both ``time_dim`` and ``temb`` for a plain block)
    ``-> [B, out_ch, X, Y, Z]``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        time_dim: int | None = None,
        norm_groups: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = group_norm(in_ch, norm_groups)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, norm_groups)
        self.film = None if time_dim is None else nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_ch))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv3d(in_ch, out_ch, 1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            if temb is None:
                raise ValueError("this ResBlock3d was built with time_dim; pass the time embedding")
            scale, shift = rearrange(self.film(temb), "b (two c) -> two b c 1 1 1", two=2)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(self.act(h)))
        return h + self.skip(x)


# Not MONAI's DiffusionUnetDownsample(use_conv=True): the same conv, but its keys are op.conv.*, checkpoints' conv.*
class Downsample3d(nn.Module):
    """Strided 3x3x3 conv halving every spatial size: ``[B, in_ch, X, Y, Z] -> [B, out_ch, X/2, Y/2, Z/2]``."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


# Not MONAI's WrappedUpsample (nearest, post_conv): same maths, but its keys are postconv.conv.*, checkpoints' conv.*
class Upsample3d(nn.Module):
    """Nearest x2 then 3x3x3 conv: ``[B, in_ch, X, Y, Z] -> [B, out_ch, 2X, 2Y, 2Z]``."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class StridedStem(nn.Module):
    """The image encoder's way from the input grid down to ``1/patch`` (``patch >= 2``), with no full-resolution
    layer: a strided 3x3x3 conv to ``1/2`` and a residual block there (the **detail features**, ``width``
    channels, which the output head reads), then one strided 3x3x3 conv per further halving (a residual block
    between them), or a pointwise conv when ``patch = 2``.

    ``forward(x [B, in_ch, X, Y, Z]) -> (features [B, out_ch, X/patch, ...], detail [B, width, X/2, ...])``.
    """

    def __init__(self, in_ch: int, out_ch: int, patch: int = 4, width: int = 16, norm_groups: int = 8):
        super().__init__()
        halvings = check_patch(patch)
        if halvings == 0:
            raise ValueError("StridedStem needs patch >= 2; at patch 1 the stem is a plain 3x3x3 conv")
        self.to_half = nn.Sequential(
            nn.Conv3d(in_ch, width, 3, stride=2, padding=1), ResBlock3d(width, width, norm_groups=norm_groups)
        )
        layers: list[nn.Module] = [nn.Conv3d(width, out_ch, 1)] if halvings == 1 else []
        for i in range(1, halvings):
            last = i == halvings - 1
            layers.append(nn.Conv3d(width, out_ch if last else width, 3, stride=2, padding=1))
            if not last:
                layers.append(ResBlock3d(width, width, norm_groups=norm_groups))
        self.rest = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        detail = self.to_half(x)
        return self.rest(detail), detail


def check_patch(patch: int) -> int:
    """``log2(patch)``; raises ``ValueError`` unless ``patch`` is a power of two >= 1."""
    if not isinstance(patch, int) or patch < 1 or patch & (patch - 1):
        raise ValueError(f"patch_size must be a power of two (1, 2, 4, ...), got {patch!r}")
    return patch.bit_length() - 1
