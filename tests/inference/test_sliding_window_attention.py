"""Whole-volume attention maps (``inference.sliding_window.AttentionStitcher``): no seams at the window borders,
units of the head's average, and the probabilities still MONAI's Gaussian blending bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from torch import Tensor

from medseg_diff.diffusion.schedules import build_scheduler
from medseg_diff.diffusion.sampler import DDIMSampler
from medseg_diff.inference.sliding_window import AttentionStitcher, infer_volume
from medseg_diff.kinds.segmenters import ENTROPY, PROBS, VARIANCE, DiffusionSegmenter
from medseg_diff.models import DiffusionSegUNet

ROI, OVERLAP = 32, 0.25  # stride 24, as `make demo` (configs/demo_cpu.yaml)


def window_starts(size: int, roi: int = ROI, overlap: float = OVERLAP) -> list[int]:
    """Where MONAI's windows start along one axis."""
    step = _get_scan_interval((size,), (roi,), 1, (overlap,))[0]
    starts = list(range(0, size - roi + 1, step))
    return sorted(set(starts + [size - roi]))


def seam_spikes(volume: np.ndarray, mask: np.ndarray, roi: int = ROI, overlap: float = OVERLAP) -> tuple[float, float]:
    """How much sharper the map changes across a plane than across the planes around it, as
    ``(max over planes inside window overlaps, max over all other planes)``.

    Per axis, ``p(k)`` = mean ``|m(k+1) - m(k)|`` over the masked voxels of plane ``k``; the spike of plane ``k`` is
    ``p(k)`` over the median of ``p`` at ``k-4..k+4`` without ``k-1..k+1``. A seam -- a step where the blending
    hands over from one window to the next -- is a spike on the planes inside an overlap."""
    zone_max = other_max = 0.0
    for axis in range(3):
        size = volume.shape[axis]
        diff = np.abs(np.diff(volume, axis=axis))
        both = np.take(mask, range(size - 1), axis=axis) & np.take(mask, range(1, size), axis=axis)
        others = tuple(a for a in range(3) if a != axis)
        profile = (diff * both).sum(others) / np.maximum(both.sum(others), 1)
        starts = window_starts(size, roi, overlap)
        zone = np.zeros(size - 1, bool)
        for s0, s1 in zip(starts[:-1], starts[1:]):
            if s1 < s0 + roi:
                zone[s1 - 1 : s0 + roi] = True
        for k in range(4, size - 5):
            around = np.concatenate([profile[k - 4 : k - 1], profile[k + 2 : k + 5]])
            spike = profile[k] / max(float(np.median(around)), 1e-12)
            if zone[k]:
                zone_max = max(zone_max, spike)
            else:
                other_max = max(other_max, spike)
    return zone_max, other_max


def head_volume(shape: tuple[int, int, int], blob_radius: float = 5.0, seed: int = 0) -> Tensor:
    """``[1, 4, *shape]``: smooth random "tissue" in an ellipsoidal head, 0 (air) outside, and one bright blob
    (a "tumour") that some windows contain and others do not."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    centre = torch.tensor(shape, dtype=torch.float32).view(3, 1, 1, 1) / 2
    head = ((grid - centre) / (0.9 * centre)).square().sum(0) < 1
    tissue = torch.nn.functional.avg_pool3d(torch.randn(1, 4, *shape, generator=g), 5, 1, 2)[0] * 3
    image = torch.where(head, tissue, torch.zeros(()))
    blob_at = torch.tensor([0.3, 0.35, 0.5]).view(3, 1, 1, 1) * torch.tensor(shape).view(3, 1, 1, 1)
    blob = (grid - blob_at).square().sum(0).sqrt() < blob_radius
    image[:, blob] = torch.tensor([3.0, 4.0, 2.0, 5.0]).view(4, 1)
    return image[None]


def tiny_segmenter(seed: int = 0) -> DiffusionSegmenter:
    """An untrained diffusion model of the `make demo` shape (patch 2, 3 levels), 1 DDIM step, 1 member."""
    torch.manual_seed(seed)
    net = DiffusionSegUNet(channels=(8, 16, 32), linear_attention_levels=(0, 1), cross_attention_levels=(2,),
                           heads=2, dim_head=8, norm_groups=4, patch_size=2).eval()
    sampler = DDIMSampler(build_scheduler(1000, "linear_beta", "sample"), steps=1, ensemble=1)
    return DiffusionSegmenter(net, sampler)


class FieldSegmenter:
    """Attention maps that are a known smooth field, each window scaled its own way -- divided by the window's mean,
    as the model's maps are -- so that the per-window values of a voxel differ between windows."""

    name, has_prior_input = "field", False

    def __call__(self, windows: Tensor) -> dict[str, Tensor]:
        field = windows[:, 1:2].exp()  # exp of a smooth channel: > 0, 1 in the air
        scaled = field / field.mean(dim=(1, 2, 3, 4), keepdim=True)
        probs = torch.sigmoid(windows[:, :3])
        return {PROBS: probs, ENTROPY: probs.sum(1, keepdim=True), "attention_self": scaled,
                "attention_cross": scaled * (1.0 + windows[:, :1].abs().mean(dim=(1, 2, 3, 4), keepdim=True))}


# -- the probabilities do not change --------------------------------------------------------------------------------
def test_probabilities_entropy_and_variance_are_monai_gaussian_blending_bit_for_bit():
    """The attention maps left MONAI's blending; what MONAI still blends is exactly what it blended before."""
    image, segmenter = head_volume((56, 40, 32)), tiny_segmenter()
    monai = sliding_window_inference(image, (ROI,) * 3, 4, segmenter, overlap=OVERLAP, mode="gaussian")
    pred = infer_volume(segmenter, image, (ROI,) * 3, overlap=OVERLAP, sw_batch_size=4)
    assert torch.equal(pred.probs, monai[PROBS][0])
    assert torch.equal(pred.entropy, monai[ENTROPY][0])
    assert torch.equal(pred.variance, monai[VARIANCE][0])


# -- per-window scale -------------------------------------------------------------------------------------------------
def test_a_field_scaled_differently_in_every_window_is_stitched_back_exactly():
    image = head_volume((80, 56, 32))
    field = image[0, 1].exp()
    head = (image[0] != 0).any(0)
    expected = field / field[head].mean()
    pred = infer_volume(FieldSegmenter(), image, (ROI,) * 3, overlap=OVERLAP, sw_batch_size=4)
    for name in ("self", "cross"):
        got = pred.attention[name][0]
        assert got.shape == field.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert float(got[head].mean()) == pytest.approx(1.0, abs=1e-5)
    # blended as before (MONAI's Gaussian), the same windows are off by their own scales
    monai = sliding_window_inference(image, (ROI,) * 3, 4, FieldSegmenter(), overlap=OVERLAP, mode="gaussian")
    before = monai["attention_cross"][0, 0]
    before = before / before[head].mean()
    assert float(((before - expected).abs() / expected).max()) > 0.1


def test_window_gains_are_the_scales_the_windows_were_given():
    field = torch.rand(1, 1, 40, 40, 40, generator=torch.Generator().manual_seed(0)).add(0.5)
    stitcher = AttentionStitcher(torch.ones(4, 40, 40, 40), (24, 24, 24))
    starts = [(x, y, z) for x in (0, 16) for y in (0, 16) for z in (0, 16)]  # 8 windows covering the volume
    given = torch.linspace(0.5, 2.0, len(starts), dtype=torch.float64)
    for start, gain in zip(starts, given.tolist()):
        spatial = [slice(s, s + 24) for s in start]
        stitcher.add({"self": field[(slice(None), slice(None), *spatial)] * gain},
                     [[slice(0, 1), slice(None), *spatial]])
    torch.testing.assert_close(stitcher.window_gains("self"), given / given.log().mean().exp(), rtol=1e-5, atol=0)
    torch.testing.assert_close(stitcher.result()["self"], field[0] / field.mean(), rtol=1e-4, atol=1e-5)


def test_windows_that_overlap_nothing_keep_their_scale_and_a_small_volume_is_padded_like_monai():
    image = head_volume((64, 32, 20))  # z shorter than the roi: MONAI pads 6 before and 6 after
    pred = infer_volume(FieldSegmenter(), image, (ROI,) * 3, overlap=0.0, sw_batch_size=2)
    head = (image[0] != 0).any(0)
    for name, m in pred.attention.items():
        assert m.shape == (1, 64, 32, 20), name
        assert torch.isfinite(m).all() and (m > 0).all()
        assert float(m[0][head].mean()) == pytest.approx(1.0, abs=1e-5)


def test_hann_weight_is_positive_symmetric_and_peaks_at_the_centre():
    w = AttentionStitcher.hann((8, 6, 5))
    assert w.shape == (8, 6, 5) and (w > 0).all() and float(w.max()) <= 1.0
    torch.testing.assert_close(w, w.flip(0).flip(1).flip(2))
    assert w[0, 0, 0] < 0.05 * w[4, 3, 2]


# -- a real (tiny, untrained) network ---------------------------------------------------------------------------------
def test_diffusion_attention_maps_have_no_seams_at_the_window_borders():
    """An untrained model of the demo's shape over a head 80x56x32 with a bright blob, windows of 32 at stride 24:
    MONAI's Gaussian blending of its per-window maps leaves a step on the planes where one window hands over to the
    next (cross-attention: the blob's mass piles onto a window's edge tokens); the stitched maps change no faster
    on the planes inside the overlaps than the anatomy makes them change elsewhere."""
    image, segmenter = head_volume((80, 56, 32)), tiny_segmenter()
    head = (image[0] != 0).any(0)
    pred = infer_volume(segmenter, image, (ROI,) * 3, overlap=OVERLAP, sw_batch_size=4)
    monai = sliding_window_inference(image, (ROI,) * 3, 4, segmenter, overlap=OVERLAP, mode="gaussian")
    before = seam_spikes(monai["attention_cross"][0, 0].numpy(), head.numpy())
    assert before[0] > 2.5 and before[0] > before[1]  # the old seams, which this measure must see
    for name in ("self", "cross"):
        m = pred.attention[name][0]
        assert torch.isfinite(m).all() and (m >= 0).all(), name
        assert float(m[head].mean()) == pytest.approx(1.0, abs=1e-4), name
        overlaps, elsewhere = seam_spikes(m.numpy(), head.numpy())
        assert overlaps < 2.0 and overlaps <= max(elsewhere, 1.5), (name, overlaps, elsewhere)
    # the bright blob draws attention in the stitched maps as it does in every window
    blob = (image[0, 3] == 5.0)
    assert float(pred.attention["self"][0][blob].mean()) > 1.5
