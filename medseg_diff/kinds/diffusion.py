"""The conditional diffusion U-Net: DDIM ensembles at inference, EMA weights, an optional external prior, and the
diffusion objective (noise the mask at a random t, denoise, x0 / ε / v losses)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from medseg_diff.diffusion.loss import DiffusionLoss, DiffusionTraining, EncodeDenoise, LossOutput
from medseg_diff.diffusion.sampler import DDIMSampler
from medseg_diff.diffusion.schedules import build_scheduler
from medseg_diff.kinds.base import ModelKind, Objective, loss_weights
from medseg_diff.kinds.segmenters import DiffusionSegmenter, Segmenter
from medseg_diff.models import DiffusionSegUNet

if TYPE_CHECKING:
    from medseg_diff.config import Config


class DiffusionObjective:
    """Conditional diffusion: noise the mask at a random t, denoise, x0 (or ε / v) losses."""

    def __init__(self, kind: "DiffusionKind"):
        self.adapter = kind
        d = kind.cfg.diffusion
        self.scheduler = kind.scheduler()
        rate = d.self_condition_rate if kind.cfg.model.denoiser.self_condition else 0.0
        training = DiffusionTraining(mode=d.mode, recycle=d.recycle, chain=d.chain, chain_steps=d.sample_steps,
                                     eta=d.eta, self_condition=rate)
        self.loss_fn = DiffusionLoss(self.scheduler, loss_weights(kind.cfg), training)

    def train_module(self) -> nn.Module:
        return EncodeDenoise(self.adapter.net, self.scheduler)

    def loss(self, module, image, regions, generator=None) -> LossOutput:
        prior = self.adapter.training_prior(regions, generator)
        return self.loss_fn(module, image, regions, generator, external_prior=prior)


class DiffusionKind(ModelKind):
    kind = "diffusion"
    network_name = "DiffusionSegUNet"
    network_factory = DiffusionSegUNet
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
            "refine": d.refine, "refine_width": d.refine_width,
            **({"refine_context": d.refine_context} if d.refine_context else {})}}

    @classmethod
    def config_stride(cls, cfg: Config) -> tuple[int, str]:
        """``patch_size * 2**(levels - 1)``, as ``DiffusionSegUNet.stride``."""
        den = cfg.model.denoiser
        levels = len(den.channels)
        return (den.patch_size * 2 ** (levels - 1),
                f"model.denoiser.patch_size {den.patch_size} x 2^({levels} levels of model.denoiser.channels - 1)")

    @classmethod
    def loss_terms(cls, cfg: Config) -> list[str]:
        return ["dice", "bce", "mse"] + (["prior"] if cfg.model.denoiser.prior_source in ("head", "optional") else [])

    def scheduler(self):
        """The noise schedule of training and sampling (a fresh scheduler: ``set_timesteps`` mutates it)."""
        d = self.cfg.diffusion
        return build_scheduler(d.timesteps, d.schedule, d.prediction, d.snr_shift, x_skip=d.x_skip, noise=d.noise)

    def sampler_settings(self) -> dict[str, int]:
        d = self.cfg.diffusion
        return {"sample_steps": d.sample_steps, "ensemble": d.ensemble}

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

    def objective(self) -> Objective:
        return DiffusionObjective(self)


KIND = DiffusionKind
