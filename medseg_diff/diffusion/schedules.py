"""Noise maths: MONAI's schedulers, set up for mask diffusion.

The mask x0 ∈ {-1, 1}^3 is noised as x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε (MONAI ``Scheduler.add_noise``).
The network's 3 output channels mean, per ``prediction``:
- ``sample``: logits of x0 in [0, 1] (x0 = 2σ(logits) - 1); with ``x_skip`` the logits are the network's output
  **plus** the posterior log-odds of x0 = +1 given x_t alone, ``2√ᾱ_t x_t / (1-ᾱ_t)`` (the exact per-voxel Bayes
  posterior for x0 ∈ {-1, 1} under x_t ~ N(√ᾱ x0, 1-ᾱ)): a skip connection from x_t to the output, as EDM's
  ``c_skip(σ) x`` preconditioning (Karras et al. 2022) is for images. The network then predicts only what x_t does
  not already say, and cannot ignore x_t: at ᾱ = 0.9 the skip alone is 19·x_t.
- ``epsilon``: the noise ε,
- ``v_prediction``: v = √ᾱ ε - √(1-ᾱ) x0.

``noise="bernoulli"`` (:class:`BernoulliDDIMScheduler`; BerDiff, Chen et al. 2023): the mask is noised by flipping
voxels instead of adding Gaussian noise, x_t ∈ {-1, 1}^3 with P(x_t = x0) = (1 + ᾱ_t) / 2, so x_t is always a mask
and the skip's log-odds are ``log((1 + ᾱ_t) / (1 - ᾱ_t)) x_t``; sampling draws x_{t-1} from the Bernoulli posterior
q(x_{t-1} | x_t, x0 estimate) (BerDiff eq. 8, with DDIM's stride), so members differ by discrete draws.

``snr_shift`` > 1 divides the schedule's signal-to-noise ratio ᾱ/(1-ᾱ) by that factor at every t ("simple
diffusion", Hoogeboom et al. 2023, §3.1): a denoiser that sees x_t in patches of s³ voxels averages the noise over
each patch, so the same ᾱ is s³ times easier for it than for a per-voxel one; shifting by about s³ keeps the
training signal spread over t instead of concentrated at the noisiest steps. It is a MONAI schedule
(``NoiseSchedules`` entry ``snr_shifted``), so ``add_noise`` and ``step`` use it unchanged.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, NoiseSchedules
from torch import Tensor


@NoiseSchedules.add_def("snr_shifted", "A base schedule with its SNR divided by `shift` at every timestep")
def _snr_shifted(num_train_timesteps: int, base: str = "linear_beta", shift: float = 1.0):
    """``(betas, alphas, alphas_cumprod)`` of schedule ``base`` with ᾱ' = ᾱ / (ᾱ + shift (1 - ᾱ)), i.e.
    SNR'(t) = SNR(t) / shift (a shift of log-SNR by -log(shift))."""
    out = NoiseSchedules[base](num_train_timesteps=num_train_timesteps)
    betas = out[0] if isinstance(out, tuple) else out
    alpha_bar = torch.cumprod(1.0 - betas.double(), dim=0)
    alpha_bar = alpha_bar / (alpha_bar + shift * (1.0 - alpha_bar))
    alphas = alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    betas = (1.0 - alphas).clamp(0.0, 0.999)
    alphas = 1.0 - betas
    return betas.float(), alphas.float(), torch.cumprod(alphas, dim=0).float()


#: The skip's log-odds are clamped to this magnitude (σ(30) = 1 - 1e-13): near t = 0, 2√ᾱ/(1-ᾱ) reaches 2·10^4
SKIP_LOGIT_LIMIT = 30.0


class TrailingDDIMScheduler(DDIMScheduler):
    """MONAI's ``DDIMScheduler`` whose ``set_timesteps`` uses the "trailing" spacing; everything else is MONAI's.

    ``set_timesteps(K)`` gives the K timesteps spaced by the stride s = T // K that ``step`` moves by (t -> t - s):
    K·s-1, ..., 2s-1, s-1. The first is T-1 whenever K divides T (else the T mod K leftover steps are dropped at
    the noisy end); the last step lands on t < 0, where MONAI's ᾱ_prev is 1, i.e. on the clean mask.

    MONAI's own ``set_timesteps`` spaces steps by linspace (999, 888, ...), which disagrees with the stride of its
    ``step``; with the uniform trailing spacing (Lin et al., WACV 2024, Table 2) the two agree, and the first step
    starts from pure noise at t = T-1, as in training. For K = T both spacings are T-1, ..., 0.
    """

    #: add the posterior log-odds of x0 given x_t to x0 logits (prediction "sample" only; see the module doc)
    x_skip: bool = False

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if self.steps_offset:
            raise ValueError(f"steps_offset={self.steps_offset}: the trailing spacing already ends at s-1 and "
                             "starts at T-1, so an offset is not supported")
        super().set_timesteps(num_inference_steps, device=device)  # MONAI's checks; sets num_inference_steps
        stride = self.num_train_timesteps // num_inference_steps
        self.timesteps = torch.arange(num_inference_steps - 1, -1, -1, device=device, dtype=torch.long) * stride
        self.timesteps += stride - 1


    #: the forward process: "gaussian" (x_t = √ᾱ x0 + √(1-ᾱ) ε) or "bernoulli" (BernoulliDDIMScheduler)
    noise: str = "gaussian"

    def start_sample(self, noise: Tensor) -> Tensor:
        """x_T of the sampler (and of training's chains) from standard normal ``noise``: the noise itself."""
        return noise


class BernoulliDDIMScheduler(TrailingDDIMScheduler):
    """Bernoulli forward process (BerDiff, Chen et al. 2023) on masks in {-1, 1}, with the trailing DDIM stride.

    ``add_noise(x0, ε, t)``: x_t = +1 with probability ᾱ_t (x0 + 1) / 2 + (1 - ᾱ_t) / 2, else -1 -- the voxel is
    kept with probability ᾱ_t and otherwise replaced by a fair coin; the coin is Φ(ε) < that probability (Φ the
    normal CDF), so the Gaussian draws of every caller decide the flips and no other random number is drawn.
    A soft x0 in [-1, 1] (recycling's estimate) is noised with the same formula.

    ``step(x0 estimate, t, x_t, eta, generator)``: with p = (x0 + 1) / 2, b = (x_t + 1) / 2, ᾱ' = ᾱ at the next
    timestep (1 past the last) and α = ᾱ_t / ᾱ', the posterior of the next x is
    θ ∝ [α b + (1 - α) / 2] · [ᾱ' p + (1 - ᾱ') / 2] against [α (1 - b) + (1 - α) / 2] · [ᾱ' (1 - p) + (1 - ᾱ') / 2]
    (BerDiff eq. 8 with p in place of the one-hot x0). η > 0 draws the next x from Bernoulli(θ) with ``generator``;
    η = 0 takes its mean 2θ - 1 (deterministic). x_T is a fair coin per voxel (``start_sample``: the sign of the
    sampler's Gaussian draw).
    """

    noise = "bernoulli"

    def start_sample(self, noise: Tensor) -> Tensor:
        return torch.where(noise >= 0, 1.0, -1.0).to(noise.dtype)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        alpha = _alpha_bar(self, timesteps.reshape(-1), original_samples.float())
        keep = alpha * (original_samples.float() + 1.0) / 2.0 + (1.0 - alpha) / 2.0  # P(x_t = +1)
        coin = 0.5 * (1.0 + torch.erf(noise.float() / 2.0 ** 0.5))  # Φ(ε): uniform on (0, 1)
        return torch.where(coin < keep, 1.0, -1.0).to(original_samples.dtype)

    def step(self, model_output: Tensor, timestep: int, sample: Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        prev = timestep - self.num_train_timesteps // self.num_inference_steps
        alphas = self.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
        a_t = alphas[timestep]
        a_prev = alphas[prev] if prev >= 0 else torch.as_tensor(float(self.final_alpha_cumprod), device=sample.device)
        step_alpha = a_t / a_prev
        x0 = model_output.float().clamp(-1.0, 1.0)
        p, b = (x0 + 1.0) / 2.0, (sample.float() + 1.0) / 2.0
        one = (step_alpha * b + (1 - step_alpha) / 2) * (a_prev * p + (1 - a_prev) / 2)
        zero = (step_alpha * (1 - b) + (1 - step_alpha) / 2) * (a_prev * (1 - p) + (1 - a_prev) / 2)
        theta = one / (one + zero).clamp_min(1e-12)
        if eta > 0:
            drawn = torch.rand(theta.shape, generator=generator, device=theta.device) < theta
            prev_sample = drawn.float() * 2.0 - 1.0
        else:
            prev_sample = 2.0 * theta - 1.0
        return prev_sample.to(sample.dtype), x0.to(model_output.dtype)


def build_scheduler(timesteps: int = 1000, schedule: str = "linear_beta", prediction: str = "sample",
                    snr_shift: float = 1.0, x_skip: bool = False, noise: str = "gaussian") -> TrailingDDIMScheduler:
    """A MONAI DDIM scheduler (its ``add_noise`` serves training, its ``step`` sampling) with trailing timesteps;
    ``x_skip`` adds x_t's own posterior log-odds to the x0 logits (prediction "sample" only); ``noise`` the forward
    process ("gaussian", or "bernoulli": :class:`BernoulliDDIMScheduler`, prediction "sample" only)."""
    if x_skip and prediction != "sample":
        raise ValueError(f"x_skip needs prediction 'sample' (x0 logits), not {prediction!r}")
    if noise not in ("gaussian", "bernoulli"):
        raise ValueError(f"noise must be 'gaussian' or 'bernoulli', got {noise!r}")
    if noise == "bernoulli" and prediction != "sample":
        raise ValueError(f"Bernoulli noise needs prediction 'sample' (x0 probabilities), not {prediction!r}")
    schedule_args = {} if snr_shift == 1.0 else {"schedule": "snr_shifted", "base": schedule, "shift": snr_shift}
    cls = BernoulliDDIMScheduler if noise == "bernoulli" else TrailingDDIMScheduler
    scheduler = cls(
        num_train_timesteps=timesteps,
        **({"schedule": schedule} | schedule_args),
        prediction_type=prediction,
        clip_sample=True,
        set_alpha_to_one=True,
    )
    scheduler.x_skip = x_skip
    return scheduler


def x0_logits(scheduler: DDIMScheduler, output: Tensor, x_t: Tensor | None = None, t: Tensor | None = None) -> Tensor:
    """x0 logits of prediction "sample": the network's ``output``, plus ``2√ᾱ_t x_t / (1-ᾱ_t)`` (clamped to
    ±``SKIP_LOGIT_LIMIT``) when the scheduler has ``x_skip`` (then ``x_t`` and ``t [B]`` are needed); for Bernoulli
    noise the skip is ``log((1+ᾱ_t)/(1-ᾱ_t)) x_t``, the log-odds of x0 = +1 given a flipped-voxel x_t."""
    if not getattr(scheduler, "x_skip", False):
        return output
    if x_t is None or t is None:
        raise ValueError("this scheduler adds a skip from x_t to the x0 logits: pass x_t and t")
    alpha = _alpha_bar(scheduler, torch.as_tensor(t).reshape(-1).expand(x_t.shape[0]), x_t.float())
    if getattr(scheduler, "noise", "gaussian") == "bernoulli":
        skip = torch.log((1.0 + alpha) / (1.0 - alpha).clamp_min(1e-8)) * x_t.float()
    else:
        skip = (2.0 * alpha.sqrt() / (1.0 - alpha).clamp_min(1e-8)) * x_t.float()
    return output + skip.clamp(-SKIP_LOGIT_LIMIT, SKIP_LOGIT_LIMIT).to(output.dtype)


def x0_from_output(scheduler: DDIMScheduler, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Estimate of x0 in [-1, 1] from the network output at timesteps ``t`` ``[B]`` (DDIM eq. 12)."""
    prediction = scheduler.prediction_type
    if prediction == "sample":
        return 2.0 * torch.sigmoid(x0_logits(scheduler, output, x_t, t)) - 1.0
    alpha = _alpha_bar(scheduler, t, x_t)
    if prediction == "epsilon":
        x0 = (x_t - (1 - alpha).sqrt() * output) / alpha.sqrt()
    else:  # v_prediction
        x0 = alpha.sqrt() * x_t - (1 - alpha).sqrt() * output
    return x0.clamp(-1.0, 1.0)


def training_target(scheduler: DDIMScheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor | None:
    """The regression target of ε / v prediction; None for x0 prediction (its losses act on x0 itself)."""
    if scheduler.prediction_type == "epsilon":
        return noise
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return None


def scheduler_input(scheduler: DDIMScheduler, output: Tensor, x_t: Tensor | None = None,
                    t: Tensor | None = None) -> Tensor:
    """What ``scheduler.step`` expects as ``model_output``: x0 in [-1, 1] for x0 prediction, else as is
    (``x_t`` and ``t`` are needed with ``x_skip``)."""
    if scheduler.prediction_type == "sample":
        return 2.0 * torch.sigmoid(x0_logits(scheduler, output, x_t, t)) - 1.0
    return output


def _alpha_bar(scheduler: DDIMScheduler, t: Tensor, like: Tensor) -> Tensor:
    alphas = scheduler.alphas_cumprod.to(device=like.device, dtype=like.dtype)
    return alphas[t.to(like.device).long()].view(-1, *([1] * (like.ndim - 1)))
