"""Typed values that cross the boundary between the networks and the sampler / trainer.

The denoiser is ``forward(x_t, t, cond) -> Tensor``; ``cond`` is computed once per window by
``model.encode(image, external_prior)`` and reused by every DDIM step and every ensemble member.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """What the image encoder hands the denoiser. Computed once per window.

    features:     the image features of each denoiser level, already projected to its width, finest first;
                  ``[B, C_i, X/(s 2^i), Y/(s 2^i), Z/(s 2^i)]`` (``s`` the model's patch size)
    prior:        the mask prior at the token grid, probabilities ``[B, 3, x, y, z]`` (zeros for source "none")
    prior_logits: the prior head's logits ``[B, 3, x, y, z]`` for its deep-supervision loss (None unless source "head")
    tokens:       prior tokens for cross-attention ``[B, M, D]`` (M = x*y*z), or None when no cross-attention
    token_grid:   ``(x, y, z)`` of the token grid, to map attention over tokens back to space
    detail:       the image's ``1/2``-resolution detail features for the output head, already projected to its
                  width, ``[B, W, X/2, Y/2, Z/2]`` (None for the full-resolution model)
    full:         the image's features on the input grid for the once-per-member refiner ``[B, W', X, Y, Z]``
                  (None without a refiner)
    """

    features: list[Tensor]
    prior: Tensor | None = None
    prior_logits: Tensor | None = None
    tokens: Tensor | None = None
    token_grid: tuple[int, int, int] | None = None
    detail: Tensor | None = None
    full: Tensor | None = None

    def select(self, index: Tensor) -> "Conditioning":
        """The batch elements ``index`` (a 1-D index tensor), ``[B, ...] -> [len(index), ...]``."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return replace(
            self,
            features=[f[index] for f in self.features],
            prior=pick(self.prior),
            prior_logits=pick(self.prior_logits),
            tokens=pick(self.tokens),
            detail=pick(self.detail),
            full=pick(self.full),
        )

    def repeat(self, n: int) -> "Conditioning":
        """Each batch element repeated ``n`` times (ensemble members), ``[B, ...] -> [B*n, ...]``."""

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(n, dim=0)

        return replace(
            self,
            features=[f.repeat_interleave(n, dim=0) for f in self.features],
            prior=rep(self.prior),
            prior_logits=rep(self.prior_logits),
            tokens=rep(self.tokens),
            detail=rep(self.detail),
            full=rep(self.full),
        )


@dataclass
class DenoiserOutput:
    """Denoiser prediction plus attention maps.

    pred:      ``[B, 3, X, Y, Z]`` x0 logits (or eps / v, per the model's prediction type)
    attention: name -> ``[B, 1, X, Y, Z]`` float map at the input resolution, in units of "times the
               uniform share within this window" (1 = this voxel gets exactly the window's average attention; see
               models/attention.py); relative to the window, so whole volumes are stitched by
               ``inference.sliding_window.AttentionStitcher``
    """

    pred: Tensor
    attention: dict[str, Tensor] = field(default_factory=dict)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
