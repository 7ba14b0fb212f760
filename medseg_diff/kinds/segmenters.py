"""Segmenters: how each model kind turns a batch of windows into probabilities, uncertainty and attention maps
(``inference.sliding_window.infer_volume`` stitches them over a whole volume)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg_diff.diffusion.sampler import DDIMSampler, binary_entropy

PROBS, ENTROPY, VARIANCE = "probs", "entropy", "variance"
ATTENTION_PREFIX = "attention_"


class Segmenter(Protocol):
    """``windows [b, 4 (+3 prior), x, y, z] -> {"probs": [b,3,...], "entropy": [b,1,...], ...}``."""

    name: str
    has_prior_input: bool

    def __call__(self, windows: Tensor) -> dict[str, Tensor]: ...


class UNetSegmenter:
    """The baseline: sigmoid of the U-Net's logits; uncertainty is the entropy of those probabilities."""

    has_prior_input = False

    def __init__(self, net: nn.Module, name: str = "unet"):
        self.net, self.name = net, name

    @torch.no_grad()
    def __call__(self, windows: Tensor) -> dict[str, Tensor]:
        probs = torch.sigmoid(self.net(windows).float())
        return {PROBS: probs, ENTROPY: binary_entropy(probs).sum(dim=1, keepdim=True)}


class AttentionGateSegmenter(UNetSegmenter):
    """MONAI's Attention U-Net: as the U-Net, plus its attention gates as the map ``gate``.

    Each gate (the sigmoid output of an ``AttentionBlock``'s ``psi``, ``[b, 1, *level grid]`` in (0, 1)) is read
    with a forward hook, upsampled trilinearly to the window, averaged over the levels and divided by its mean over
    the window: "times uniform within the window" like the diffusion model's maps, which ``infer_volume``
    stitches the same way. ``attention=False`` (validation) skips the maps.
    """

    def __init__(self, net: nn.Module, name: str = "attention_unet", attention: bool = True):
        super().__init__(net, name)
        self.attention = attention

    @torch.no_grad()
    def __call__(self, windows: Tensor) -> dict[str, Tensor]:
        if not self.attention:
            return super().__call__(windows)
        gates: list[Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _in, out: gates.append(out)) for m in self.net.gate_modules()]
        try:
            maps = super().__call__(windows)
        finally:
            for hook in hooks:
                hook.remove()
        size = tuple(windows.shape[2:])
        gate = torch.stack([F.interpolate(g.float(), size=size, mode="trilinear", align_corners=False)
                            for g in gates]).mean(0)  # [b, 1, *roi]
        mean = gate.mean(dim=tuple(range(2, gate.dim())), keepdim=True)
        maps[ATTENTION_PREFIX + "gate"] = gate / mean.clamp_min(torch.finfo(torch.float32).tiny)
        return maps


class DiffusionSegmenter:
    """DDIM ensemble per window; the encoder runs once per window (inside the sampler).

    Attention maps: the aggregates ``self`` (linear self-attention, mean over levels) and ``cross``
    (mask-prior cross-attention); ``attention_levels=True`` also keeps the per-level maps (``self_l1``, ...).
    Per window they are in "times uniform within this window" units (mean 1 over the window; see
    ``models/attention.py``); ``infer_volume`` stitches them into whole-volume maps (:class:`AttentionStitcher`).
    """

    def __init__(self, net: nn.Module, sampler: DDIMSampler, name: str = "diffusion", external_prior: bool = False,
                 attention: bool = True, attention_levels: bool = False):
        self.net, self.sampler, self.name = net, sampler, name
        self.has_prior_input = external_prior
        self.attention = attention
        self.attention_levels = attention_levels

    @torch.no_grad()
    def __call__(self, windows: Tensor) -> dict[str, Tensor]:
        # an external prior travels as 3 more channels: required (source "external") or optional ("optional")
        image, prior = (windows[:, :4], windows[:, 4:7]) if windows.shape[1] > 4 else (windows, None)
        out = self.sampler.sample(self.net, image, external_prior=prior, attention=self.attention)
        maps = {PROBS: out.probs, ENTROPY: out.entropy, VARIANCE: out.variance}
        maps.update({ATTENTION_PREFIX + k: v for k, v in out.attention.items()
                     if self.attention_levels or "_l" not in k})
        return maps
