"""Image encoder: multi-scale features of the 4 MRI modalities, the mask-prior head and the prior tokens.

Scale ``i`` has ``channels[i]`` channels at ``1/(patch * 2^i)`` of the input size: a strided stem
(:class:`~medseg_diff.models.blocks.StridedStem`) takes the image from its own grid to ``1/patch`` with no
full-resolution layer, so the encoder costs about what the plain U-Net does. ``patch = 1`` is the
full-resolution encoder (a 3x3x3 conv stem at the input grid). The coarsest scale, pooled to at most
``max_token_grid`` per axis, is the **token grid** ``(x, y, z)``; there the prior head predicts 3-channel region
logits (deep-supervision target: the [TC, WT, ET] masks average-pooled to the token grid, e.g.
``F.interpolate(mask, size=token_grid, mode="area")``), and the prior tokens are built, per ``token_source``:
``features``: ``tokens = Linear(concat(prior probabilities, coarse features)) + sinusoidal 3D position``;
``prior``: ``tokens = MLP(prior probabilities) + sinusoidal 3D position`` -- the tokens carry the prior and where
it is, and nothing of the image, so the image features (64 channels against the prior's 3) cannot drown it.
``token_level`` picks the encoder level whose grid (capped at ``max_token_grid``) the tokens and the prior head
use (default: the coarsest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from medseg_diff.models.blocks import Downsample3d, ResBlock3d, StridedStem, group_norm

PRIOR_CHANNELS = 3  # [TC, WT, ET]


def sinusoidal_position_embedding(
    grid: Sequence[int], dim: int, max_period: float = 100.0, device: torch.device | None = None
) -> Tensor:
    """Fixed sin/cos embedding of the integer coordinates of any grid, ``-> [M, dim]`` (M = prod(grid)).

    Each axis gets ``2 * ceil(dim / (2 * len(grid)))`` features (sin and cos at geometric frequencies from 1 to
    ``1 / max_period``); the concatenation is cut to ``dim``. Works for any grid size (no learned table).
    """
    half = math.ceil(dim / (2 * len(grid)))
    freqs = max_period ** (-torch.arange(half, device=device, dtype=torch.float32) / half)  # [half]
    axes = [torch.arange(s, device=device, dtype=torch.float32) for s in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))  # [M, ndim]
    args = rearrange(coords, "m a -> m a 1") * freqs  # [M, ndim, half]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)  # [M, ndim, 2*half]
    return rearrange(emb, "m a f -> m (a f)")[:, :dim]


def resample_to_grid(prior: Tensor, grid: Sequence[int]) -> Tensor:
    """Probabilities ``[B, C, *size]`` to ``[B, C, *grid]``: area average when shrinking, else trilinear."""
    size, grid = tuple(prior.shape[2:]), tuple(grid)
    if size == grid:
        return prior
    if all(s >= g for s, g in zip(size, grid)):
        return F.interpolate(prior, size=grid, mode="area")
    return F.interpolate(prior, size=grid, mode="trilinear", align_corners=False)


def _prior_head(channels: int, norm_groups: int) -> nn.Sequential:
    """Coarse features ``[B, C, x, y, z]`` -> region logits ``[B, 3, x, y, z]``."""
    return nn.Sequential(
        ResBlock3d(channels, channels, norm_groups=norm_groups),
        group_norm(channels, norm_groups),
        nn.SiLU(),
        nn.Conv3d(channels, PRIOR_CHANNELS, 1),
    )


class ImageEncoder(nn.Module):
    """Multi-scale 3D conv encoder of the image, with an optional prior head and prior-token projection.

    ``forward(image [B, in_channels, X, Y, Z]) -> ([features_i [B, channels[i], X/(p 2^i), ...]], detail)``,
    finest first (``p = patch``); ``detail`` is the stem's ``1/2``-resolution output (None at ``patch = 1``).
    """

    def __init__(
        self,
        in_channels: int = 4,
        channels: Sequence[int] = (32, 64, 128, 256),
        norm_groups: int = 8,
        blocks_per_scale: int = 1,
        prior_head: bool = True,
        token_dim: int | None = None,
        max_token_grid: int = 16,
        patch: int = 1,
        stem_channels: int = 16,
        token_source: str = "features",
        token_level: int = -1,
    ):
        super().__init__()
        channels = tuple(channels)
        self.token_source = token_source
        self.max_token_grid = max_token_grid
        self.patch = patch
        self.stem = (
            nn.Conv3d(in_channels, channels[0], 3, padding=1) if patch == 1
            else StridedStem(in_channels, channels[0], patch, stem_channels, norm_groups)
        )  # fmt: skip
        self.scales = nn.ModuleList()
        for i, ch in enumerate(channels):
            layers = [] if i == 0 else [Downsample3d(channels[i - 1], ch)]
            layers += [ResBlock3d(ch, ch, norm_groups=norm_groups) for _ in range(blocks_per_scale)]
            self.scales.append(nn.Sequential(*layers))
        coarse = channels[token_level]
        self.prior_head = _prior_head(coarse, norm_groups) if prior_head else None
        if token_dim is None:
            self.to_tokens = None
        elif token_source == "prior":
            self.to_tokens = nn.Sequential(
                nn.Linear(PRIOR_CHANNELS, token_dim), nn.SiLU(), nn.Linear(token_dim, token_dim)
            )
        else:
            self.to_tokens = nn.Linear(PRIOR_CHANNELS + coarse, token_dim)
        self.token_dim = token_dim

    def forward(self, image: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """``(features, detail)``: the multi-scale features, and the stem's ``1/2``-resolution detail features
        ``[B, stem_channels, X/2, Y/2, Z/2]`` (None at ``patch = 1``)."""
        if self.patch == 1:
            h, detail = self.stem(image), None
        else:
            h, detail = self.stem(image)
        features = []
        for scale in self.scales:
            h = scale(h)
            features.append(h)
        return features, detail

    def token_grid(self, coarse_size: Sequence[int]) -> tuple[int, ...]:
        """The token grid for a coarsest-scale size: that size, capped at ``max_token_grid`` per axis."""
        return tuple(min(int(s), self.max_token_grid) for s in coarse_size)

    def prior_logits(self, coarse: Tensor) -> Tensor:
        """Region logits ``[B, 3, *grid]`` from coarse features already at the token grid ``[B, C, *grid]``."""
        if self.prior_head is None:
            raise ValueError("this ImageEncoder was built without a prior head (prior_head=False)")
        return self.prior_head(coarse)

    def tokens(self, prior: Tensor, coarse: Tensor) -> Tensor:
        """Prior tokens ``[B, M, D]`` from ``prior [B, 3, *grid]`` and ``coarse [B, C, *grid]``."""
        if self.to_tokens is None:
            raise ValueError("this ImageEncoder was built without tokens (token_dim=None)")
        inputs = prior.to(coarse.dtype) if self.token_source == "prior" else torch.cat([prior.to(coarse.dtype), coarse], 1)
        stacked = rearrange(inputs, "b c ... -> b (...) c")
        position = sinusoidal_position_embedding(coarse.shape[2:], self.token_dim, device=coarse.device)
        return self.to_tokens(stacked) + position.to(stacked.dtype)
