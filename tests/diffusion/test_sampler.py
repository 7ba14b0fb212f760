"""DDIM ensemble sampler: the maths (an oracle denoiser gives back the mask), seeding, shapes, batching of the
ensemble, the encoder running once, uncertainty maps, and whole-volume inference at sizes no window divides."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from monai.networks.schedulers import DDIMScheduler
from torch import Tensor, nn

from medseg_diff.diffusion.sampler import DDIMSampler, SampleOutput, binary_entropy, summarise_members
from medseg_diff.diffusion.schedules import build_scheduler, scheduler_input, x0_from_output
from medseg_diff.inference.sliding_window import infer_volume
from medseg_diff.kinds.segmenters import DiffusionSegmenter, UNetSegmenter
from medseg_diff.models import Conditioning, DenoiserOutput, DiffusionSegUNet, build_baseline_unet

SCHEDULES = ("linear_beta", "scaled_linear_beta", "cosine", "sigmoid_beta")
PREDICTIONS = ("sample", "epsilon", "v_prediction")


def tiny_model(patch_size: int = 1) -> DiffusionSegUNet:
    torch.manual_seed(0)
    return DiffusionSegUNet(channels=(8, 16, 32), linear_attention_levels=(0, 1), cross_attention_levels=(2,),
                            heads=2, dim_head=8, norm_groups=4, patch_size=patch_size).eval()


def image(batch: int = 2, size: tuple[int, int, int] = (8, 8, 8)) -> Tensor:
    return torch.randn(batch, 4, *size, generator=torch.Generator().manual_seed(0))


def sampler(steps: int = 3, ensemble: int = 3, **kwargs) -> DDIMSampler:
    return DDIMSampler(build_scheduler(1000, "linear_beta", "sample"), steps=steps, ensemble=ensemble, **kwargs)


class Oracle(nn.Module):
    """A perfect denoiser: its "image" is the mask x0 ∈ {-1, 1} itself; it outputs the exact x0 logits, ε or v
    for whatever ``x_t`` the sampler hands it, so the sampler must return that mask."""

    def __init__(self, scheduler):
        super().__init__()
        self.prediction = scheduler.prediction_type
        self.register_buffer("alphas", scheduler.alphas_cumprod.double().clone())

    def encode(self, x0: Tensor, external_prior: Tensor | None = None) -> Conditioning:
        return Conditioning(features=[x0])

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        x0, x_t = cond.features[0].double(), x_t.double()
        alpha = self.alphas[t].view(-1, 1, 1, 1, 1)
        eps = (x_t - alpha.sqrt() * x0) / (1 - alpha).sqrt()
        out = {"sample": 30.0 * x0, "epsilon": eps, "v_prediction": alpha.sqrt() * eps - (1 - alpha).sqrt() * x0}
        return out[self.prediction].float()

    def forward_with_attention(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> DenoiserOutput:
        ones = torch.ones_like(x_t[:, :1])
        return DenoiserOutput(self(x_t, t, cond), {"self": ones, "cross": ones})


# -- the maths ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", [False, True], ids=["last-step", "step-weighted"])
def test_a_perfect_denoiser_gives_back_the_mask(schedule, prediction, weighting):
    scheduler = build_scheduler(1000, schedule, prediction)
    regions = (torch.rand(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    out = DDIMSampler(scheduler, steps=4, ensemble=2, step_uncertainty_weighting=weighting).sample(
        Oracle(scheduler), regions * 2 - 1, keep_members=True
    )
    # float32 round-off: ε / v prediction at t = T-1 divide by √ᾱ (cosine: ~1e-2), which the weighted mean keeps
    torch.testing.assert_close(out.probs, regions, atol=1e-3, rtol=0)
    torch.testing.assert_close(out.members, regions[:, None].expand(-1, 2, -1, -1, -1, -1), atol=1e-3, rtol=0)
    assert out.variance.max() < 1e-6 and out.entropy.max() < 1e-2


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_x0_of_scheduler_step_is_the_estimate_of_x0_from_output(prediction):
    """The sampler reads x0 off ``scheduler.step``; a loop that recomputes it with ``x0_from_output`` and skips the
    last step gives the same members."""
    model, x_img, scheduler = tiny_model(), image(2), build_scheduler(1000, "cosine", prediction)
    got = DDIMSampler(scheduler, steps=3, ensemble=2, seed=5).sample(model, x_img, keep_members=True).members
    cond = model.encode(x_img).repeat(2)
    x = torch.randn((4, 3, 8, 8, 8), generator=torch.Generator().manual_seed(5))
    scheduler.set_timesteps(3)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            output = model(x, t.expand(4), cond).float()
            x0 = x0_from_output(scheduler, output, x, t.expand(4))
            if i < 2:
                x, _ = scheduler.step(scheduler_input(scheduler, output), int(t), x)
    torch.testing.assert_close(got, rearrange((x0 + 1) / 2, "(b n) c ... -> b n c ...", n=2))


def test_a_plain_monai_ddim_scheduler_is_refused():
    with pytest.raises(TypeError, match="TrailingDDIMScheduler"):
        DDIMSampler(DDIMScheduler(1000, prediction_type="sample"))


# -- seeding -----------------------------------------------------------------------------------------------------
def test_same_seed_same_result_bitwise_and_another_seed_differs():
    model, x = tiny_model(), image()
    first = sampler(seed=7).sample(model, x)
    again = sampler(seed=7).sample(model, x)
    for name in ("probs", "entropy", "variance"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    for name in first.attention:
        assert torch.equal(first.attention[name], again.attention[name]), name
    assert torch.equal(sampler(seed=0).sample(model, x, seed=7).probs, first.probs), "seed= overrides the default"
    other = sampler(seed=8).sample(model, x)
    assert not torch.equal(other.probs, first.probs)
    assert not torch.equal(other.variance, first.variance)


# -- shapes and batching -------------------------------------------------------------------------------------------
def test_output_shapes_and_attention_maps():
    out = sampler(steps=2, ensemble=3).sample(tiny_model(), image(2, (8, 12, 4)), keep_members=True)
    assert isinstance(out, SampleOutput)
    assert out.probs.shape == (2, 3, 8, 12, 4)
    assert out.entropy.shape == out.variance.shape == (2, 1, 8, 12, 4)
    assert out.members.shape == (2, 3, 3, 8, 12, 4)
    assert {"self", "cross"} <= set(out.attention)
    for name, attention in out.attention.items():
        assert attention.shape == (2, 1, 8, 12, 4), name
        assert torch.isfinite(attention).all() and (attention >= 0).all(), name
    assert 0 <= out.probs.min() and out.probs.max() <= 1
    assert sampler().sample(tiny_model(), image(1), attention=False).attention == {}
    assert sampler().sample(tiny_model(), image(1)).members is None


def test_members_run_as_one_batch_and_the_encoder_runs_once_per_call():
    model, x = tiny_model(), image(2)
    encoder_calls, denoiser_batches = [], []
    model.encoder.register_forward_hook(lambda module, args, out: encoder_calls.append(args[0].shape[0]))
    model.stem.register_forward_pre_hook(lambda module, args: denoiser_batches.append(args[0].shape[0]))
    sampler(steps=4, ensemble=3).sample(model, x)
    assert encoder_calls == [2], "one encoder pass over the B windows, not one per step or member"
    assert denoiser_batches == [2 * 3] * 4, "every one of the K steps denoises all B·N members together"
    sampler(steps=2, ensemble=4).sample(model, x)
    assert encoder_calls == [2, 2] and denoiser_batches[4:] == [2 * 4] * 2


def test_batched_members_equal_each_window_sampled_alone():
    model, x = tiny_model(), image(2)
    both = sampler(seed=3).sample(model, x, keep_members=True)
    # the B·N starting noises come from one generator: window b's members are rows b·N .. b·N + N-1
    alone = sampler(seed=3, ensemble=6).sample(model, x[:1], keep_members=True)
    torch.testing.assert_close(both.members[0], alone.members[0, :3], atol=1e-5, rtol=1e-4)


# -- uncertainty ---------------------------------------------------------------------------------------------------
def test_entropy_is_the_binary_entropy_of_the_mean_summed_over_regions():
    out = sampler(ensemble=3).sample(tiny_model(), image(), keep_members=True)
    mean = out.members.mean(dim=1)
    torch.testing.assert_close(out.probs, mean)
    p = mean.double().clamp(1e-6, 1 - 1e-6)
    by_hand = -(p * p.log() + (1 - p) * (1 - p).log()).sum(dim=1, keepdim=True)
    torch.testing.assert_close(out.entropy.double(), by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.variance, out.members.var(dim=1, unbiased=False).mean(dim=1, keepdim=True))
    assert out.variance.max() > 0


def test_summarise_members_by_hand():
    # two members disagree completely on TC, agree on WT (1) and ET (0)
    members = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]).view(1, 2, 3, 1, 1, 1)
    probs, entropy, variance = summarise_members(members)
    torch.testing.assert_close(probs.flatten(), torch.tensor([0.5, 1.0, 0.0]))
    torch.testing.assert_close(entropy.flatten(), torch.log(torch.tensor([2.0])), atol=1e-4, rtol=0)
    torch.testing.assert_close(variance.flatten(), torch.tensor([0.25 / 3]))
    assert binary_entropy(torch.tensor([0.0, 1.0])).max() < 1e-4


def test_variance_is_zero_with_one_member():
    out = sampler(ensemble=1).sample(tiny_model(), image())
    assert out.variance.shape == (2, 1, 8, 8, 8) and not out.variance.any()
    torch.testing.assert_close(out.entropy, binary_entropy(out.probs).sum(dim=1, keepdim=True))


def test_step_uncertainty_weighting_runs_and_gives_probabilities():
    model, x = tiny_model(), image()
    weighted = sampler(steps=4, step_uncertainty_weighting=True).sample(model, x)
    plain = sampler(steps=4).sample(model, x)
    assert weighted.probs.shape == plain.probs.shape
    assert torch.isfinite(weighted.probs).all() and 0 <= weighted.probs.min() and weighted.probs.max() <= 1
    assert torch.isfinite(weighted.entropy).all() and torch.isfinite(weighted.variance).all()
    assert not torch.equal(weighted.probs, plain.probs)


def test_step_weight_favours_later_steps_and_agreeing_members():
    s = sampler(steps=5, ensemble=2)
    # one window, 2 members: voxel 0 agreed (1, 1), voxel 1 split (0, 1); 1 channel x 2 voxels
    member_probs = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]]).view(2, 1, 2, 1, 1)
    early, late = s._step_weight(member_probs, 1, 2, 0), s._step_weight(member_probs, 1, 2, 4)
    assert early.shape == member_probs.shape
    assert torch.equal(early[0], early[1]), "both members of a window share the weight"
    assert late[0, 0, 0] > early[0, 0, 0] > early[0, 0, 1]  # later > earlier; agreement > disagreement
    torch.testing.assert_close(early[0, 0, 1], torch.tensor([[1.0]]), atol=1e-4, rtol=0)  # entropy 1 bit → e^0


# -- whole volumes -------------------------------------------------------------------------------------------------
SIZE = (21, 19, 17)  # neither a multiple of the strides (4 or 16) nor of the window (16)


@pytest.mark.parametrize("patch_size", [1, 4], ids=["full-resolution", "compact"])
def test_diffusion_whole_volume_at_an_odd_size(patch_size):
    segmenter = DiffusionSegmenter(tiny_model(patch_size), sampler(steps=2, ensemble=2))
    pred = infer_volume(segmenter, torch.randn(1, 4, *SIZE), roi_size=(16, 16, 16), overlap=0.25, sw_batch_size=2)
    assert pred.probs.shape == (3, *SIZE)
    assert pred.entropy.shape == pred.variance.shape == (1, *SIZE)
    assert {"self", "cross"} <= set(pred.attention)
    assert all(a.shape == (1, *SIZE) for a in pred.attention.values())
    assert torch.isfinite(pred.probs).all() and 0 <= pred.probs.min() and pred.probs.max() <= 1
    assert pred.seconds > 0


def test_unet_whole_volume_at_an_odd_size():
    torch.manual_seed(0)
    net = build_baseline_unet(channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
    pred = infer_volume(UNetSegmenter(net), torch.randn(1, 4, *SIZE), roi_size=(16, 16, 16), overlap=0.25)
    assert pred.probs.shape == (3, *SIZE) and pred.entropy.shape == (1, *SIZE)
    assert pred.variance is None and pred.attention == {}
