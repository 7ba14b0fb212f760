"""The conditional diffusion U-Net: denoises the 3-channel region mask ``x_t`` given image features and a prior.

The iterative part runs in a compact space: the full-resolution mask ``x_t [B, 3, X, Y, Z]`` is patched losslessly
(space-to-depth by ``patch = s``) to ``[B, 3 s^3, X/s, Y/s, Z/s]``, the U-Net runs at ``1/s``, and its output is
put back with depth-to-space ("simple diffusion", Hoogeboom et al. 2023). The diffused state stays the
full-resolution mask, so schedules, losses and DDIM are unchanged; ``s = 1`` is the full-resolution model.

Layout (``L = len(channels)`` levels, level ``i`` at ``1/(s 2^i)`` of the input size, ``stride = s 2^(L-1)``)::

    x_t -> space-to-depth -> stem -> [level i: + image features_i -> ResBlock x res_blocks -> attention_i
        -> skip_i -> downsample] ... -> mid (ResBlock, attention, ResBlock)
        -> [level i: concat skip_i -> ResBlock x res_blocks -> attention_i -> upsample] ... -> DetailHead
        -> [B, 3, X, Y, Z]

The :class:`DetailHead` goes from ``1/s`` to the input grid with pointwise layers only, through the image's
``1/2``-resolution detail features (computed once per window), so that edges finer than a patch are not lost.

``encode`` runs once per window: the image encoder, its features already projected to the denoiser's widths,
the prior and its tokens; every DDIM step and ensemble member reuses them. ``attention_i`` is linear
self-attention when ``i in linear_attention_levels`` and mask-prior cross-attention when
``i in cross_attention_levels`` (both, in that order, when in both). Every ResBlock gets the time embedding
(FiLM). The network knows nothing of noise schedules or of what its 3 output channels mean (x0 / eps / v).

Over 400 lines on purpose: the network and its documented constructor arguments (each a mechanism the audit
measures); its building blocks live in ``blocks``, ``encoder`` and ``attention``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg_diff.models.attention import LinearAttention3d, MaskPriorCrossAttention
from medseg_diff.models.blocks import (
    Downsample3d,
    ResBlock3d,
    TimeEmbedding,
    Upsample3d,
    as_timesteps,
    check_patch,
    depth_to_space,
    group_norm,
    space_to_depth,
)
from medseg_diff.models.encoder import PRIOR_CHANNELS, ImageEncoder, resample_to_grid
from medseg_diff.models.types import Conditioning, DenoiserOutput

PRIOR_SOURCES = ("head", "external", "optional", "none")
PRIOR_FLAG_CHANNELS = PRIOR_CHANNELS + 1  # "optional": the prior and a given/absent flag, as encoder inputs

# name -> list of raw maps of one kind at one level, each [B, 1, *grid]
MapCollector = dict[str, list[Tensor]]


class _Stage(nn.Module):
    """ResBlocks, then optional linear self-attention and cross-attention, then more ResBlocks (same width)."""

    def __init__(self, in_ch: int, out_ch: int, blocks: tuple[int, int], time_dim: int, level: int, opts: dict):
        super().__init__()
        before, after = blocks
        widths = [in_ch] + [out_ch] * (before + after)
        res = [
            ResBlock3d(a, b, time_dim, opts["norm_groups"], opts["dropout"]) for a, b in zip(widths[:-1], widths[1:])
        ]
        self.before, self.after = nn.ModuleList(res[:before]), nn.ModuleList(res[before:])
        self.level = level
        attn = dict(heads=opts["heads"], dim_head=opts["dim_head"], norm_groups=opts["norm_groups"])
        self.self_attn = LinearAttention3d(out_ch, **attn) if level in opts["linear_levels"] else None
        self.cross_attn = (
            MaskPriorCrossAttention(out_ch, opts["token_dim"], **attn) if level in opts["cross_levels"] else None
        )

    def forward(self, h: Tensor, temb: Tensor, cond: Conditioning, maps: MapCollector | None) -> Tensor:
        for block in self.before:
            h = block(h, temb)
        if self.self_attn is not None:
            h = self._self_attention(h, maps)
        if self.cross_attn is not None:
            h = self._cross_attention(h, cond, maps)
        for block in self.after:
            h = block(h, temb)
        return h

    def _self_attention(self, h: Tensor, maps: MapCollector | None) -> Tensor:
        if maps is None:
            return self.self_attn(h)
        h, attention = self.self_attn.forward_with_attention(h)
        maps.setdefault(f"self_l{self.level}", []).append(attention)
        return h

    def _cross_attention(self, h: Tensor, cond: Conditioning, maps: MapCollector | None) -> Tensor:
        if cond.tokens is None:
            raise ValueError("this model has cross-attention but cond.tokens is None; build cond with model.encode()")
        if maps is None:
            return self.cross_attn(h, cond.tokens)
        h, attention = self.cross_attn.forward_with_attention(h, cond.tokens, cond.token_grid)
        maps.setdefault(f"cross_l{self.level}", []).append(attention)
        return h


class DetailHead(nn.Module):
    """Output head of the compact model (``s >= 2``): from the last features at ``1/s`` to mask logits on the
    input grid, with pointwise layers only above ``1/s`` (11 % of the FLOPs of a denoiser pass with base.yaml):

    1. lift: a pointwise MLP of ``[h, image features]`` at ``1/s`` to ``(s/2)^3 * width`` channels,
       depth-to-space to ``1/2``
    2. add the image's ``1/2``-resolution detail features (the encoder's stem, computed once per window), so that
       edges finer than a patch reach the output
    3. a pointwise MLP to the ``2^3 x 3`` logits of each ``2^3`` block, depth-to-space to the input grid

    ``h, image [B, C, x, y, z]``, ``detail [B, width, s x/2, s y/2, s z/2]`` ``-> [B, 3, s x, s y, s z]``.
    """

    def __init__(self, channels: int, out_channels: int, patch: int, width: int, norm_groups: int = 8):
        super().__init__()
        self.patch = patch
        self.lift = nn.Sequential(
            group_norm(2 * channels, norm_groups), nn.SiLU(), nn.Conv3d(2 * channels, (patch // 2) ** 3 * width, 1)
        )
        self.out = nn.Sequential(
            group_norm(width, norm_groups), nn.SiLU(), nn.Conv3d(width, 2 * width, 1), nn.SiLU(),
            nn.Conv3d(2 * width, 8 * out_channels, 1),
        )  # fmt: skip
        nn.init.zeros_(self.out[-1].weight)  # start at logits 0 (p = 0.5) everywhere
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, h: Tensor, image: Tensor, detail: Tensor) -> Tensor:
        z = depth_to_space(self.lift(torch.cat([h, image], dim=1)), self.patch // 2) + detail
        return depth_to_space(self.out(z), 2)


class Refiner(nn.Module):
    """Full-resolution refinement of x0 logits, run **once per member** after the last DDIM step (and on every
    training prediction), never inside a step: the denoiser's 1/s grid leaves outlines blocky at the patch size.

    ``image`` features (one 3x3x3 conv of the 4 modalities at the input grid, and ``context`` residual 3x3x3 convs
    after it, computed once per window in ``encode`` by :meth:`features`) and the x0 estimate ``2σ(logits) - 1``
    pass two 3x3x3 convs; the result is added to the logits (zero at initialisation, so an untrained refiner
    changes nothing). ``logits [B, 3, X, Y, Z]``,
    ``features [B, width, X, Y, Z]`` ``-> [B, 3, X, Y, Z]``.
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 3, width: int = 8, context: int = 0):
        super().__init__()
        self.image = nn.Conv3d(in_channels, width, 3, padding=1)
        self.context = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv3d(width, width, 3, padding=1)) for _ in range(context))
        self.body = nn.Sequential(
            nn.SiLU(), nn.Conv3d(width + out_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv3d(width, out_channels, 3, padding=1),
        )  # fmt: skip
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def features(self, image: Tensor) -> Tensor:
        """The image's features on the input grid, once per window: ``[B, >= 4, X, Y, Z] -> [B, width, ...]``."""
        features = self.image(image[:, : self.image.in_channels])
        for layer in self.context:
            features = features + layer(features)
        return features

    def forward(self, logits: Tensor, features: Tensor) -> Tensor:
        estimate = 2.0 * torch.sigmoid(logits.float()) - 1.0
        return logits + self.body(torch.cat([features, estimate.to(features.dtype)], dim=1)).to(logits.dtype)


def _validate_levels(name: str, levels: Sequence[int], n_levels: int) -> tuple[int, ...]:
    levels = tuple(int(i) for i in levels)
    bad = [i for i in levels if not 0 <= i < n_levels]
    if bad:
        raise ValueError(f"{name}={levels}: levels must be in 0..{n_levels - 1} for {n_levels} channel levels")
    return levels


class DiffusionSegUNet(nn.Module):
    """Conditional 3D diffusion U-Net over the region mask with linear self- and mask-prior cross-attention.

    ``encode(image, external_prior) -> Conditioning`` once per window; ``forward(x_t, t, cond) -> [B, 3, X, Y, Z]``;
    ``forward_with_attention`` also returns attention maps ``[B, 1, X, Y, Z]`` named ``self_l{i}``, ``cross_l{i}``
    and the aggregates ``self`` / ``cross`` (mean over levels). Spatial sizes must be multiples of ``stride``.

    ``patch_size`` (s) is the denoiser's (and image encoder's) downsampling from the input grid; ``channels``
    are the denoiser's widths per level, ``encoder_channels`` the encoder's (default: the same), and
    ``stem_channels`` the width of the encoder's strided stem between the input grid and ``1/s``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64),
        res_blocks: int = 1,
        linear_attention_levels: Sequence[int] = (0, 1),
        cross_attention_levels: Sequence[int] = (2,),
        heads: int = 4,
        dim_head: int = 16,
        prior_source: str = "head",
        time_dim: int | None = None,
        norm_groups: int = 8,
        encoder_channels: Sequence[int] | None = None,
        max_token_grid: int = 16,
        dropout: float = 0.0,
        patch_size: int = 4,
        stem_channels: int = 16,
        self_condition: bool = False,
        token_source: str = "features",
        token_level: int = -1,
        refine: bool = False,
        refine_width: int | None = None,
        refine_context: int = 0,
    ):
        super().__init__()
        check_patch(patch_size)
        if prior_source not in PRIOR_SOURCES:
            raise ValueError(f"prior_source must be one of {PRIOR_SOURCES}, got {prior_source!r}")
        channels = tuple(channels)
        enc_channels = tuple(encoder_channels or channels)
        if len(enc_channels) != len(channels):
            raise ValueError(f"encoder_channels {enc_channels} needs one width per level of channels {channels}")
        n = len(channels)
        if token_source not in ("features", "prior"):
            raise ValueError(f"token_source must be 'features' or 'prior', got {token_source!r}")
        if not -n <= token_level < n:
            raise ValueError(f"token_level={token_level}: must index one of the {n} encoder levels")
        self.prior_source = prior_source
        self.self_condition = self_condition
        self.token_level = token_level % n
        self.channels = channels
        self.patch_size = patch_size
        self.linear_attention_levels = _validate_levels("linear_attention_levels", linear_attention_levels, n)
        self.cross_attention_levels = _validate_levels("cross_attention_levels", cross_attention_levels, n)
        token_dim = enc_channels[-1] if self.cross_attention_levels else None
        time_dim = time_dim or 4 * channels[0]
        opts = dict(
            norm_groups=norm_groups, dropout=dropout, heads=heads, dim_head=dim_head, token_dim=token_dim,
            linear_levels=self.linear_attention_levels, cross_levels=self.cross_attention_levels,
        )  # fmt: skip

        self.encoder = ImageEncoder(
            in_channels + (PRIOR_FLAG_CHANNELS if prior_source == "optional" else 0), enc_channels, norm_groups,
            prior_head=prior_source in ("head", "optional"), token_dim=token_dim, max_token_grid=max_token_grid,
            patch=patch_size, stem_channels=stem_channels, token_source=token_source, token_level=self.token_level,
        )  # fmt: skip
        self.time = TimeEmbedding(channels[0], time_dim)
        # s = 1: a 3x3x3 stem and head (the full-resolution model); s > 1: a pointwise stem on the s^3 x 3
        # channels of each patch, and the detail head
        kernel = 3 if patch_size == 1 else 1
        stem_in = out_channels * patch_size**3 * (2 if self_condition else 1)  # x_t (and the last x0 estimate)
        self.stem = nn.Conv3d(stem_in, channels[0], kernel, padding=kernel // 2)
        self.fuse = nn.ModuleList(nn.Conv3d(e, c, 1) for e, c in zip(enc_channels, channels))
        self.down = nn.ModuleList(_Stage(c, c, (res_blocks, 0), time_dim, i, opts) for i, c in enumerate(channels))
        self.downsample = nn.ModuleList(Downsample3d(a, b) for a, b in zip(channels[:-1], channels[1:]))
        self.mid = _Stage(channels[-1], channels[-1], (1, 1), time_dim, n - 1, opts)
        self.up = nn.ModuleList(_Stage(2 * c, c, (res_blocks, 0), time_dim, i, opts) for i, c in enumerate(channels))
        self.upsample = nn.ModuleList(Upsample3d(b, a) for a, b in zip(channels[:-1], channels[1:]))
        width = refine_width if refine_width is not None else (stem_channels // 2 or 1)
        self.refiner = Refiner(in_channels, out_channels, width, refine_context) if refine else None
        if patch_size == 1:
            self.detail = None
            self.head = nn.Sequential(
                group_norm(channels[0], norm_groups), nn.SiLU(), nn.Conv3d(channels[0], out_channels, 3, padding=1)
            )
        else:
            self.detail = nn.Conv3d(stem_channels, stem_channels, 1)  # once per window, in encode()
            self.head = DetailHead(channels[0], out_channels, patch_size, stem_channels, norm_groups)

    @property
    def stride(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return self.patch_size * 2 ** (len(self.channels) - 1)

    def check_size(self, spatial: Sequence[int]) -> None:
        """Raise a ``ValueError`` naming the size unless every axis is a positive multiple of ``stride``."""
        if len(spatial) != 3 or any(s <= 0 or s % self.stride for s in spatial):
            raise ValueError(f"spatial size {tuple(spatial)} must be 3 positive multiples of the stride {self.stride}")

    # -- conditioning -------------------------------------------------------------------------------------------
    def encode(self, image: Tensor, external_prior: Tensor | None = None) -> Conditioning:
        """Run the image encoder once: ``image [B, 4, X, Y, Z]`` (and, for prior source "external" or
        "optional", probabilities ``[B or 1, 3, X', Y', Z']`` of any size) ``-> Conditioning`` reusable by every
        step and ensemble member. Source "optional" takes the prior (or its absence) as 4 more encoder inputs
        (the prior on the window's grid and a flag that says whether one was given), so one model works with and
        without a prior."""
        self.check_size(image.shape[2:])
        if self.prior_source == "optional":
            image = torch.cat([image, self._optional_prior_input(external_prior, image)], dim=1)
            external_prior = None  # it reached the prior head through the encoder
        features, detail = self.encoder(image)
        source = features[self.token_level]
        grid = self.encoder.token_grid(source.shape[2:])
        coarse = resample_to_grid(source, grid)
        prior, logits = self._prior(coarse, external_prior)
        tokens = self.encoder.tokens(prior, coarse) if self.cross_attention_levels else None
        fused = [fuse(f) for fuse, f in zip(self.fuse, features)]  # to the denoiser's widths, once per window
        detail = None if self.detail is None else self.detail(detail)
        full = None if self.refiner is None else self.refiner.features(image)
        return Conditioning(features=fused, prior=prior, prior_logits=logits, tokens=tokens, token_grid=grid,
                            detail=detail, full=full)

    @property
    def refines(self) -> bool:
        """Whether x0 logits are refined at full resolution once per member (:class:`Refiner`)."""
        return self.refiner is not None

    def refine(self, logits: Tensor, cond: Conditioning) -> Tensor:
        """x0 logits (the scheduler's, skip included) ``[B, 3, X, Y, Z]`` refined at full resolution; identity for
        a model without a refiner."""
        if self.refiner is None:
            return logits
        return self.refiner(logits, cond.full)

    def _prior(self, coarse: Tensor, external_prior: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(prior probabilities [B, 3, *grid], prior logits or None)`` for the configured source."""
        if self.prior_source != "external" and external_prior is not None:
            raise ValueError(f"an external prior was given but prior_source is {self.prior_source!r}, not 'external'")
        if self.prior_source in ("head", "optional"):
            logits = self.encoder.prior_logits(coarse)
            return torch.sigmoid(logits), logits
        if self.prior_source == "none":
            return coarse.new_zeros(coarse.shape[0], PRIOR_CHANNELS, *coarse.shape[2:]), None
        return self._external_prior(external_prior, coarse), None

    @staticmethod
    def _optional_prior_input(prior: Tensor | None, image: Tensor) -> Tensor:
        """``[B, 4, X, Y, Z]``: the prior on the image's grid and a flag channel (1 given, 0 absent). A prior of
        4 channels already carries its flag per case (training mixes cases with and without a prior)."""
        batch, size = image.shape[0], image.shape[2:]
        if prior is None:
            return image.new_zeros(batch, PRIOR_FLAG_CHANNELS, *size)
        if prior.ndim != 5 or prior.shape[1] not in (PRIOR_CHANNELS, PRIOR_FLAG_CHANNELS) or \
                prior.shape[0] not in (1, batch):
            raise ValueError(f"external_prior must be [{batch} or 1, 3, X', Y', Z'], got {tuple(prior.shape)}")
        if not torch.isfinite(prior).all() or prior.min() < 0 or prior.max() > 1:
            raise ValueError("external_prior must hold finite probabilities in [0, 1] (not labels or logits)")
        prior = resample_to_grid(prior.to(image.dtype), size).expand(batch, -1, -1, -1, -1)
        if prior.shape[1] == PRIOR_FLAG_CHANNELS:
            return prior
        return torch.cat([prior, prior.new_ones(batch, 1, *size)], dim=1)

    @staticmethod
    def _external_prior(prior: Tensor | None, coarse: Tensor) -> Tensor:
        if prior is None:
            raise ValueError(
                "prior_source is 'external' but no external_prior was given: pass encode(image, external_prior=p) "
                "with p the region probabilities [B, 3, X', Y', Z'] (e.g. the baseline's prediction)"
            )
        batch = coarse.shape[0]
        if prior.ndim != 5 or prior.shape[1] != PRIOR_CHANNELS or prior.shape[0] not in (1, batch):
            raise ValueError(f"external_prior must be [{batch} or 1, 3, X', Y', Z'], got {tuple(prior.shape)}")
        if not torch.isfinite(prior).all() or prior.min() < 0 or prior.max() > 1:
            raise ValueError("external_prior must hold finite probabilities in [0, 1] (not labels or logits)")
        prior = resample_to_grid(prior.to(coarse.dtype), coarse.shape[2:])
        return prior.expand(batch, -1, -1, -1, -1)

    # -- denoising ----------------------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor | int | float, cond: Conditioning,
                self_cond: Tensor | None = None) -> Tensor:
        """``x_t [B, 3, X, Y, Z]``, ``t`` timesteps ``[B]`` (0..999, int or float) -> prediction ``[B, 3, X, Y, Z]``.

        ``self_cond``: the previous x0 estimate in [-1, 1] ``[B, 3, X, Y, Z]`` for a self-conditioned model
        (Chen et al. 2022, "Analog Bits"); None = zeros (the first step). Ignored unless ``self_condition``."""
        return self._denoise(x_t, t, cond, None, self_cond)

    def forward_with_attention(self, x_t: Tensor, t: Tensor | int | float, cond: Conditioning,
                               self_cond: Tensor | None = None, in_space: bool = True) -> DenoiserOutput:
        """Prediction plus attention maps ``[B, 1, X, Y, Z]`` in "times uniform within this window" units (mean
        about 1 over the window; see ``models/attention.py``). ``in_space=False`` returns the raw per-level maps
        instead (``cross_l{i}`` on the token grid ``[B, 1, *token_grid]``, ``self_l{i}`` on level i's grid, each
        a list over the stages of that level), differentiable, for a loss on them."""
        maps: MapCollector = {}
        pred = self._denoise(x_t, t, cond, maps, self_cond)
        if not in_space:
            return DenoiserOutput(pred=pred, attention={k: torch.stack(v).mean(0) for k, v in maps.items()})
        return DenoiserOutput(pred=pred, attention=self._maps_in_space(maps, x_t.shape[2:]))

    def _denoise(self, x_t: Tensor, t: Tensor | int | float, cond: Conditioning, maps: MapCollector | None,
                 self_cond: Tensor | None = None) -> Tensor:
        self._check_inputs(x_t, cond)
        temb = self.time(as_timesteps(t, x_t.shape[0], x_t.device))
        state = x_t
        if self.self_condition:
            state = torch.cat([x_t, torch.zeros_like(x_t) if self_cond is None else self_cond.to(x_t.dtype)], dim=1)
        h, skips = self.stem(space_to_depth(state, self.patch_size)), []
        for i, stage in enumerate(self.down):
            h = stage(h + cond.features[i], temb, cond, maps)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, temb, cond, maps)
        for i in reversed(range(len(self.up))):
            h = self.up[i](torch.cat([h, skips[i]], dim=1), temb, cond, maps)
            if i > 0:
                h = self.upsample[i - 1](h)
        if self.detail is None:
            return self.head(h)
        return self.head(h, cond.features[0], cond.detail)

    def _check_inputs(self, x_t: Tensor, cond: Conditioning) -> None:
        self.check_size(x_t.shape[2:])
        feat = cond.features[0]
        grid = tuple(n // self.patch_size for n in x_t.shape[2:])
        if feat.shape[0] != x_t.shape[0] or tuple(feat.shape[2:]) != grid:
            raise ValueError(
                f"x_t {tuple(x_t.shape)} does not match the conditioning {tuple(feat.shape)} in batch or size; "
                "for n ensemble members per image use cond.repeat(n)"
            )

    @staticmethod
    def _maps_in_space(maps: MapCollector, size: Sequence[int]) -> dict[str, Tensor]:
        """Per level: mean of that level's maps (e.g. its down and up stages) upsampled trilinearly to ``size``;
        plus ``self``/``cross``, the means over levels. Every map keeps mean about 1 over the window."""
        def to_space(m: Tensor) -> Tensor:
            return F.interpolate(m.float(), size=tuple(size), mode="trilinear", align_corners=False)

        out = {name: torch.stack([to_space(m) for m in group]).mean(0) for name, group in sorted(maps.items())}
        for kind in ("self", "cross"):
            levels = [m for name, m in out.items() if name.startswith(f"{kind}_l")]
            if levels:
                out[kind] = torch.stack(levels).mean(0)
        return out
