"""The diffusion U-Net, its image encoder and the baseline: shapes, conditioning, gradients, memory pattern."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from medseg_diff.models import (
    PRIOR_SOURCES,
    Conditioning,
    DenoiserOutput,
    DiffusionSegUNet,
    LinearAttention3d,
    build_baseline_unet,
)

TINY = dict(channels=(8, 16, 32), heads=2, dim_head=8, norm_groups=4, patch_size=1)  # stride 4 (full resolution)


def tiny_model(prior_source: str = "head", **overrides) -> DiffusionSegUNet:
    torch.manual_seed(0)
    kwargs = dict(TINY, linear_attention_levels=(0, 1), cross_attention_levels=(2,), prior_source=prior_source)
    return DiffusionSegUNet(**{**kwargs, **overrides}).eval()


def external_prior(batch: int, *size: int) -> torch.Tensor:
    return torch.rand(batch, 3, *size)


def encode(model: DiffusionSegUNet, image: torch.Tensor) -> Conditioning:
    prior = external_prior(image.shape[0], *image.shape[2:]) if model.prior_source == "external" else None
    return model.encode(image, prior)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (by element count) any op produces while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape = t.numel(), tuple(t.shape)
        return out


# -- memory pattern ----------------------------------------------------------------------------------------------
def test_linear_attention_layer_never_forms_n_by_n():
    layer = LinearAttention3d(16, heads=2, dim_head=16)
    x = torch.randn(1, 16, 32, 32, 32, requires_grad=True)
    n = x[0, 0].numel()
    with LargestTensor() as largest:
        out, attention = layer.forward_with_attention(x)
        (out.mean() + attention.mean()).backward()
    assert largest.numel <= 3 * 32 * n, largest.shape  # the qkv projection, O(N h d)
    assert largest.numel < n * n / 100


def test_model_never_forms_n_by_n_at_high_resolution():
    model = tiny_model(linear_attention_levels=(0, 1)).train()
    image, x_t = torch.randn(1, 4, 32, 32, 32), torch.randn(1, 3, 32, 32, 32)
    n = 32**3  # tokens of the level-0 linear attention
    with LargestTensor() as largest:
        cond = model.encode(image)
        out = model.forward_with_attention(x_t, torch.tensor([10]), cond)
        (out.pred.mean() + cond.prior_logits.mean()).backward()
    assert largest.numel < n * n / 100, largest.shape


# -- gradients ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prior_source", PRIOR_SOURCES)
def test_every_parameter_gets_a_gradient(prior_source):
    model = tiny_model(prior_source).train()
    cond = encode(model, torch.randn(2, 4, 8, 8, 12))
    loss = model(torch.randn(2, 3, 8, 8, 12), torch.tensor([0, 999]), cond).square().mean()
    if cond.prior_logits is not None:
        loss = loss + F.binary_cross_entropy_with_logits(cond.prior_logits, torch.rand_like(cond.prior_logits))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# -- shapes ------------------------------------------------------------------------------------------------------
def test_odd_multiples_of_the_stride():
    model = DiffusionSegUNet(channels=(8, 16, 32, 64), heads=2, dim_head=8, norm_groups=4, patch_size=1).eval()
    assert model.stride == 8
    with torch.no_grad():
        cond = model.encode(torch.randn(1, 4, 48, 40, 56))
        pred = model(torch.randn(1, 3, 48, 40, 56), 500, cond)
    assert pred.shape == (1, 3, 48, 40, 56)
    assert cond.token_grid == (6, 5, 7)
    assert cond.tokens.shape == (1, 6 * 5 * 7, 64)
    assert cond.prior.shape == cond.prior_logits.shape == (1, 3, 6, 5, 7)
    assert [f.shape[1:] for f in cond.features][-1] == (64, 6, 5, 7)


def test_rejects_sizes_that_are_not_multiples_of_the_stride():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiples of the stride 4"):
        model.encode(torch.randn(1, 4, 8, 8, 10))


@pytest.mark.parametrize("prior_source", PRIOR_SOURCES)
def test_encode_once_and_repeat_equals_members_alone(prior_source):
    model = tiny_model(prior_source)
    image, members = torch.randn(2, 4, 8, 12, 8), 3
    prior = external_prior(2, 5, 7, 9) if prior_source == "external" else None
    x_t, t = torch.randn(2 * members, 3, 8, 12, 8), torch.arange(2 * members) * 100
    with torch.no_grad():
        batched = model(x_t, t, model.encode(image, prior).repeat(members))
        for j in range(2 * members):
            b = j // members
            one = model.encode(image[b : b + 1], None if prior is None else prior[b : b + 1])
            alone = model(x_t[j : j + 1], t[j : j + 1], one)
            torch.testing.assert_close(batched[j : j + 1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [(7, 9, 5), (2, 2, 3), (16, 16, 16)], ids=["shrink", "grow", "same-as-image"])
def test_external_prior_is_resampled_to_the_token_grid(size):
    model = tiny_model("external")
    prior = external_prior(1, *size)
    cond = model.encode(torch.randn(2, 4, 16, 16, 16), prior)
    assert cond.token_grid == (4, 4, 4) and cond.prior_logits is None
    assert cond.prior.shape == (2, 3, 4, 4, 4)
    assert 0 <= cond.prior.min() and cond.prior.max() <= 1
    if size == (16, 16, 16):
        torch.testing.assert_close(cond.prior[0], F.avg_pool3d(prior, 4)[0])


def test_external_prior_errors():
    model = tiny_model("external")
    image = torch.randn(1, 4, 8, 8, 8)
    with pytest.raises(ValueError, match="prior_source is 'external' but no external_prior was given"):
        model.encode(image)
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        model.encode(image, torch.full((1, 3, 8, 8, 8), 4.0))
    with pytest.raises(ValueError, match="external_prior must be"):
        model.encode(image, torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="not 'external'"):
        tiny_model("head").encode(image, torch.rand(1, 3, 8, 8, 8))


def test_prior_none_is_zeros_and_still_gives_tokens():
    cond = tiny_model("none").encode(torch.randn(1, 4, 8, 8, 8))
    assert cond.prior_logits is None and not cond.prior.any()
    assert cond.tokens.shape == (1, 8, 32)


def test_attention_maps_are_in_space_with_mean_one():
    model = tiny_model()
    with torch.no_grad():
        cond = model.encode(torch.randn(2, 4, 16, 8, 12))
        x_t, t = torch.randn(2, 3, 16, 8, 12), torch.tensor([1, 2])
        out = model.forward_with_attention(x_t, t, cond)
        pred = model(x_t, t, cond)
    assert isinstance(out, DenoiserOutput)
    torch.testing.assert_close(out.pred, pred, atol=1e-5, rtol=1e-4)  # explicit softmax == SDPA
    assert set(out.attention) == {"self_l0", "self_l1", "cross_l2", "self", "cross"}
    for name, attention in out.attention.items():
        assert attention.shape == (2, 1, 16, 8, 12), name
        torch.testing.assert_close(attention.mean(dim=(1, 2, 3, 4)), torch.ones(2), atol=0.02, rtol=0), name
        assert (attention >= 0).all(), name


def test_token_grid_is_capped():
    model = tiny_model(max_token_grid=2)
    cond = model.encode(torch.randn(1, 4, 16, 16, 8))
    assert cond.token_grid == (2, 2, 2) and cond.prior_logits.shape == (1, 3, 2, 2, 2)
    with torch.no_grad():
        out = model.forward_with_attention(torch.randn(1, 3, 16, 16, 8), 3, cond)
    assert out.attention["cross"].shape == (1, 1, 16, 16, 8)


def test_timestep_forms_agree():
    model = tiny_model(linear_attention_levels=(), cross_attention_levels=())
    cond, x_t = model.encode(torch.randn(2, 4, 8, 8, 8)), torch.randn(2, 3, 8, 8, 8)
    assert cond.tokens is None
    with torch.no_grad():
        ref = model(x_t, torch.tensor([7, 7]), cond)
        torch.testing.assert_close(model(x_t, 7, cond), ref)
        torch.testing.assert_close(model(x_t, torch.tensor([7.0, 7.0]), cond), ref)
        assert not torch.allclose(model(x_t, torch.tensor([7, 900]), cond), ref)
        assert model.forward_with_attention(x_t, 7, cond).attention == {}


def test_configuration_errors():
    with pytest.raises(ValueError, match="prior_source"):
        DiffusionSegUNet(prior_source="clinician")
    with pytest.raises(ValueError, match="cross_attention_levels"):
        DiffusionSegUNet(cross_attention_levels=(4,))


def test_repeated_cond_batch_mismatch_is_reported():
    model = tiny_model()
    cond = model.encode(torch.randn(1, 4, 8, 8, 8))
    with pytest.raises(ValueError, match="cond.repeat"):
        model(torch.randn(2, 3, 8, 8, 8), 1, cond)


# -- baseline ----------------------------------------------------------------------------------------------------
def test_baseline_forward_shape():
    net = build_baseline_unet().eval()
    assert net.stride == 16
    with torch.no_grad():
        assert net(torch.randn(1, 4, 16, 32, 48)).shape == (1, 3, 16, 32, 48)
