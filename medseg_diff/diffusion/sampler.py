"""DDIM ensemble sampling of region masks, with uncertainty and attention maps.

The loop (the network knows nothing of it; the scheduler owns the maths):
1. encode the image once per window; repeat its features for the N ensemble members
2. x_T ~ N(0, I) for B·N members from a seeded generator (``start="zeros"``: x = 0, the "direct" control that
   was trained without noise)
3. for each of K trailing timesteps: predict (a self-conditioned model also sees the previous x0 estimate, Chen et
   al. 2022), then the scheduler's DDIM step (Song et al. 2021, eq. 12; η > 0 adds fresh seeded noise, eq. 16)
   gives the x0 estimate and x at the next timestep; the last estimate is the output, so the last step's x is unused.
   ``members="bernoulli"``: between steps each member moves towards a mask drawn from its estimate (Bernoulli per
   voxel, seeded) instead of the soft estimate itself, so members differ where the estimate is unsure
4. member probabilities = the last x0 estimate (or the step-uncertainty-weighted mean over steps, Diff-UNet)
5. (a model with a refiner) the last estimate refined at full resolution, once per member
6. output mean probability, predictive entropy, member variance, attention maps of the last step
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange
from monai.networks.schedulers import DDIMScheduler
from torch import Tensor, nn

from medseg_diff.diffusion.schedules import TrailingDDIMScheduler, scheduler_input, x0_from_output, x0_logits

_EPS = 1e-6


@dataclass
class SampleOutput:
    probs: Tensor  # [B, 3, X, Y, Z] mean member probability of TC, WT, ET
    entropy: Tensor  # [B, 1, X, Y, Z] predictive entropy of the mean, summed over the 3 regions (nats)
    variance: Tensor  # [B, 1, X, Y, Z] variance across members, averaged over the 3 regions
    # name -> [B, 1, X, Y, Z]: the last step's maps, mean over members, "times uniform within the window" units
    # (per window; inference.sliding_window.AttentionStitcher stitches them for a whole volume)
    attention: dict[str, Tensor] = field(default_factory=dict)
    members: Tensor | None = None  # [B, N, 3, X, Y, Z] per-member probabilities, when asked for


def binary_entropy(p: Tensor) -> Tensor:
    """Entropy (nats) of Bernoulli(p), elementwise."""
    p = p.clamp(_EPS, 1 - _EPS)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def summarise_members(members: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``members [B, N, 3, ...]`` → mean probability ``[B, 3, ...]``, entropy and variance ``[B, 1, ...]``."""
    probs = members.mean(dim=1)
    entropy = binary_entropy(probs).sum(dim=1, keepdim=True)
    # E[p^2] - E[p]^2 (population variance over members): one pass over the members, several times faster than
    # Tensor.var over a middle dimension on the CPU; clamped at 0 against rounding
    variance = (members.square().mean(dim=1) - probs.square()).clamp_min(0.0).mean(dim=1, keepdim=True)
    return probs, entropy, variance


def predict_x0(model: nn.Module, scheduler, x_t: Tensor, t: Tensor, cond, self_cond: Tensor | None = None) -> Tensor:
    """One network call at timesteps ``t [B]`` -> the x0 estimate in [-1, 1] ``[B, 3, ...]`` (with the scheduler's
    parametrisation, including its skip from x_t). ``self_cond`` reaches only a self-conditioned network."""
    kwargs = {"self_cond": self_cond} if getattr(model, "self_condition", False) else {}
    output = model(x_t, t, cond, **kwargs).float()
    return x0_from_output(scheduler, output, x_t, t)


class DDIMSampler:
    """K-step DDIM with N ensemble members run as one batch. Deterministic for a given ``seed``."""

    def __init__(self, scheduler, steps: int = 10, ensemble: int = 4, step_uncertainty_weighting: bool = False,
                 seed: int = 0, eta: float = 0.0, start: str = "noise", members: str = "mean"):
        if isinstance(scheduler, DDIMScheduler) and not isinstance(scheduler, TrailingDDIMScheduler):
            # MONAI's own linspace timesteps disagree with the stride its step() moves by
            raise TypeError("DDIMSampler needs a TrailingDDIMScheduler (see build_scheduler), not a plain "
                            f"{type(scheduler).__name__}")
        self.scheduler = scheduler
        self.steps = steps
        self.ensemble = ensemble
        self.step_uncertainty_weighting = step_uncertainty_weighting
        self.seed = seed
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if start not in ("noise", "zeros"):
            raise ValueError(f"start must be 'noise' or 'zeros', got {start!r}")
        if members not in ("mean", "bernoulli"):
            raise ValueError(f"members must be 'mean' or 'bernoulli', got {members!r}")
        self.eta, self.start, self.members = eta, start, members

    @torch.no_grad()
    def sample(self, model: nn.Module, image: Tensor, external_prior: Tensor | None = None,
               attention: bool = True, keep_members: bool = False, seed: int | None = None) -> SampleOutput:
        b, n = image.shape[0], self.ensemble
        # 1. the encoder runs once; every step and member reuses its features
        cond = model.encode(image, external_prior).repeat(n)
        # 2. seeded starting noise for all B·N members
        generator = torch.Generator(device=image.device).manual_seed(self.seed if seed is None else seed)
        shape = (b * n, 3, *image.shape[2:])
        x = self.scheduler.start_sample(torch.randn(shape, generator=generator, device=image.device,
                                                    dtype=torch.float32))  # Bernoulli noise: a fair coin
        if self.start == "zeros":
            x = torch.zeros_like(x)
        self_conditioned = getattr(model, "self_condition", False)
        x0 = None  # the last x0 estimate (self-conditioning input; None = zeros at the first step)
        self.scheduler.set_timesteps(self.steps, device=image.device)
        timesteps = self.scheduler.timesteps
        weighted = torch.zeros_like(x) if self.step_uncertainty_weighting else None
        weight_sum = torch.zeros_like(x) if self.step_uncertainty_weighting else None
        maps: dict[str, Tensor] = {}
        for i, t in enumerate(timesteps):
            # 3. predict (the last step also returns attention maps)
            t_batch = t.expand(b * n)
            last = i == len(timesteps) - 1
            kwargs = {"self_cond": x0} if self_conditioned else {}
            if last and attention:
                out = model.forward_with_attention(x, t_batch, cond, **kwargs)
                output, maps = out.pred.float(), out.attention
            else:
                output = model(x, t_batch, cond, **kwargs).float()
            # DDIM update x_t -> x_{t-1} (eq. 12; eq. 16's fresh noise when η > 0) and its x0 estimate (eq. 12's
            # "predicted x0", clipped to [-1, 1]); for x0 prediction the scheduler takes x0 = 2σ(logits) - 1 itself
            # (logits with the skip from x_t when the scheduler has one). The last step's x_{t-1} is not used
            x_in = x
            estimate = scheduler_input(self.scheduler, output, x, t_batch)
            step_input = estimate
            if self.members == "bernoulli" and not last and self.scheduler.prediction_type == "sample":
                # each member commits to a mask drawn from its estimate (BerDiff-like), so members part ways
                # exactly where the estimate is unsure; the soft estimate stays the self-conditioning input
                drawn = torch.rand(estimate.shape, generator=generator, device=estimate.device) < (estimate + 1) / 2
                step_input = drawn.to(estimate.dtype) * 2.0 - 1.0
            x, x0 = self.scheduler.step(step_input, int(t), x, eta=self.eta if not last else 0.0,
                                        generator=generator if self.eta else None)
            if step_input is not estimate:
                x0 = estimate.clamp(-1.0, 1.0)
            if self.step_uncertainty_weighting:
                member_probs = (x0 + 1.0) / 2.0
                w = self._step_weight(member_probs, b, n, i)
                weighted += w * member_probs
                weight_sum += w
        # 4. member probabilities: the last x0 estimate (refined at full resolution once per member, when the
        # model has a refiner)
        if self.step_uncertainty_weighting:
            final = weighted / weight_sum
        elif getattr(model, "refines", False) and self.scheduler.prediction_type == "sample":
            final = torch.sigmoid(model.refine(x0_logits(self.scheduler, output, x_in, t_batch), cond).float())
        else:
            final = (x0 + 1.0) / 2.0
        members = rearrange(final, "(b n) c ... -> b n c ...", n=n)
        probs, entropy, variance = summarise_members(members)
        # 6. attention maps averaged over members
        attn = {k: rearrange(v.float(), "(b n) c ... -> b n c ...", n=n).mean(dim=1) for k, v in maps.items()}
        return SampleOutput(probs, entropy, variance, attn, members if keep_members else None)

    def _step_weight(self, member_probs: Tensor, b: int, n: int, i: int) -> Tensor:
        """Diff-UNet's step-uncertainty fusion: w = exp(σ((i+1)/K) · (1 - H)), H the members' entropy.

        Later (less noisy) steps and voxels where the members agree get more weight.
        """
        members = rearrange(member_probs, "(b n) c ... -> b n c ...", n=n)
        h = binary_entropy(members.mean(dim=1)) / torch.log(torch.tensor(2.0))  # in [0, 1] bits
        w = torch.exp(torch.sigmoid(torch.tensor((i + 1) / self.steps)) * (1.0 - h))
        return w.repeat_interleave(n, dim=0)
