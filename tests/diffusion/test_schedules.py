"""Noise maths (schedules.py) and the training loss (loss.py) that is built on it.

The schedule checks run in float64 so that "exact" means round-off, not a loose tolerance: the x0 estimate
and the regression targets must invert ``add_noise`` for every prediction type and every MONAI schedule, and
the DDIM chain fed the true prediction must land on x0.
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from medseg_diff.diffusion.loss import DiffusionLoss, EncodeDenoise, LossWeights
from medseg_diff.diffusion.schedules import (
    TrailingDDIMScheduler,
    build_scheduler,
    scheduler_input,
    training_target,
    x0_from_output,
    x0_logits,
)
from medseg_diff.models import DiffusionSegUNet

SCHEDULES = ("linear_beta", "scaled_linear_beta", "cosine", "sigmoid_beta")
PREDICTIONS = ("sample", "epsilon", "v_prediction")
SHAPE = (2, 3, 4, 4, 4)


def binary_mask(seed: int = 0) -> torch.Tensor:
    """x0 in {-1, 1}, float64 ``[2, 3, 4, 4, 4]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, SHAPE, generator=g).double() * 2 - 1


def true_output(scheduler, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a perfect network outputs at ``x_t`` for a known ``x0``: x0 logits, ε or v (eq. 4 solved for ε)."""
    alpha = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1, 1)
    eps = (x_t - alpha.sqrt() * x0) / (1 - alpha).sqrt()
    if scheduler.prediction_type == "sample":
        return 60.0 * x0  # logits: 2σ(±60) - 1 is ±1 exactly in float64
    if scheduler.prediction_type == "epsilon":
        return eps
    return alpha.sqrt() * eps - (1 - alpha).sqrt() * x0


# -- trailing timesteps --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,K", [(1000, 10), (1000, 5), (1000, 1), (1000, 2), (1000, 3), (1000, 7), (100, 7), (50, 50)])
def test_trailing_timesteps_match_the_ddim_step_stride(T, K):
    scheduler = build_scheduler(T)
    assert isinstance(scheduler, TrailingDDIMScheduler) and isinstance(scheduler, DDIMScheduler)
    scheduler.set_timesteps(K)
    timesteps = scheduler.timesteps
    stride = T // K
    assert timesteps.dtype == torch.long and len(timesteps) == K
    assert scheduler.num_inference_steps == K
    # uniform spacing, equal to the stride DDIMScheduler.step moves by (t -> t - T // num_inference_steps)
    assert (timesteps[:-1] - timesteps[1:] == stride).all()
    # ends where step() lands on t < 0 (ᾱ_prev = 1, the clean mask); starts at T-1 whenever K divides T,
    # otherwise within K-1 of it (the T mod K leftover steps are dropped at the noisy end)
    assert timesteps[-1] == stride - 1 and timesteps[-1] - stride < 0
    assert timesteps[0] == K * stride - 1 and T - K <= timesteps[0] <= T - 1
    if T % K == 0:
        assert timesteps[0] == T - 1


def test_trailing_scheduler_is_monai_ddim_apart_from_the_inference_timesteps():
    ours, monai = build_scheduler(1000, "cosine", "v_prediction"), DDIMScheduler(
        1000, "cosine", clip_sample=True, set_alpha_to_one=True, prediction_type="v_prediction")
    # MONAI's __init__ calls set_timesteps(T): K = T, stride 1, the same T-1, ..., 0 either way
    assert torch.equal(ours.timesteps, monai.timesteps) and ours.num_inference_steps == monai.num_inference_steps
    assert torch.equal(ours.alphas_cumprod, monai.alphas_cumprod)
    ours.set_timesteps(7, device="cpu")
    monai.set_timesteps(7)
    assert ours.num_inference_steps == monai.num_inference_steps == 7
    assert ours.timesteps.device.type == "cpu" and not torch.equal(ours.timesteps, monai.timesteps)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for a, b in zip(ours.step(out, 999, x), monai.step(out, 999, x)):
        assert torch.equal(a, b), "step() is MONAI's"
    with pytest.raises(ValueError, match="cannot be larger"):
        ours.set_timesteps(1001)
    with pytest.raises(ValueError, match="steps_offset"):
        TrailingDDIMScheduler(1000, steps_offset=1)


@pytest.mark.parametrize("T,K", [(1000, 10), (1000, 3), (100, 7)])
def test_each_ddim_step_with_the_true_x0_lands_on_the_next_trailing_timestep(T, K):
    """η = 0 with the exact x0: x_{t_i} = add_noise(x0, ε, t_i) at every step, so the stride step() uses is ours."""
    scheduler = build_scheduler(T)
    x0, eps = binary_mask(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scheduler.set_timesteps(K)
    timesteps = scheduler.timesteps
    x = scheduler.add_noise(x0, eps, timesteps[:1].expand(2))
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        x, _ = scheduler.step(x0, int(t), x)
        torch.testing.assert_close(x, scheduler.add_noise(x0, eps, t_next.expand(2)), atol=1e-9, rtol=0)


# -- x0 estimate and regression targets ----------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_x0_is_recovered_exactly_from_the_true_output(schedule, prediction):
    scheduler = build_scheduler(1000, schedule, prediction)
    x0 = binary_mask()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([0, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    target = training_target(scheduler, x0, noise, t)
    output = 60.0 * x0 if prediction == "sample" else target
    torch.testing.assert_close(x0_from_output(scheduler, output, x_t, t), x0, atol=1e-9, rtol=0)
    torch.testing.assert_close(true_output(scheduler, x0, x_t, t), output, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("prediction", ("epsilon", "v_prediction"))
def test_x0_recovery_is_not_the_clamp_doing_the_work(prediction):
    """Soft x0 strictly inside (-1, 1): recovered exactly too, at mid-chain timesteps."""
    scheduler = build_scheduler(1000, "cosine", prediction)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 1.8 - 0.9
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    t = torch.tensor([250, 700])
    x_t = scheduler.add_noise(x0, noise, t)
    recovered = x0_from_output(scheduler, training_target(scheduler, x0, noise, t), x_t, t)
    torch.testing.assert_close(recovered, x0, atol=1e-9, rtol=0)


def test_training_targets():
    x0, noise, t = binary_mask(), torch.randn(SHAPE, dtype=torch.float64), torch.tensor([10, 900])
    assert training_target(build_scheduler(prediction="sample"), x0, noise, t) is None
    assert training_target(build_scheduler(prediction="epsilon"), x0, noise, t) is noise
    scheduler = build_scheduler(prediction="v_prediction")
    alpha = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1, 1)
    v = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0  # Salimans & Ho 2022, v = α ε − σ x0
    torch.testing.assert_close(training_target(scheduler, x0, noise, t), v, atol=1e-12, rtol=0)


def test_sample_prediction_maps_logits_into_minus_one_one():
    scheduler = build_scheduler(prediction="sample")
    logits = torch.tensor([-1e4, -2.0, 0.0, 2.0, 1e4]).view(1, 5, 1, 1, 1)
    x0 = x0_from_output(scheduler, logits, torch.zeros_like(logits), torch.tensor([500]))
    torch.testing.assert_close(x0, 2 * torch.sigmoid(logits) - 1)
    torch.testing.assert_close(scheduler_input(scheduler, logits), x0)
    assert x0[0, 2].item() == 0.0 and x0[0, 0].item() == -1.0 and x0[0, 4].item() == 1.0
    eps = torch.randn(1, 3, 2, 2, 2)
    assert scheduler_input(build_scheduler(prediction="epsilon"), eps) is eps


# -- the whole DDIM chain ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("K", [1, 4, 10])
def test_ddim_with_the_true_prediction_reaches_x0_at_the_last_step(schedule, prediction, K):
    scheduler = build_scheduler(1000, schedule, prediction)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()  # as add_noise leaves it for float64 inputs
    x0 = binary_mask(seed=K)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    scheduler.set_timesteps(K)
    for t in scheduler.timesteps:
        output = true_output(scheduler, x0, x, t.expand(2))
        x, x0_hat = scheduler.step(scheduler_input(scheduler, output), int(t), x, eta=0.0)
        torch.testing.assert_close(x0_hat, x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_monai_schedule_builds(schedule):
    scheduler = build_scheduler(1000, schedule, "sample")
    alphas = scheduler.alphas_cumprod
    assert alphas.shape == (1000,) and torch.isfinite(alphas).all()
    assert (alphas[1:] < alphas[:-1]).all(), "ᾱ_t must fall monotonically"
    assert alphas[0] > 0.99 and 0 <= alphas[-1] < 1e-2, "t = 0 is almost clean, t = T-1 almost pure noise"
    assert scheduler.prediction_type == "sample" and scheduler.clip_sample


# -- loss ----------------------------------------------------------------------------------------------------------
def tiny_net(prior_source: str) -> DiffusionSegUNet:
    torch.manual_seed(0)
    net = DiffusionSegUNet(channels=(8, 16), linear_attention_levels=(0,), cross_attention_levels=(1,), heads=2,
                           dim_head=8, norm_groups=4, prior_source=prior_source, patch_size=2)
    torch.nn.init.normal_(net.head.out[-1].weight, std=0.02)  # zero at init; as after the first update
    return net


@pytest.mark.parametrize("prior_source", ("head", "none"))
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_diffusion_loss_is_finite_and_reaches_every_parameter(prediction, prior_source):
    net = tiny_net(prior_source).train()
    loss_fn = DiffusionLoss(build_scheduler(1000, "linear_beta", prediction), LossWeights())
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 4, 8, 8, 8, generator=g)
    regions = (torch.rand(2, 3, 8, 8, 8, generator=g) > 0.6).float()
    out = loss_fn(EncodeDenoise(net), image, regions, generator=g)
    assert out.total.ndim == 0 and torch.isfinite(out.total)
    assert all(math.isfinite(v) for v in out.parts.values())
    assert {"dice_loss", "bce", "mse", "loss"} <= set(out.parts)
    assert ("prior" in out.parts) == (prior_source == "head")
    out.total.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    if prior_source == "head":
        assert any(name.startswith("encoder.prior_head") for name, _ in net.named_parameters())


def test_prior_loss_weight_zero_drops_the_prior_term():
    net = tiny_net("head")
    loss_fn = DiffusionLoss(build_scheduler(), LossWeights(prior=0.0))
    g = torch.Generator().manual_seed(0)
    out = loss_fn(EncodeDenoise(net), torch.randn(1, 4, 8, 8, 8), torch.ones(1, 3, 8, 8, 8), generator=g)
    assert "prior" not in out.parts


def test_diffusion_loss_is_seeded():
    net = tiny_net("head")
    loss_fn = DiffusionLoss(build_scheduler(prediction="epsilon"), LossWeights())
    image, regions = torch.randn(2, 4, 8, 8, 8), torch.ones(2, 3, 8, 8, 8)
    runs = [loss_fn(EncodeDenoise(net), image, regions, torch.Generator().manual_seed(s)).parts for s in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_of_the_perfect_prediction_is_small(prediction):
    """The loss is minimised by the true output: the x0 / ε / v parameterisations all agree on what is right."""
    scheduler = build_scheduler(1000, "linear_beta", prediction)
    loss_fn = DiffusionLoss(scheduler, LossWeights(prior=0.0))
    g = torch.Generator().manual_seed(0)
    regions = (torch.rand(2, 3, 8, 8, 8, generator=g) > 0.5).float()
    x0, noise, t = regions * 2 - 1, torch.randn(2, 3, 8, 8, 8, generator=g), torch.tensor([20, 300])
    x_t = scheduler.add_noise(x0, noise, t)
    perfect = true_output(scheduler, x0.double(), x_t.double(), t).float()
    if prediction == "sample":
        perfect = perfect / 6.0  # logits ±10: BCE ~ 5e-5
    good = loss_fn.from_output(perfect, None, x_t, x0, noise, t, regions)
    bad = loss_fn.from_output(torch.zeros_like(perfect), None, x_t, x0, noise, t, regions)
    assert good.parts["loss"] < 1e-3 < bad.parts["loss"]


# -- SNR shift -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("shift", [8.0, 64.0])
def test_snr_shift_divides_the_signal_to_noise_ratio_at_every_step(schedule, shift):
    base, shifted = build_scheduler(1000, schedule), build_scheduler(1000, schedule, snr_shift=shift)
    snr = lambda s: s.alphas_cumprod.double() / (1 - s.alphas_cumprod.double())  # noqa: E731
    keep = base.alphas_cumprod > 1e-6  # where float32 still resolves ᾱ
    torch.testing.assert_close(snr(shifted)[keep], snr(base)[keep] / shift, rtol=2e-3, atol=0)
    assert (shifted.alphas_cumprod <= base.alphas_cumprod).all()  # noisier at every t
    torch.testing.assert_close(shifted.alphas_cumprod, torch.cumprod(shifted.alphas, 0))
    torch.testing.assert_close(shifted.alphas, 1 - shifted.betas)


def test_snr_shift_of_one_is_the_plain_schedule_and_the_shift_reaches_add_noise():
    plain, one = build_scheduler(), build_scheduler(snr_shift=1.0)
    assert torch.equal(plain.alphas_cumprod, one.alphas_cumprod)
    shifted = build_scheduler(snr_shift=8.0)
    x0, noise, t = torch.ones(1, 3, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2), torch.tensor([300])
    assert shifted.add_noise(x0, noise, t).mean() == pytest.approx(float(shifted.alphas_cumprod[300].sqrt()))
    assert shifted.add_noise(x0, noise, t).mean() < plain.add_noise(x0, noise, t).mean()


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_with_a_shifted_schedule_and_the_true_prediction_lands_on_x0(prediction):
    scheduler = build_scheduler(1000, "linear_beta", prediction, snr_shift=8.0)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    x0 = binary_mask(1)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scheduler.set_timesteps(5)
    for t in scheduler.timesteps:
        output = true_output(scheduler, x0, x, t.expand(SHAPE[0]))
        x, _ = scheduler.step(scheduler_input(scheduler, output), int(t), x, eta=0.0)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-6)


# -- Bernoulli forward process (BerDiff) ---------------------------------------------------------------------------


def test_bernoulli_noise_keeps_each_voxel_with_the_schedules_probability_and_stays_a_mask():
    scheduler = build_scheduler(1000, "linear_beta", "sample", noise="bernoulli")
    g = torch.Generator().manual_seed(0)
    x0 = torch.where(torch.rand(4, 3, 16, 16, 16, generator=g) < 0.3, 1.0, -1.0)
    for t in (0, 99, 499, 999):
        noise = torch.randn(x0.shape, generator=g)
        x_t = scheduler.add_noise(x0, noise, torch.full((4,), t))
        assert set(x_t.unique().tolist()) <= {-1.0, 1.0}
        alpha = float(scheduler.alphas_cumprod[t])
        assert float((x_t == x0).float().mean()) == pytest.approx((1 + alpha) / 2, abs=0.01)  # 49,152 voxels
        assert torch.equal(x_t, scheduler.add_noise(x0, noise, torch.full((4,), t)))  # decided by the noise only
    start = scheduler.start_sample(torch.randn(x0.shape, generator=g))
    assert set(start.unique().tolist()) == {-1.0, 1.0} and abs(float(start.mean())) < 0.02  # a fair coin


def test_bernoulli_skip_is_the_exact_posterior_log_odds_of_a_flipped_voxel():
    scheduler = build_scheduler(1000, "linear_beta", "sample", x_skip=True, noise="bernoulli")
    t = torch.tensor([99])
    alpha = float(scheduler.alphas_cumprod[99])
    x_t = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1)
    p = torch.sigmoid(x0_logits(scheduler, torch.zeros_like(x_t), x_t, t)).flatten()
    # with a 50/50 prior on x0: P(x0 = +1 | x_t = +1) = P(x_t = +1 | +1) / (P(x_t = +1 | +1) + P(x_t = +1 | -1))
    # = ((1 + ᾱ) / 2) / 1, and P(x0 = +1 | x_t = -1) = (1 - ᾱ) / 2
    assert p[0].item() == pytest.approx((1 + alpha) / 2, rel=1e-5)
    assert p[1].item() == pytest.approx((1 - alpha) / 2, rel=1e-5)


@pytest.mark.parametrize("K", (1, 2, 10))
def test_bernoulli_sampling_with_the_true_x0_lands_on_it_and_draws_masks_on_the_way(K):
    scheduler = build_scheduler(1000, "linear_beta", "sample", noise="bernoulli")
    scheduler.set_timesteps(K)
    g = torch.Generator().manual_seed(1)
    x0 = binary_mask(1).float()
    x = scheduler.start_sample(torch.randn(x0.shape, generator=g))
    for i, t in enumerate(scheduler.timesteps):
        x, estimate = scheduler.step(x0, int(t), x, eta=1.0, generator=g)
        assert torch.equal(estimate, x0)
        assert set(x.unique().tolist()) <= {-1.0, 1.0}  # η = 1: each member draws a mask
    assert torch.equal(x, x0)  # the last step lands on ᾱ = 1: the estimate itself
    # η = 0 takes the posterior mean instead: deterministic, soft, and still x0 at the end
    scheduler.set_timesteps(K)
    x = scheduler.start_sample(torch.randn(x0.shape, generator=g))
    for t in scheduler.timesteps:
        x, _ = scheduler.step(x0, int(t), x, eta=0.0)
    assert torch.allclose(x, x0)


def test_bernoulli_posterior_agrees_with_the_forward_process():
    """q(x_s | x_t, x0) from ``step`` equals the Bayes posterior computed by counting forward draws of the chain
    x0 -> x_s -> x_t (each hop flips with the schedule's conditional probabilities)."""
    scheduler = build_scheduler(1000, "linear_beta", "sample", noise="bernoulli")
    scheduler.set_timesteps(4)  # t = 749 -> s = 499
    a_t, a_s = (float(scheduler.alphas_cumprod[i]) for i in (749, 499))
    g = torch.Generator().manual_seed(3)
    n = 400_000
    x_s = torch.where(torch.rand(n, generator=g) < (1 + a_s) / 2, 1.0, -1.0)  # x0 = +1, kept or coined
    a = a_t / a_s
    x_t = torch.where(torch.rand(n, generator=g) < a, x_s, torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0))
    for observed in (1.0, -1.0):
        empirical = float((x_s[x_t == observed] == 1).float().mean())
        prev, _ = scheduler.step(torch.ones(1), 749, torch.tensor([observed]), eta=0.0)  # the estimate x0 = +1
        assert (float(prev) + 1) / 2 == pytest.approx(empirical, abs=0.005)


def test_bernoulli_noise_needs_x0_prediction():
    with pytest.raises(ValueError, match="Bernoulli noise needs prediction 'sample'"):
        build_scheduler(prediction="epsilon", noise="bernoulli")
    with pytest.raises(ValueError, match="noise must be"):
        build_scheduler(noise="uniform")


def test_bernoulli_diffusion_loss_trains_every_parameter():
    net = tiny_net("head").train()
    loss_fn = DiffusionLoss(build_scheduler(1000, "linear_beta", "sample", x_skip=True, noise="bernoulli"),
                            LossWeights())
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 4, 8, 8, 8, generator=g)
    regions = (torch.rand(2, 3, 8, 8, 8, generator=g) > 0.6).float()
    out = loss_fn(EncodeDenoise(net), image, regions, generator=g)
    out.total.backward()
    assert torch.isfinite(out.total)
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
