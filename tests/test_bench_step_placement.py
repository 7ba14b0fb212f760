"""benchmarks/bench_step_placement.py: its explicit-timestep DDIM step is MONAI's (the product's trailing K = 2 and
K = 4 reproduced to the bit, with η = 1 noise drawn alike), and a placement it is given is the one it samples at."""

from __future__ import annotations

import pytest
import torch

from medseg_diff.diffusion.sampler import DDIMSampler
from medseg_diff.diffusion.schedules import build_scheduler
from medseg_diff.models import DiffusionSegUNet


def _net() -> DiffusionSegUNet:
    torch.manual_seed(0)
    net = DiffusionSegUNet(channels=(8, 16), linear_attention_levels=(0,), cross_attention_levels=(1,), heads=2,
                           dim_head=8, norm_groups=4, patch_size=2, stem_channels=8)
    return net.eval()


@pytest.mark.parametrize("steps", [2, 4])
def test_explicit_steps_reproduce_the_product_sampler(steps):
    from benchmarks.bench_step_placement import ExplicitSteps

    net, image = _net(), torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    product = build_scheduler(1000, x_skip=True)
    product.set_timesteps(steps)
    placement = [int(t) for t in product.timesteps]
    a = DDIMSampler(build_scheduler(1000, x_skip=True), steps=steps, ensemble=3, eta=1.0, seed=5)
    b = DDIMSampler(ExplicitSteps(build_scheduler(1000, x_skip=True), placement), steps=steps, ensemble=3, eta=1.0,
                    seed=5)
    out_a, out_b = a.sample(net, image, keep_members=True), b.sample(net, image, keep_members=True)
    assert torch.equal(out_a.members, out_b.members)
    assert float(out_a.variance.max()) > 0  # η = 1: the members do differ, so the noise draws were compared too


def test_a_placement_is_sampled_where_it_says_and_bad_ones_are_refused():
    from benchmarks.bench_step_placement import ExplicitSteps

    scheduler = ExplicitSteps(build_scheduler(1000, x_skip=True), [999, 199])
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [999, 199]
    seen = []
    step = scheduler.step
    scheduler.step = lambda out, t, x, **kw: (seen.append(int(t)), step(out, t, x, **kw))[1]
    DDIMSampler(scheduler, steps=2, ensemble=2, eta=1.0).sample(_net(), torch.randn(1, 4, 16, 16, 16))
    assert seen == [999, 199]
    for bad in ([199, 999], [1000, 10], [999, 999]):
        with pytest.raises(ValueError, match="timesteps must decrease"):
            ExplicitSteps(build_scheduler(1000, x_skip=True), bad)
