"""The compact design: the denoiser at 1/s of the input grid (lossless space-to-depth of x_t), the image encoder
with a strided stem, and where full-resolution work may happen (once per window in ``encode``, never per step)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medseg_diff.config import load_config
from medseg_diff.kinds import build_kind as build_adapter
from medseg_diff.models import DiffusionSegUNet
from medseg_diff.models.blocks import StridedStem, check_patch, depth_to_space, space_to_depth

ROOT = Path(__file__).resolve().parents[2]


def compact_model(patch_size: int, prior_source: str = "head", **overrides) -> DiffusionSegUNet:
    torch.manual_seed(0)
    kwargs = dict(channels=(8, 16, 32), heads=2, dim_head=8, norm_groups=4, linear_attention_levels=(0, 1),
                  cross_attention_levels=(2,), prior_source=prior_source, patch_size=patch_size,
                  encoder_channels=(16, 32, 64), stem_channels=8)
    model = DiffusionSegUNet(**{**kwargs, **overrides}).eval()
    if patch_size > 1:  # the output layer starts at zero (logits 0); give it weights, as training would
        assert not model.head.out[-1].weight.any()
        torch.nn.init.normal_(model.head.out[-1].weight, std=0.02)
    return model


class ConvInputs(TorchDispatchMode):
    """Records the spatial size of every convolution's input while active (Conv1d: the flattened positions)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("convolution"):
            self.sizes.append(tuple(args[0].shape[2:]))
        return func(*args, **(kwargs or {}))


# -- space-to-depth ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch", [1, 2, 4])
def test_space_to_depth_is_lossless_and_local(patch):
    x = torch.randn(2, 3, 8, 16, 4 * patch)
    packed = space_to_depth(x, patch)
    assert packed.shape == (2, 3 * patch**3, 8 // patch, 16 // patch, 4)
    torch.testing.assert_close(depth_to_space(packed, patch), x, rtol=0, atol=0)
    # one packed position holds exactly the voxels of its own patch
    block = x[0, :, patch : 2 * patch, :patch, :patch].reshape(-1).sort().values
    torch.testing.assert_close(packed[0, :, 1, 0, 0].sort().values, block, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, 3, 6, -2])
def test_patch_size_must_be_a_power_of_two(bad):
    with pytest.raises(ValueError, match="power of two"):
        check_patch(bad)
    with pytest.raises(ValueError, match="power of two"):
        compact_model(bad)


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_strided_stem_has_no_full_resolution_layer(patch):
    stem = StridedStem(4, 16, patch=patch, width=8, norm_groups=4)
    with ConvInputs() as convs, torch.no_grad():
        out, detail = stem(torch.randn(1, 4, 32, 32, 32))
    assert out.shape == (1, 16, *(3 * (32 // patch,)))
    assert detail.shape == (1, 8, 16, 16, 16)  # the detail features, at 1/2
    assert convs.sizes[0] == (32, 32, 32)  # the first conv reads the image, strided
    assert all(size[0] <= 16 for size in convs.sizes[1:])  # everything after it runs at 1/2 or coarser


# -- the model -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_size", [2, 4])
def test_shapes_at_one_over_s(patch_size):
    model = compact_model(patch_size)
    assert model.stride == patch_size * 4
    size = (2 * model.stride, model.stride, 3 * model.stride)
    with torch.no_grad():
        cond = model.encode(torch.randn(2, 4, *size))
        out = model.forward_with_attention(torch.randn(2, 3, *size), torch.tensor([10, 900]), cond)
    grid = tuple(s // patch_size for s in size)
    assert [tuple(f.shape[1:]) for f in cond.features] == [
        (8, *grid), (16, *(g // 2 for g in grid)), (32, *(g // 4 for g in grid))]  # denoiser widths
    assert out.pred.shape == (2, 3, *size)
    assert set(out.attention) == {"self_l0", "self_l1", "cross_l2", "self", "cross"}
    for name, attention in out.attention.items():  # maps land on the full-resolution window
        assert attention.shape == (2, 1, *size), name
        torch.testing.assert_close(attention.mean(dim=(1, 2, 3, 4)), torch.ones(2), atol=0.02, rtol=0), name
    with pytest.raises(ValueError, match=f"multiples of the stride {model.stride}"):
        model.encode(torch.randn(1, 4, *(s + patch_size for s in size)))


@pytest.mark.parametrize("patch_size", [2, 4])
def test_no_denoising_step_runs_at_full_resolution(patch_size):
    """Every convolution of a DDIM step (forward with attention maps too) reads a grid of 1/s or coarser;
    the full-resolution image is read once, by the encoder's strided stem."""
    model = compact_model(patch_size)
    size = (4 * model.stride,) * 3
    with torch.no_grad():
        with ConvInputs() as enc:
            cond = model.encode(torch.randn(1, 4, *size))
        with ConvInputs() as step:
            model(torch.randn(1, 3, *size), 500, cond)
            model.forward_with_attention(torch.randn(1, 3, *size), 500, cond)
    voxels = size[0] ** 3
    assert [s for s in enc.sizes if s == size] == [size]  # only the stem's first, strided conv
    # the denoiser's convolutions run at 1/s; only the head's pointwise layers run at 1/2, never at full resolution
    at_half = [s for s in step.sizes if math.prod(s) > voxels // patch_size**3]
    assert step.sizes and all(math.prod(s) == voxels // 8 for s in at_half)
    assert len(at_half) <= 2 * 3  # lift output aside: the two pointwise convs of the head, per forward


@pytest.mark.parametrize("prior_source", ["head", "external", "none"])
def test_every_parameter_gets_a_gradient(prior_source):
    model = compact_model(4, prior_source).train()
    image = torch.randn(2, 4, 16, 16, 32)
    prior = torch.rand(2, 3, 16, 16, 32) if prior_source == "external" else None
    cond = model.encode(image, prior)
    loss = model(torch.randn(2, 3, 16, 16, 32), torch.tensor([0, 999]), cond).square().mean()
    if cond.prior_logits is not None:
        loss = loss + cond.prior_logits.square().mean()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_encode_once_and_repeat_equals_members_alone():
    model = compact_model(2)
    image, members = torch.randn(2, 4, 16, 8, 16), 2
    x_t, t = torch.randn(2 * members, 3, 16, 8, 16), torch.arange(2 * members) * 200
    with torch.no_grad():
        batched = model(x_t, t, model.encode(image).repeat(members))
        for j in range(2 * members):
            alone = model(x_t[j : j + 1], t[j : j + 1], model.encode(image[j // members : j // members + 1]))
            torch.testing.assert_close(batched[j : j + 1], alone, atol=1e-5, rtol=1e-4)


def test_output_depends_on_x_t_within_each_patch():
    """Depth-to-space puts each output voxel back where its input voxel was: changing x_t in one patch changes
    the prediction there (the denoiser reads x_t, not only the image)."""
    model = compact_model(4, linear_attention_levels=(), cross_attention_levels=())
    with torch.no_grad():
        cond = model.encode(torch.randn(1, 4, 16, 16, 16))
        x_t = torch.randn(1, 3, 16, 16, 16)
        base = model(x_t, 100, cond)
        x_t[:, :, :4, :4, :4] += 3.0
        changed = (model(x_t, 100, cond) - base).abs().amax(dim=1)[0]
    assert changed[:4, :4, :4].min() > 0


# -- configs -------------------------------------------------------------------------------------------------------
def test_full_resolution_ablation_is_the_model_of_before():
    """configs/ablations/full_resolution.yaml builds the full-resolution model that the compact design replaced:
    31,900,390 parameters (the count of configs/diffusion.yaml before the change), stride 8, no patching."""
    task = build_adapter(load_config(ROOT / "configs" / "ablations" / "full_resolution.yaml"))
    assert sum(p.numel() for p in task.net.parameters()) == 31_900_390
    assert task.net.patch_size == 1 and task.stride == 8


def test_default_config_is_compact():
    task = build_adapter(load_config(ROOT / "configs" / "diffusion.yaml"))
    assert task.net.patch_size == 4 and task.stride == 16
    assert 96 % task.stride == 0  # base.yaml's roi_size
