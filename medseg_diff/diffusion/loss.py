"""Training losses. Both models share ``segmentation_loss`` (Dice + BCE on the three regions), so the
baseline and the diffusion model are trained with the same loss on their mask estimate.

Diffusion step (Diff-UNet style, x0 prediction):
1. x0 = 2·regions - 1; t ~ U{0..T-1}; ε ~ N(0, I); x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε (DDPM eq. 4), or with Bernoulli
   noise x0 with each voxel flipped to a fair coin with probability 1-ᾱ_t (the scheduler's ``add_noise``).
   Recycling (Fu et al. 2023, MELBA): for a fraction of the batch, x0 is replaced by the model's own estimate
   from pure noise (no gradient), so training sees the x_t that sampling will feed it, and learns to correct it.
   Training along the sampler's own chain (``chain`` > 0): for that fraction of the batch, the sampler's K-step
   DDIM chain (η as at inference) runs without gradient from pure noise to one of its K timesteps, drawn
   uniformly; that x_t, that timestep and the chain's last x0 estimate (the self-conditioning input) are what the
   step is trained on, so every step of the sampler is trained on exactly what sampling will feed it -- the
   estimates and the η-noise of the steps before it -- and can learn to correct them.
   ``mode="direct"``: x_t = 0 and t = T-1 always -- the same network trained directly for segmentation (the control
   of Öttl et al. 2024).
2. the network sees (x_t, t, image features) and outputs x0 logits (or ε / v); a self-conditioned network (Chen et
   al. 2022) also sees, for half the batch, its own x0 estimate from a first pass (no gradient), else zeros
3. loss = Dice + BCE on the x0 estimate + MSE (on x0, or on ε / v for those parameterisations)
   + the prior head's deep supervision against the regions pooled to its grid
   + (``attention`` > 0) a loss on the cross-attention itself: KL(target ‖ attention mass over the prior tokens),
   target = the whole tumour pooled to the token grid, for crops that hold tumour. This is supervision of the map,
   disclosed as such in README and the report.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn

from medseg_diff.diffusion.schedules import scheduler_input, training_target, x0_from_output, x0_logits

_DICE_LOGITS = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)
_DICE_PROBS = DiceLoss(sigmoid=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)


@dataclass
class LossOutput:
    total: Tensor  # scalar, differentiable
    parts: dict[str, float] = field(default_factory=dict)  # detached components, for logging
    seg: Tensor | None = None  # the Dice + BCE part of ``total`` (differentiable)


@dataclass(frozen=True)
class LossWeights:
    dice: float = 1.0
    bce: float = 1.0
    mse: float = 1.0
    prior: float = 0.5
    attention: float = 0.0


@dataclass(frozen=True)
class DiffusionTraining:
    """How a diffusion training step draws its inputs (see the module doc)."""

    mode: str = "denoise"  # denoise | direct
    self_condition: float = 0.0  # fraction of the batch that gets its own first-pass x0 estimate
    recycle: float = 0.0  # fraction of the batch noised from the model's own estimate instead of the truth
    chain: float = 0.0  # fraction of the batch drawn along the sampler's own chain (K steps, η) at a random step
    chain_steps: int = 2  # K of that chain (the sampler's diffusion.sample_steps)
    eta: float = 1.0  # DDIM η of that chain (the sampler's diffusion.eta)


@dataclass
class TrainForward:
    """What ``EncodeDenoise`` returns: the prediction, the prior head's logits and the raw attention maps."""

    output: Tensor  # [B, 3, X, Y, Z]
    prior_logits: Tensor | None  # [B, 3, x, y, z]
    attention: dict[str, Tensor] = field(default_factory=dict)  # name -> raw per-level map (cross_l{i}: token grid)
    x_t: Tensor | None = None  # the x_t actually denoised, when recycling replaced some of the batch's
    refined: Tensor | None = None  # x0 logits refined at full resolution (a model with a refiner)
    t: Tensor | None = None  # the timesteps actually denoised, when the sampler's chain replaced some of the batch's


def segmentation_loss(logits: Tensor, target: Tensor, weights: LossWeights) -> tuple[Tensor, dict[str, float]]:
    """Dice + BCE of region logits ``[B, 3, X, Y, Z]`` against {0, 1} regions of the same shape."""
    dice = _DICE_LOGITS(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    total = weights.dice * dice + weights.bce * bce
    return total, {"dice_loss": float(dice.detach()), "bce": float(bce.detach())}


def prior_loss(prior_logits: Tensor, regions: Tensor) -> tuple[Tensor, float]:
    """Deep supervision of the prior head: regions ``[B, 3, X, Y, Z]`` area-pooled to its grid."""
    target = F.adaptive_avg_pool3d(regions, prior_logits.shape[2:])
    loss = F.binary_cross_entropy_with_logits(prior_logits, target) + _DICE_PROBS(torch.sigmoid(prior_logits), target)
    return loss, float(loss.detach())


def bce_of_probabilities(probs: Tensor, target: Tensor) -> Tensor:
    """BCE of probabilities (not logits), in float32 with autocast off: ``F.binary_cross_entropy`` raises
    "unsafe to autocast" inside a CUDA autocast region, where the trainer computes the loss."""
    with torch.autocast(probs.device.type, enabled=False):
        return F.binary_cross_entropy(probs.float().clamp(1e-6, 1 - 1e-6), target.float())


def _fraction(b: int, p: float, device, generator) -> Tensor | None:
    """A [B] boolean draw with probability ``p`` each (None when p = 0, so that no random number is drawn)."""
    if p <= 0:
        return None
    return torch.rand(b, device=device, generator=generator) < p


class DiffusionLoss:
    """One training step's loss for ``DiffusionSegUNet`` with a MONAI scheduler."""

    def __init__(self, scheduler, weights: LossWeights, training: DiffusionTraining | None = None):
        self.scheduler = scheduler
        self.weights = weights
        self.training = training or DiffusionTraining()

    def __call__(self, model: nn.Module, image: Tensor, regions: Tensor, generator=None,
                 external_prior: Tensor | None = None) -> LossOutput:
        # 1. noise the mask (DDPM eq. 4), or x_t = 0 at t = T-1 for the direct control
        x0 = regions * 2.0 - 1.0
        b, T, opts = x0.shape[0], self.scheduler.num_train_timesteps, self.training
        if opts.mode == "direct":
            t = torch.full((b,), T - 1, device=x0.device, dtype=torch.long)
            noise, x_t = torch.zeros_like(x0), torch.zeros_like(x0)
            plan = {}
        else:
            t = torch.randint(0, T, (b,), device=x0.device, generator=generator)
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
            x_t = self.scheduler.add_noise(x0, noise, t)
            plan = {"self_cond": _fraction(b, opts.self_condition, x0.device, generator),
                    "recycle": _fraction(b, opts.recycle, x0.device, generator)}
            if plan["recycle"] is not None:
                plan["start"] = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
                plan["noise"] = noise
            chain = _fraction(b, opts.chain, x0.device, generator)
            if chain is not None:  # drawn only when used, so that chain = 0 keeps every other draw as it was
                plan["chain"] = chain
                plan["chain_step"] = torch.randint(0, opts.chain_steps, (b,), device=x0.device, generator=generator)
                plan["chain_seed"] = int(torch.randint(0, 2**62, (1,), device=x0.device, generator=generator))
                plan["chain_steps"], plan["eta"] = opts.chain_steps, opts.eta
        # 2. predict: ``model`` is an ``EncodeDenoise`` (possibly DDP-wrapped), one forward per step
        out = model(x_t, t, image, external_prior, attention=self.weights.attention > 0, **plan)
        x_t = out.x_t if out.x_t is not None else x_t
        t = out.t if out.t is not None else t
        loss = self.from_output(out.output, out.prior_logits, x_t, x0, noise, t, regions)
        if out.refined is not None:  # the refined estimate gets the same Dice + BCE; each half the weight
            refined, parts = segmentation_loss(out.refined, regions, self.weights)
            loss.total = loss.total + 0.5 * (refined - loss.seg)
            loss.parts.update({f"refined_{k}": v for k, v in parts.items()})
            loss.parts["loss"] = float(loss.total.detach())
        if self.weights.attention > 0:
            self._attention_loss(loss, out.attention, regions)
        return loss

    def _attention_loss(self, loss: LossOutput, maps: dict[str, Tensor], regions: Tensor) -> None:
        """Adds ``attention x KL(target ‖ mass)`` over the cross-attention levels (crops with tumour only)."""
        cross = [m for k, m in maps.items() if k.startswith("cross_l")]
        if not cross:
            return
        total = regions.new_zeros(())
        for mass in cross:  # [B, 1, *grid], mean 1 over the grid
            p = mass.float().flatten(1) / mass.shape[2:].numel()
            q = F.adaptive_avg_pool3d(regions[:, 1:2].float(), mass.shape[2:]).flatten(1)
            keep = q.sum(1) > 0
            if keep.any():
                q = q[keep] / q[keep].sum(1, keepdim=True)
                kl = (q * (q.clamp_min(1e-12).log() - p[keep].clamp_min(1e-12).log())).sum(1)
                total = total + kl.mean() / len(cross)
        loss.total = loss.total + self.weights.attention * total
        loss.parts["attention"] = float(total.detach())
        loss.parts["loss"] = float(loss.total.detach())

    def from_output(self, output, prior_logits, x_t, x0, noise, t, regions) -> LossOutput:
        w = self.weights
        parts: dict[str, float] = {}
        # 3. losses on the x0 estimate
        if self.scheduler.prediction_type == "sample":
            logits = x0_logits(self.scheduler, output, x_t, t)
            seg, seg_parts = segmentation_loss(logits, regions, w)
            mse = F.mse_loss(torch.sigmoid(logits), regions)
        else:
            probs = (x0_from_output(self.scheduler, output, x_t, t) + 1.0) / 2.0
            dice = _DICE_PROBS(probs, regions)
            bce = bce_of_probabilities(probs, regions)
            seg = w.dice * dice + w.bce * bce
            seg_parts = {"dice_loss": float(dice.detach()), "bce": float(bce.detach())}
            mse = F.mse_loss(output, training_target(self.scheduler, x0, noise, t))
        parts.update(seg_parts)
        parts["mse"] = float(mse.detach())
        total = seg + w.mse * mse
        # 4. deep supervision of the prior head
        if prior_logits is not None and w.prior > 0:
            p_loss, parts["prior"] = prior_loss(prior_logits, regions)
            total = total + w.prior * p_loss
        parts["loss"] = float(total.detach())
        return LossOutput(total=total, parts=parts, seg=seg)


class EncodeDenoise(nn.Module):
    """Encoder + denoiser as one ``forward`` so that DistributedDataParallel sees a single forward pass.

    ``forward(x_t [B,3,...], t [B], image [B,4,...], external_prior=None, attention=False, self_cond=None,
    recycle=None, start=None, noise=None) -> TrainForward``. ``self_cond`` / ``recycle`` are ``[B]`` boolean
    draws: those samples get a first pass without gradient (their x0 estimate as self-conditioning input; or
    x0 estimated from pure noise ``start`` at t = T-1, re-noised with ``noise`` to t, as their x_t). ``chain``
    (``[B]`` boolean), ``chain_step`` (``[B]`` in 0..K-1), ``chain_seed``, ``chain_steps`` (K) and ``eta``: those
    samples are replaced by the sampler's own K-step chain run to step ``chain_step`` (see the module doc).
    """

    def __init__(self, net: nn.Module, scheduler=None):
        super().__init__()
        self.net = net
        self.scheduler = scheduler
        self._chain_schedulers: dict[tuple[int, str], object] = {}  # see _chain_scheduler

    def _estimate(self, x_t: Tensor, t: Tensor, cond, self_cond: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            kwargs = {"self_cond": self_cond} if getattr(self.net, "self_condition", False) else {}
            return x0_from_output(self.scheduler, self.net(x_t, t, cond, **kwargs).float(), x_t, t).detach()

    def _chain_scheduler(self, k: int, device) -> object:
        """A copy of the training scheduler set to the sampler's K timesteps (``set_timesteps`` mutates a scheduler,
        and the training one serves ``add_noise`` at any t), made once per (K, device), not at every step."""
        key = (k, str(device))
        if key not in self._chain_schedulers:
            scheduler = copy.deepcopy(self.scheduler)
            scheduler.set_timesteps(k, device=device)
            self._chain_schedulers[key] = scheduler
        return self._chain_schedulers[key]

    def _chain(self, cond, shape, steps: Tensor, seed: int, k: int, eta: float, device) -> tuple[Tensor, Tensor,
                                                                                                Tensor]:
        """The sampler's chain without gradient (``DDIMSampler.sample``'s loop: same scheduler, spacing, η and
        self-conditioning) from seeded pure noise, stopped for sample i after ``steps[i]`` of its K steps ->
        (x at that step, its timestep, the last x0 estimate there: zeros before the first step)."""
        scheduler = self._chain_scheduler(k, device)
        generator = torch.Generator(device=device).manual_seed(seed)
        x = scheduler.start_sample(torch.randn(shape, generator=generator, device=device, dtype=torch.float32))
        x0 = torch.zeros_like(x)
        self_conditioned = getattr(self.net, "self_condition", False)
        with torch.no_grad():
            for j in range(int(steps.max())):  # never the last of the K steps: steps < K
                live = (steps > j).nonzero().flatten()  # the samples that have not reached their step yet
                t = scheduler.timesteps[j]
                t_batch = t.expand(len(live))
                kwargs = {"self_cond": x0[live] if j else None} if self_conditioned else {}
                output = self.net(x[live], t_batch, cond.select(live), **kwargs).float()
                x[live], x0[live] = scheduler.step(scheduler_input(scheduler, output, x[live], t_batch), int(t),
                                                   x[live], eta=eta, generator=generator if eta else None)
        return x, scheduler.timesteps[steps.to(scheduler.timesteps.device)].to(device), x0

    def forward(self, x_t: Tensor, t: Tensor, image: Tensor, external_prior: Tensor | None = None,
                attention: bool = False, self_cond: Tensor | None = None, recycle: Tensor | None = None,
                start: Tensor | None = None, noise: Tensor | None = None, chain: Tensor | None = None,
                chain_step: Tensor | None = None, chain_seed: int = 0, chain_steps: int = 2,
                eta: float = 1.0) -> TrainForward:
        cond = self.net.encode(image, external_prior)
        recycled, chain_t, chain_x0 = None, None, None
        if recycle is not None and bool(recycle.any()):
            # recycling: x_t from the model's own estimate at t = T-1 from pure noise (Fu et al. 2023)
            top = torch.full_like(t, self.scheduler.num_train_timesteps - 1)
            own = self._estimate(self.scheduler.start_sample(start), top, cond)
            mask = recycle.view(-1, 1, 1, 1, 1)
            x_t = torch.where(mask, self.scheduler.add_noise(own, noise, t).to(x_t.dtype), x_t)
            recycled = x_t
        if chain is not None and bool(chain.any()):
            # the sampler's own chain for the chosen samples: their x_t, t and self-conditioning input
            chosen = chain.nonzero().flatten()
            x_c, t_c, x0_c = self._chain(cond.select(chosen), x_t[chosen].shape, chain_step[chosen], chain_seed,
                                         chain_steps, eta, x_t.device)
            x_t, t = x_t.clone(), t.clone()
            x_t[chosen], t[chosen] = x_c.to(x_t.dtype), t_c.to(t.dtype)
            chain_x0 = torch.zeros_like(x_t)
            chain_x0[chosen] = x0_c.to(x_t.dtype)
            recycled, chain_t = x_t, t
            if self_cond is not None:  # their self-conditioning input is the chain's, not a first pass
                self_cond = self_cond & ~chain
        kwargs = {}
        if getattr(self.net, "self_condition", False):
            estimate = chain_x0
            if self_cond is not None and bool(self_cond.any()):
                # the first pass only for the cases drawn for self-conditioning; the others get zeros
                chosen = self_cond.nonzero().flatten()
                estimate = torch.zeros_like(x_t) if estimate is None else estimate
                estimate[chosen] = self._estimate(x_t[chosen], t[chosen], cond.select(chosen)).to(x_t.dtype)
            kwargs["self_cond"] = estimate
        if attention:
            out = self.net.forward_with_attention(x_t, t, cond, in_space=False, **kwargs)
            pred, maps = out.pred, out.attention
        else:
            pred, maps = self.net(x_t, t, cond, **kwargs), {}
        refined = None
        if getattr(self.net, "refines", False):
            refined = self.net.refine(x0_logits(self.scheduler, pred, x_t, t), cond)
        return TrainForward(pred, cond.prior_logits, maps, recycled, refined, chain_t)
