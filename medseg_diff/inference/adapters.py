"""Model adapters: everything that differs between the model kinds (diffusion, U-Net, Attention U-Net), in one place.

An adapter owns, for one model kind:

* the network: its own constructor arguments (``network_spec``, stored in every checkpoint next to the
  weights) and how it is built from them (``build_network``: ``NETWORKS[name](**kwargs)``);
* the ``Segmenter`` that turns a batch of windows into probabilities, uncertainty and attention maps;
* the mask prior: whether the network takes an external prior as input (``external_prior``), the rough
  outline that stands in for it during training (``training_prior``), and the check that a caller passes one
  exactly when the model needs it (``check_prior``);
* whether training keeps an EMA of the weights for inference (``uses_ema``).

The trainer, inference and evaluation are generic; training adds only the loss (``training.objectives``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg_diff.config import Config
from medseg_diff.diffusion.sampler import DDIMSampler
from medseg_diff.diffusion.schedules import build_scheduler
from medseg_diff.errors import DataError
from medseg_diff.inference.sliding_window import AttentionGateSegmenter, DiffusionSegmenter, Segmenter, UNetSegmenter
from medseg_diff.models import DiffusionSegUNet, build_attention_unet, build_baseline_unet

#: Network constructors by the name a checkpoint's ``network`` entry gives.
NETWORKS: dict[str, Any] = {"DiffusionSegUNet": DiffusionSegUNet, "MonaiUNet": build_baseline_unet,
                            "MonaiAttentionUNet": build_attention_unet}


def build_network(spec: dict[str, Any], source: str | Path | None = None) -> nn.Module:
    """``NETWORKS[spec["name"]](**spec["kwargs"])``; a spec this version cannot build is refused by name."""
    name = spec.get("name") if isinstance(spec, dict) else spec
    try:
        factory = NETWORKS[name]
        return factory(**spec["kwargs"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(source, f"cannot build the network {name!r} from the checkpoint's "
                                f"arguments ({type(err).__name__}: {err})") from err


class ModelAdapter(ABC):
    """What the generic stages ask of a model kind. Subclasses set ``kind``, ``uses_ema`` and ``network_spec``."""

    kind: str = ""
    uses_ema: bool = False
    external_prior: bool = False  # the network needs an external prior
    optional_prior: bool = False  # the network works without one and takes one when given

    def __init__(self, cfg: Config, net: nn.Module | None = None):
        self.cfg = cfg
        self.spec = self.network_spec(cfg)
        self.net = net if net is not None else build_network(self.spec)

    @staticmethod
    @abstractmethod
    def network_spec(cfg: Config) -> dict[str, Any]:
        """The network's constructor arguments ``{"name", "kwargs"}`` (stored in checkpoints)."""

    @property
    def stride(self) -> int:
        """Every spatial size the network sees must be a multiple of this."""
        return int(self.net.stride)

    @abstractmethod
    def segmenter(self, net: nn.Module, validation: bool = False, seed: int = 0) -> Segmenter:
        """Windows → probabilities, uncertainty (and attention) for whole-volume inference."""

    def training_prior(self, regions: Tensor, generator: torch.Generator | None = None,
                       validation: bool = False) -> Tensor | None:
        """The prior input during training and validation: None unless the network takes an external prior;
        for an optional prior, a mix of none and priors of varying quality in training, none in validation."""
        if self.optional_prior:
            return None if validation else simulated_priors(regions, generator, self.cfg.diffusion.prior_none)
        return simulated_prior(regions, generator) if self.external_prior else None

    def check_prior(self, has_prior: bool, where: str | Path | None, case: str | None = None) -> None:
        """Refuse a prior the network does not take, or a missing one it needs (``where``: the file or model)."""
        if self.external_prior and not has_prior:
            raise DataError(where, f"this {self.kind} model was trained with prior_source=external and needs a mask "
                                   "prior per case: pass --prior-dir (e.g. the baseline's prediction folders)", case=case)
        if has_prior and not (self.external_prior or self.optional_prior):
            raise DataError(where, f"a prior was given, but this {self.kind} model takes no external prior; "
                                   "predict without --prior-dir", case=case)


class UNetAdapter(ModelAdapter):
    """Plain 3D U-Net (MONAI ``UNet``): sigmoid of its logits, entropy as uncertainty."""

    kind = "unet"

    @staticmethod
    def network_spec(cfg: Config) -> dict[str, Any]:
        u = cfg.model.unet
        return {"name": "MonaiUNet", "kwargs": {"in_channels": 4, "out_channels": 3, "channels": list(u.channels),
                                                "strides": list(u.strides), "num_res_units": u.num_res_units,
                                                "dropout": u.dropout}}

    def segmenter(self, net, validation=False, seed=0) -> Segmenter:
        return UNetSegmenter(net, name=self.kind)


class AttentionUNetAdapter(ModelAdapter):
    """MONAI ``AttentionUnet`` (Oktay et al. 2018), trained like the U-Net; its attention gates are the map ``gate``."""

    kind = "attention_unet"

    @staticmethod
    def network_spec(cfg: Config) -> dict[str, Any]:
        a = cfg.model.attention_unet
        return {"name": "MonaiAttentionUNet", "kwargs": {"in_channels": 4, "out_channels": 3,
                                                         "channels": list(a.channels), "strides": list(a.strides),
                                                         "dropout": a.dropout}}

    def segmenter(self, net, validation=False, seed=0) -> Segmenter:
        return AttentionGateSegmenter(net, name=self.kind, attention=not validation)


class DiffusionAdapter(ModelAdapter):
    """Conditional diffusion U-Net: DDIM ensembles at inference, EMA weights, optional external prior."""

    kind = "diffusion"
    uses_ema = True

    def __init__(self, cfg: Config, net: nn.Module | None = None):
        super().__init__(cfg, net)
        self.external_prior = cfg.model.denoiser.prior_source == "external"
        self.optional_prior = cfg.model.denoiser.prior_source == "optional"

    @staticmethod
    def network_spec(cfg: Config) -> dict[str, Any]:
        d = cfg.model.denoiser
        return {"name": "DiffusionSegUNet", "kwargs": {
            "in_channels": 4, "out_channels": 3, "channels": list(d.channels), "res_blocks": d.res_blocks,
            "linear_attention_levels": list(d.linear_attention_levels),
            "cross_attention_levels": list(d.cross_attention_levels), "heads": d.heads, "dim_head": d.dim_head,
            "prior_source": d.prior_source, "norm_groups": d.norm_groups, "patch_size": d.patch_size,
            "encoder_channels": [d.encoder_factor * c for c in d.channels], "stem_channels": d.stem_channels,
            "self_condition": d.self_condition, "token_source": d.token_source, "token_level": d.token_level,
            "refine": d.refine}}

    def scheduler(self):
        """The noise schedule of training and sampling (a fresh scheduler: ``set_timesteps`` mutates it)."""
        d = self.cfg.diffusion
        return build_scheduler(d.timesteps, d.schedule, d.prediction, d.snr_shift, x_skip=d.x_skip)

    def segmenter(self, net, validation=False, seed=0) -> Segmenter:
        d = self.cfg.diffusion
        steps, ensemble = (d.val_sample_steps, d.val_ensemble) if validation else (d.sample_steps, d.ensemble)
        if d.mode == "direct":  # trained without noise: one deterministic pass from x = 0 at t = T-1
            sampler = DDIMSampler(self.scheduler(), steps=1, ensemble=1, seed=seed, start="zeros")
        else:
            sampler = DDIMSampler(self.scheduler(), steps=steps, ensemble=ensemble, eta=d.eta,
                                  step_uncertainty_weighting=d.step_uncertainty_weighting, seed=seed)
        return DiffusionSegmenter(net, sampler, name=self.kind, external_prior=self.external_prior,
                                  attention=not validation)


ADAPTERS: dict[str, type[ModelAdapter]] = {a.kind: a for a in (UNetAdapter, DiffusionAdapter, AttentionUNetAdapter)}


def build_adapter(cfg: Config, net: nn.Module | None = None) -> ModelAdapter:
    """The adapter of ``cfg.model.kind`` (with a new network from the config unless ``net`` is given)."""
    return ADAPTERS[cfg.model.kind](cfg, net)


def rough_outline(regions: Tensor, dilate: int = 2, blur: int = 1) -> Tensor:
    """A clinician's rough outline: the whole tumour (channel 1 of ``regions [B, 3, X, Y, Z]``) dilated by ``dilate``
    voxels (a cube), blurred ``blur`` times by a 3-voxel box (about a Gaussian of σ = 0.8 voxel per pass), copied
    into all 3 channels (an outline says nothing of the sub-regions). ``-> [B, 3, X, Y, Z]`` in [0, 1]."""
    wt = regions[:, 1:2].float()
    if dilate > 0:
        wt = F.max_pool3d(wt, 2 * dilate + 1, stride=1, padding=dilate)
    for _ in range(blur):
        wt = F.avg_pool3d(wt, 3, stride=1, padding=1, count_include_pad=False)
    return wt.expand(-1, 3, -1, -1, -1).clamp(0, 1)


def simulated_priors(regions: Tensor, generator: torch.Generator | None = None, none: float = 0.4) -> Tensor:
    """Priors of varying quality for training ``prior_source="optional"``, one draw per case,
    ``-> [B, 4, X, Y, Z]`` (3 prior channels and the given/absent flag the network reads):

    * ``none`` (default 40 %): no prior (zeros, flag 0) -- so the model works without one;
    * of the rest, a third each: a rough outline (:func:`rough_outline`, 1-3 voxels dilation); the outline shifted
      by up to 4 voxels per axis (a misplaced or other-visit outline); the regions blurred and scaled by a
      confidence in [0.5, 1] (another model's soft mask).
    """
    b = regions.shape[0]
    device = regions.device
    draw = torch.rand(b, generator=generator, device=device)
    dilation = torch.randint(1, 4, (b,), generator=generator, device=device)
    shifts = torch.randint(-4, 5, (b, 3), generator=generator, device=device)
    soft = simulated_prior(regions, generator)
    out = regions.new_zeros(b, 4, *regions.shape[2:])
    for i in range(b):
        if float(draw[i]) < none:
            continue
        kind = (float(draw[i]) - none) / max(1.0 - none, 1e-9)  # uniform in [0, 1) among the cases given a prior
        if kind < 2 / 3:
            prior = rough_outline(regions[i : i + 1], int(dilation[i]))[0]
            if kind >= 1 / 3:
                prior = torch.roll(prior, tuple(int(s) for s in shifts[i]), dims=(1, 2, 3))
        else:
            prior = soft[i]
        out[i, :3], out[i, 3] = prior, 1.0
    return out


def simulated_prior(regions: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A rough outline standing in for an external prior while training ``prior_source="external"``.

    The ground-truth regions ``[B, 3, X, Y, Z]`` are blurred (box filter, 5 voxels) and scaled by a
    random confidence in [0.5, 1] per case, as a coarse prior from another model or a clinician would be.
    """
    blurred = F.avg_pool3d(regions, kernel_size=5, stride=1, padding=2, count_include_pad=False)
    scale = 0.5 + 0.5 * torch.rand((regions.shape[0], 1, 1, 1, 1), generator=generator, device=regions.device)
    return blurred * scale
