"""The mechanisms that make the diffusion model use x_t, its own estimates, a prior and its attention (issue 17):
the skip from x_t, self-conditioning, recycling, the direct control, η > 0, optional priors, the attention loss
and the once-per-member refiner. Tiny volumes; exact where the maths is exact."""

import math

import pytest
import torch
from torch import nn

from medseg_diff.config import config_from_dict
from medseg_diff.diffusion.loss import DiffusionLoss, DiffusionTraining, EncodeDenoise, LossWeights, TrainForward
from medseg_diff.diffusion.sampler import DDIMSampler, predict_x0
from medseg_diff.diffusion.schedules import SKIP_LOGIT_LIMIT, build_scheduler, x0_logits
from medseg_diff.errors import ConfigError
from medseg_diff.kinds.priors import dilate_cube, rough_outline, simulated_prior, simulated_priors
from medseg_diff.models import DiffusionSegUNet
from medseg_diff.models.types import Conditioning


def tiny(**kwargs) -> DiffusionSegUNet:
    torch.manual_seed(0)
    opts = dict(channels=(8, 16), heads=2, dim_head=4, patch_size=2, stem_channels=8,
                linear_attention_levels=(0,), cross_attention_levels=(1,))
    return DiffusionSegUNet(**(opts | kwargs))


def blob(size: int = 16) -> torch.Tensor:
    """[1, 3, S, S, S] nested regions: WT a ball, TC and ET smaller balls."""
    axis = torch.arange(size, dtype=torch.float32) - size / 2 + 0.5
    r = torch.sqrt(sum(g**2 for g in torch.meshgrid(axis, axis, axis, indexing="ij")))
    return torch.stack([r < size / 5, r < size / 3, r < size / 7]).float()[None]


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


class Stub(nn.Module):
    """A network that outputs zeros and records what it was called with."""

    def __init__(self, self_condition: bool = False):
        super().__init__()
        self.self_condition = self_condition
        self.calls: list[dict] = []
        self.weight = nn.Parameter(torch.zeros(()))

    def encode(self, image, external_prior=None):
        return Conditioning(features=[image], prior_logits=None)

    def forward(self, x_t, t, cond, self_cond=None):
        self.calls.append({"x_t": x_t.clone(), "t": torch.as_tensor(t).clone(),
                           "self_cond": None if self_cond is None else self_cond.clone()})
        return torch.zeros_like(x_t) + self.weight

    def forward_with_attention(self, x_t, t, cond, self_cond=None, in_space=True):
        from medseg_diff.models.types import DenoiserOutput

        return DenoiserOutput(self(x_t, t, cond, self_cond), {})


def test_the_skip_adds_the_exact_posterior_log_odds_of_x_t():
    scheduler = build_scheduler(1000, x_skip=True)
    x_t, t = torch.linspace(-0.2, 0.2, 5).view(1, 1, 5, 1, 1).expand(2, 3, 5, 1, 1), torch.tensor([300, 999])
    out = torch.randn(2, 3, 5, 1, 1)
    alpha = scheduler.alphas_cumprod[t].view(2, 1, 1, 1, 1)
    expected = out + (2 * alpha.sqrt() / (1 - alpha) * x_t).clamp(-SKIP_LOGIT_LIMIT, SKIP_LOGIT_LIMIT)
    torch.testing.assert_close(x0_logits(scheduler, out, x_t, t), expected)
    assert x0_logits(build_scheduler(1000), out, x_t, t) is out  # without the skip: the output itself
    with pytest.raises(ValueError, match="x_t and t"):
        x0_logits(scheduler, out)
    with pytest.raises(ValueError, match="x_skip needs prediction 'sample'"):
        build_scheduler(prediction="epsilon", x_skip=True)


def test_with_the_skip_a_network_that_outputs_nothing_recovers_the_noised_true_mask():
    """At ᾱ ≈ 0.9 the skip alone (the Bayes posterior of x_t) gives Dice near 1, and the inverted mask near 0."""
    scheduler = build_scheduler(1000, x_skip=True)
    t = int((scheduler.alphas_cumprod - 0.9).abs().argmin())
    regions = blob()
    noise = torch.randn(regions.shape, generator=torch.Generator().manual_seed(0))
    stub = Stub()
    for x0, want in ((regions * 2 - 1, lambda d: d > 0.95), (1 - regions * 2, lambda d: d < 0.05)):
        x_t = scheduler.add_noise(x0, noise, torch.tensor([t]))
        probs = (predict_x0(stub, scheduler, x_t, torch.tensor([t]), None) + 1) / 2
        assert want(dice(probs[0, 1] > 0.5, regions[0, 1]))


def test_self_conditioning_feeds_each_step_the_previous_estimate():
    scheduler = build_scheduler(1000)
    stub = Stub(self_condition=True)
    DDIMSampler(scheduler, steps=3, ensemble=2, seed=0).sample(stub, torch.zeros(1, 4, 4, 4, 4), attention=False)
    assert len(stub.calls) == 3
    assert stub.calls[0]["self_cond"] is None  # the first step: zeros
    for call in stub.calls[1:]:  # then the last x0 estimate: zero logits -> x0 = 0
        torch.testing.assert_close(call["self_cond"], torch.zeros(2, 3, 4, 4, 4))
    plain = Stub(self_condition=False)
    DDIMSampler(scheduler, steps=2, ensemble=1).sample(plain, torch.zeros(1, 4, 4, 4, 4), attention=False)
    assert all(c["self_cond"] is None for c in plain.calls)


def test_eta_adds_seeded_noise_between_steps_so_members_differ_more():
    net = tiny().eval()
    for p in net.parameters():  # a network that answers something
        nn.init.normal_(p, std=0.1) if p.ndim > 1 else None
    scheduler = build_scheduler(1000, x_skip=True)
    image = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    sample = lambda eta, seed=0: DDIMSampler(scheduler, steps=4, ensemble=4, eta=eta, seed=seed).sample(  # noqa: E731
        net, image, attention=False)
    a, b = sample(1.0), sample(1.0)
    torch.testing.assert_close(a.probs, b.probs)  # seeded
    assert not torch.equal(a.probs, sample(1.0, seed=1).probs)
    assert not torch.equal(a.probs, sample(0.0).probs)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(scheduler, eta=1.5)


def test_direct_mode_trains_on_x_t_zero_at_the_last_timestep_and_samples_once_from_zeros():
    scheduler = build_scheduler(1000)
    stub = Stub()
    loss = DiffusionLoss(scheduler, LossWeights(prior=0.0), DiffusionTraining(mode="direct"))
    loss(EncodeDenoise(stub, scheduler), torch.zeros(2, 4, 4, 4, 4), torch.ones(2, 3, 4, 4, 4),
         torch.Generator().manual_seed(0))
    assert torch.equal(stub.calls[0]["x_t"], torch.zeros(2, 3, 4, 4, 4))
    assert stub.calls[0]["t"].tolist() == [999, 999]
    stub.calls.clear()
    DDIMSampler(scheduler, steps=1, ensemble=1, start="zeros").sample(stub, torch.zeros(1, 4, 4, 4, 4), attention=False)
    assert len(stub.calls) == 1 and torch.equal(stub.calls[0]["x_t"], torch.zeros(1, 3, 4, 4, 4))


def test_recycling_noises_the_models_own_estimate_instead_of_the_truth():
    scheduler = build_scheduler(1000)
    stub = Stub()
    module = EncodeDenoise(stub, scheduler)
    g = torch.Generator().manual_seed(0)
    regions = torch.ones(2, 3, 4, 4, 4)
    loss = DiffusionLoss(scheduler, LossWeights(prior=0.0), DiffusionTraining(recycle=1.0))
    loss(module, torch.zeros(2, 4, 4, 4, 4), regions, g)
    # first call: the estimate from pure noise at T-1; second: x_t built from that estimate (x0 = 0 for a zero
    # network), i.e. sqrt(1 - ᾱ) ε, not the truth's sqrt(ᾱ)·1 + sqrt(1 - ᾱ) ε
    assert len(stub.calls) == 2 and stub.calls[0]["t"].tolist() == [999, 999]
    t = stub.calls[1]["t"]
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    eps = stub.calls[1]["x_t"] / (1 - alpha).sqrt()
    truth_noised = alpha.sqrt() + (1 - alpha).sqrt() * eps
    assert not torch.allclose(stub.calls[1]["x_t"], truth_noised)


def test_optional_prior_model_takes_none_a_prior_or_a_per_case_flagged_prior():
    net = tiny(prior_source="optional").eval()
    nn.init.normal_(net.encoder.stem.to_half[0].weight, std=0.5)
    image, regions = torch.randn(2, 4, 16, 16, 16), blob().expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        none, given = net.encode(image), net.encode(image, rough_outline(regions))
        flagged = net.encode(image, torch.cat([rough_outline(regions), torch.ones(2, 1, 16, 16, 16)], 1))
    assert not torch.allclose(none.features[0], given.features[0])
    torch.testing.assert_close(given.features[0], flagged.features[0])
    with pytest.raises(ValueError, match="probabilities"):
        net.encode(image, regions * 2)


def test_simulated_priors_mix_no_prior_outlines_and_soft_masks():
    regions = blob().expand(64, -1, -1, -1, -1).contiguous()
    priors = simulated_priors(regions, torch.Generator().manual_seed(0))
    assert priors.shape == (64, 4, 16, 16, 16)
    flags = priors[:, 3].flatten(1)
    assert torch.all((flags == 0).all(1) | (flags == 1).all(1))
    absent = (flags == 0).all(1)
    assert 10 <= int(absent.sum()) <= 40 and torch.all(priors[absent] == 0)
    outline = rough_outline(regions[:1])
    assert torch.all(outline[0, :, regions[0, 1] > 0] > 0.5)  # the outline covers the whole tumour
    assert outline.shape == (1, 3, 16, 16, 16) and float(outline.max()) <= 1


@pytest.mark.parametrize("voxels", [1, 2, 3])
def test_dilate_cube_equals_the_cube_max_pool(voxels):
    g = torch.Generator().manual_seed(voxels)
    mask = (torch.rand(2, 1, 16, 12, 9, generator=g) > 0.97).float() * torch.rand(2, 1, 16, 12, 9, generator=g)
    cube = torch.nn.functional.max_pool3d(mask, 2 * voxels + 1, stride=1, padding=voxels)
    assert torch.equal(dilate_cube(mask, voxels), cube) and int((cube > 0).sum()) > int((mask > 0).sum())


def test_soft_priors_are_the_blurred_regions_scaled_by_one_confidence_per_case():
    regions = blob().expand(64, -1, -1, -1, -1).contiguous()
    priors = simulated_priors(regions, torch.Generator().manual_seed(0), none=0.0)
    blurred = simulated_prior(regions[:1], torch.Generator().manual_seed(0))
    box = torch.nn.functional.avg_pool3d(regions[:1], 5, stride=1, padding=2, count_include_pad=False)[0]
    soft = [i for i in range(64) if not torch.equal(priors[i, 0], priors[i, 1])]  # outlines copy one channel
    assert len(soft) >= 10
    for i in soft:
        scale = priors[i, :3][box > 0.5] / box[box > 0.5]
        assert torch.allclose(scale, scale[0].expand_as(scale)) and 0.5 <= float(scale[0]) <= 1.0
    assert blurred.shape == (1, 3, 16, 16, 16)


def test_attention_loss_is_smaller_when_the_cross_attention_mass_sits_on_the_tumour():
    scheduler = build_scheduler(1000)
    regions = blob()
    loss_fn = DiffusionLoss(scheduler, LossWeights(prior=0.0, attention=1.0))
    on = torch.nn.functional.adaptive_avg_pool3d(regions[:, 1:2], 4)
    on = on / on.mean()
    off = torch.ones_like(on)
    values = []
    for mass in (on, off):
        out = loss_fn.from_output(torch.zeros_like(regions), None, regions, regions, regions, torch.tensor([10]),
                                  regions)
        loss_fn._attention_loss(out, {"cross_l1": mass}, regions)
        values.append(out.parts["attention"])
    assert values[0] == pytest.approx(0.0, abs=1e-5) and values[1] > 0.1


def test_the_refiner_starts_as_the_identity_and_runs_once_per_member_after_the_last_step():
    net = tiny(refine=True).eval()
    cond = net.encode(torch.randn(1, 4, 16, 16, 16))
    logits = torch.randn(1, 3, 16, 16, 16)
    torch.testing.assert_close(net.refine(logits, cond), logits)  # zero-initialised last layer
    nn.init.normal_(net.refiner.body[-1].weight, std=0.1)
    assert not torch.allclose(net.refine(logits, cond), logits)
    calls = []
    original = net.refine
    net.refine = lambda *a: calls.append(1) or original(*a)
    DDIMSampler(build_scheduler(1000), steps=3, ensemble=2).sample(net, torch.randn(1, 4, 16, 16, 16),
                                                                   attention=False)
    assert calls == [1]  # one call for the batch of members, after the loop
    assert not tiny().refines


def test_the_refiner_width_is_its_own_setting_and_defaults_to_half_the_stem():
    from medseg_diff.config import config_from_dict

    assert tiny(refine=True).refiner.image.out_channels == 4  # stem_channels 8 // 2
    net = tiny(refine=True, refine_width=2)
    assert net.refiner.image.out_channels == 2 and net.refiner.body[1].in_channels == 2 + 3
    cfg = config_from_dict({"model": {"kind": "diffusion", "denoiser": {"refine": True, "refine_width": 4}}})
    assert cfg.model.denoiser.refine_width == 4
    with pytest.raises(ConfigError, match="model.denoiser.refine_width"):
        config_from_dict({"model": {"kind": "diffusion", "denoiser": {"refine": True, "refine_width": 0}}})


def test_the_refiners_image_context_runs_once_per_window_and_keeps_old_networks_as_they_were():
    from medseg_diff.config import config_from_dict
    from medseg_diff.kinds.diffusion import DiffusionKind

    image = torch.randn(1, 4, 16, 16, 16)
    plain, deep = tiny(refine=True).eval(), tiny(refine=True, refine_context=2).eval()
    assert len(plain.refiner.context) == 0 and len(deep.refiner.context) == 2
    assert {k for k in deep.state_dict() if ".context." in k} == {f"refiner.context.{i}.1.{p}" for i in (0, 1)
                                                                    for p in ("weight", "bias")}
    assert set(plain.state_dict()) == {k for k in deep.state_dict() if ".context." not in k}
    with torch.no_grad():
        f = deep.refiner.image(image)
        f = f + deep.refiner.context[0](f)
        torch.testing.assert_close(deep.encode(image).full, f + deep.refiner.context[1](f))
    spec = lambda **d: DiffusionKind.network_spec(config_from_dict(  # noqa: E731
        {"model": {"kind": "diffusion", "denoiser": {"refine": True, **d}}}))["kwargs"]
    assert "refine_context" not in spec() and spec(refine_context=2)["refine_context"] == 2
    with pytest.raises(ConfigError, match="model.denoiser.refine_context"):
        spec(refine_context=-1)


def test_training_through_the_new_paths_reaches_every_parameter():
    net = tiny(prior_source="optional", self_condition=True, token_source="prior", token_level=0, refine=True,
               cross_attention_levels=(0, 1)).train()
    scheduler = build_scheduler(1000, x_skip=True)
    g = torch.Generator().manual_seed(0)
    regions = blob().expand(2, -1, -1, -1, -1).contiguous()
    loss_fn = DiffusionLoss(scheduler, LossWeights(attention=0.5), DiffusionTraining(self_condition=1.0))
    out = loss_fn(EncodeDenoise(net, scheduler), torch.randn(2, 4, 16, 16, 16), regions, g,
                  external_prior=simulated_priors(regions, g))
    assert {"attention", "refined_dice_loss", "prior"} <= set(out.parts) and math.isfinite(out.parts["loss"])
    out.total.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    assert isinstance(EncodeDenoise(net, scheduler)(torch.zeros(2, 3, 16, 16, 16), torch.tensor([5, 5]),
                                                    torch.randn(2, 4, 16, 16, 16)), TrainForward)


@pytest.mark.parametrize("key, value, match", [
    ("diffusion.eta", 1.5, "must be in \\[0, 1\\]"),
    ("diffusion.recycle", -0.1, "must be in \\[0, 1\\]"),
    ("model.denoiser.token_level", 5, "must index one of"),
])
def test_config_refuses_out_of_range_mechanism_settings(key, value, match):
    section, *rest = key.split(".")
    raw: dict = {}
    node = raw.setdefault(section, {})
    for part in rest[:-1]:
        node = node.setdefault(part, {})
    node[rest[-1]] = value
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_config_refuses_the_skip_with_epsilon_prediction():
    with pytest.raises(ConfigError, match="x_skip"):
        config_from_dict({"diffusion": {"x_skip": True, "prediction": "epsilon"}})


def test_chain_training_feeds_a_step_what_the_sampler_feeds_it():
    """``chain`` = 1: each sample is the sampler's own chain run to a random one of its K steps -- the x_t, t and
    self-conditioning input of that step, not the truth noised."""
    scheduler = build_scheduler(1000, x_skip=True)
    stub = Stub(self_condition=True)
    regions = torch.ones(8, 3, 4, 4, 4)
    loss = DiffusionLoss(scheduler, LossWeights(prior=0.0),
                         DiffusionTraining(chain=1.0, chain_steps=2, eta=1.0, self_condition=0.5))
    loss(EncodeDenoise(stub, scheduler), torch.zeros(8, 4, 4, 4, 4), regions, torch.Generator().manual_seed(0))
    # the chain's pass at t = 999 for the samples that stop at step 1, then the step trained, with gradient
    chain, trained = stub.calls[:-1], stub.calls[-1]
    assert len(chain) == 1 and set(chain[0]["t"].tolist()) == {999} and chain[0]["self_cond"] is None
    t = trained["t"]
    assert set(t.tolist()) == {999, 499}  # the sampler's two timesteps (trailing spacing), not a uniform draw
    first, second = t == 999, t == 499
    # step 0: pure noise and no estimate yet; step 1: the chain's estimate (zero logits + skip of pure noise at
    # ᾱ ~ 4e-5: about 0) and x from a DDIM step with η = 1 from it -- not sqrt(ᾱ)·1 + noise of the truth
    assert torch.all(trained["self_cond"][first] == 0)
    assert int(second.sum()) == chain[0]["x_t"].shape[0] >= 1  # the chain runs only for the samples that need it
    x1 = trained["x_t"][second]
    assert abs(float(x1.mean())) < 0.2  # an estimate near 0 noised: centred, where the truth (all 1) would not be
    alpha = scheduler.alphas_cumprod[499]
    assert float(x1.std()) > 0.5 and float(x1.mean()) < float(alpha.sqrt()) - 0.1
    torch.testing.assert_close(trained["self_cond"][second].abs().max(), torch.tensor(0.0), atol=0.05, rtol=0)


def test_chain_training_is_seeded_and_leaves_chain_zero_as_it_was():
    scheduler = build_scheduler(1000, x_skip=True)
    regions, image = blob(4).expand(4, -1, -1, -1, -1), torch.zeros(4, 4, 4, 4, 4)

    def run(chain: float) -> list[dict]:
        stub = Stub(self_condition=True)
        DiffusionLoss(scheduler, LossWeights(prior=0.0), DiffusionTraining(chain=chain, self_condition=0.5))(
            EncodeDenoise(stub, scheduler), image, regions, torch.Generator().manual_seed(3))
        return stub.calls

    a, b = run(1.0), run(1.0)
    assert all(torch.equal(x["x_t"], y["x_t"]) and torch.equal(x["t"], y["t"]) for x, y in zip(a, b))
    plain = run(0.0)
    assert len(plain[-1]["t"]) == 4 and not set(plain[-1]["t"].tolist()) <= {999, 499}
    with pytest.raises(ConfigError, match="diffusion.chain"):
        config_from_dict({"diffusion": {"chain": 0.5, "prediction": "epsilon", "x_skip": False}})


def test_the_self_conditioning_rate_is_a_setting_with_the_old_default():
    from medseg_diff.config import config_from_dict
    from medseg_diff.kinds.diffusion import DiffusionKind

    def rate(**d) -> float:
        cfg = config_from_dict({"model": {"kind": "diffusion", "denoiser": {"self_condition": True}}, "diffusion": d})
        return DiffusionKind(cfg).objective().loss_fn.training.self_condition

    assert rate() == 0.5 and rate(self_condition_rate=0.8) == 0.8
    with pytest.raises(ConfigError, match="diffusion.self_condition_rate"):
        rate(self_condition_rate=1.5)
