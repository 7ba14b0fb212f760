"""Loss, network and sampler fit together: a small diffusion U-Net trained on one tiny case with ``DiffusionLoss``
(x0 prediction) is DDIM-sampled from pure noise back to that case's mask with Dice > 0.9 on every region (the
full-resolution model; > 0.75 for the compact one, see SETTINGS).

What this pins end to end: the loss trains the output as x0 logits of the {0, 1} regions in [TC, WT, ET] order
and the sampler reads it the same way (x0 = 2σ - 1 into ``DDIMScheduler.step``, member probabilities
(x0 + 1) / 2, mean over members); handing the scheduler raw logits instead drops ET below 0.9. What it cannot
pin: on one deterministic case the image alone fixes the mask, so a network may ignore x_t, and a schedule or
timestep mismatch between training and sampling barely moves the Dice (checked: cosine instead of linear,
MONAI's linspace timesteps, K = 1: all within 0.01). Those are pinned exactly elsewhere: in float64 in
test_schedules.py and with a perfect denoiser in test_sampler.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import tiny_label
from monai.transforms import NormalizeIntensity

from medseg_diff.data.conventions import BRATS2021, REGIONS
from medseg_diff.diffusion.loss import DiffusionLoss, EncodeDenoise, LossWeights
from medseg_diff.diffusion.sampler import DDIMSampler
from medseg_diff.diffusion.schedules import build_scheduler
from medseg_diff.models import DiffusionSegUNet

SIZE = 16
LR, NOISE_LEVELS = 3e-3, 2
# (patch size, training steps, Dice every region must exceed): the full-resolution model, and the compact one
# (denoiser on an 8^3 grid of 2^3 patches). The compact model draws this case's 1-2 voxel thin enhancing rim
# through its pointwise 1/2-resolution head and needs more steps for a rougher fit: Dice 0.87 / 0.90 / 0.79
# (TC / WT / ET) after 200 steps where the full-resolution model reaches 0.99 / 0.99 / 0.95 after 120. What
# the compact design costs on realistic phantoms is measured in benchmarks/README.md (ablations).
SETTINGS = {"full-resolution": (1, 120, 0.9), "compact": (2, 200, 0.75)}
# mean intensity per label (0 background, 1 NCR, 2 ED, 4 ET) in t1, t1ce, t2, flair: dark necrotic core on
# T1ce, enhancing rim bright on T1ce, edema bright on FLAIR/T2, as in a glioblastoma
CONTRAST = {0: (100, 90, 80, 70), 1: (60, 80, 160, 90), 2: (90, 95, 140, 160), 4: (110, 200, 120, 120)}


def tiny_case(size: int = SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image [1, 4, s, s, s] normalised channel-wise over the head, regions [1, 3, s, s, s] in {0, 1})``."""
    label = tiny_label((size,) * 3, BRATS2021, seed=seed)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    head = np.sqrt(((grid - (size - 1) / 2) ** 2).sum(0)) < size * 0.48
    mean = np.zeros((4, *label.shape), np.float32)
    for value, means in CONTRAST.items():
        mean[:, label == value] = np.asarray(means, np.float32)[:, None]
    image = np.where(head | (label > 0), mean + rng.normal(0, 5, mean.shape), 0).astype(np.float32)
    image = NormalizeIntensity(nonzero=True, channel_wise=True)(torch.from_numpy(image))
    regions = torch.from_numpy(BRATS2021.to_regions(label)).float()
    return torch.as_tensor(image)[None].float(), regions[None]


def dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))


@pytest.fixture
def one_thread():
    """Tensors this small gain little from a second thread, and lose 3-10x when the cores are shared with
    another job (OpenMP threads spin waiting for each other); one thread keeps the run at ~20 s either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("setting", SETTINGS)
def test_trained_on_one_case_the_sampler_gives_back_its_mask(one_thread, setting):
    patch, steps, min_dice = SETTINGS[setting]
    torch.manual_seed(0)
    image, regions = tiny_case()
    net = DiffusionSegUNet(channels=(8, 16, 32), linear_attention_levels=(1, 2), cross_attention_levels=(2,),
                           heads=2, dim_head=8, norm_groups=4, patch_size=patch, encoder_channels=(16, 32, 64),
                           stem_channels=8)
    loss_fn = DiffusionLoss(build_scheduler(1000, "linear_beta", "sample"), LossWeights())
    module, generator = EncodeDenoise(net), torch.Generator().manual_seed(0)
    optimiser = torch.optim.AdamW(net.parameters(), lr=LR)

    # 1. overfit: one case at NOISE_LEVELS fresh t ~ U{0..T-1} and ε per step (a batch of 2 also costs less
    #    than 1: for batch 1 PyTorch runs these small 3D convolutions on its slow native path, not oneDNN)
    images, targets = (v.expand(NOISE_LEVELS, -1, -1, -1, -1) for v in (image, regions))
    losses = []
    for _ in range(steps):
        out = loss_fn(module, images, targets, generator=generator)
        optimiser.zero_grad()
        out.total.backward()
        optimiser.step()
        losses.append(out.parts["loss"])
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.5 * first, f"the loss did not fall: {first:.3f} -> {last:.3f}"

    # 2. DDIM from pure noise, K = 5 steps, N = 2 members, with a fresh scheduler as at inference
    sampler = DDIMSampler(build_scheduler(1000, "linear_beta", "sample"), steps=5, ensemble=2, seed=0)
    sample = sampler.sample(net.eval(), image)
    pred, truth = sample.probs[0] > 0.5, regions[0].bool()
    scores = {name: dice(pred[c], truth[c]) for c, name in enumerate(REGIONS) if truth[c].any()}
    assert set(scores) == set(REGIONS), "the case must have every region"
    assert all(score > min_dice for score in scores.values()), f"Dice {scores}, loss {first:.3f} -> {last:.3f}"
