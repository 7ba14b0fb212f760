"""Whole-volume inference: MONAI sliding windows with Gaussian blending for both models.

A ``Segmenter`` maps a batch of windows to named maps (probabilities, uncertainty, attention);
``infer_volume`` stitches every map the same way. An external mask prior travels as 3 extra input
channels so that it is windowed together with the image.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from medseg_diff.diffusion.sampler import DDIMSampler, binary_entropy

PROBS, ENTROPY, VARIANCE = "probs", "entropy", "variance"
ATTENTION_PREFIX = "attention_"


@dataclass
class VolumePrediction:
    probs: Tensor  # [3, X, Y, Z] TC, WT, ET probabilities
    entropy: Tensor  # [1, X, Y, Z] predictive entropy (nats, summed over the 3 regions)
    variance: Tensor | None = None  # [1, X, Y, Z] ensemble member variance (diffusion only)
    attention: dict[str, Tensor] = field(default_factory=dict)  # name -> [1, X, Y, Z], times-uniform units
    seconds: float = 0.0
    peak_memory_mb: float | None = None  # CUDA: peak allocated; CPU: peak process RSS during inference


class Segmenter(Protocol):
    """``windows [b, 4 (+3 prior), x, y, z] -> {"probs": [b,3,...], "entropy": [b,1,...], ...}``."""

    name: str
    has_prior_input: bool

    def __call__(self, windows: Tensor) -> dict[str, Tensor]: ...


class UNetSegmenter:
    """The baseline: sigmoid of the U-Net's logits; uncertainty is the entropy of those probabilities."""

    has_prior_input = False

    def __init__(self, net: nn.Module, name: str = "unet"):
        self.net, self.name = net, name

    @torch.no_grad()
    def __call__(self, windows: Tensor) -> dict[str, Tensor]:
        probs = torch.sigmoid(self.net(windows).float())
        return {PROBS: probs, ENTROPY: binary_entropy(probs).sum(dim=1, keepdim=True)}


class DiffusionSegmenter:
    """DDIM ensemble per window; the encoder runs once per window (inside the sampler).

    Attention maps: the aggregates ``self`` (linear self-attention, mean over levels) and ``cross``
    (mask-prior cross-attention); ``attention_levels=True`` also keeps the per-level maps (``self_l1``, ...).
    """

    def __init__(self, net: nn.Module, sampler: DDIMSampler, name: str = "diffusion", external_prior: bool = False,
                 attention: bool = True, attention_levels: bool = False):
        self.net, self.sampler, self.name = net, sampler, name
        self.has_prior_input = external_prior
        self.attention = attention
        self.attention_levels = attention_levels

    @torch.no_grad()
    def __call__(self, windows: Tensor) -> dict[str, Tensor]:
        image, prior = (windows[:, :4], windows[:, 4:7]) if self.has_prior_input else (windows, None)
        out = self.sampler.sample(self.net, image, external_prior=prior, attention=self.attention)
        maps = {PROBS: out.probs, ENTROPY: out.entropy, VARIANCE: out.variance}
        maps.update({ATTENTION_PREFIX + k: v for k, v in out.attention.items()
                     if self.attention_levels or "_l" not in k})
        return maps


def infer_volume(
    segmenter: Segmenter,
    image: Tensor,
    roi_size: tuple[int, int, int],
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    prior: Tensor | None = None,
    amp: bool = True,
) -> VolumePrediction:
    """Sliding-window prediction of a whole volume ``image [1, 4, X, Y, Z]`` (already normalised).

    Windows are batched ``sw_batch_size`` at a time, blended with a Gaussian weight (σ = 0.125·roi),
    under bf16 autocast on CUDA. Returns maps on the input grid.
    """
    device = image.device
    inputs = image if prior is None else torch.cat([image, prior.to(image)], dim=1)
    if segmenter.has_prior_input and prior is None:
        raise ValueError(f"{segmenter.name}: this model needs an external prior (prior_source=external)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    monitor = RssMonitor() if device.type == "cpu" else contextlib.nullcontext()
    start = time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and amp else contextlib.nullcontext()
    with autocast, monitor:
        maps = sliding_window_inference(
            inputs, roi_size=roi_size, sw_batch_size=sw_batch_size, predictor=segmenter, overlap=overlap, mode=mode,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    maps = {k: v[0].float() for k, v in maps.items()}
    return VolumePrediction(
        probs=maps[PROBS],
        entropy=maps[ENTROPY],
        variance=maps.get(VARIANCE),
        attention={k[len(ATTENTION_PREFIX):]: v for k, v in maps.items() if k.startswith(ATTENTION_PREFIX)},
        seconds=seconds,
        peak_memory_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else monitor.peak_mb,
    )


class RssMonitor:
    """Peak resident memory of this process while the block runs (CPU inference), sampled every 5 ms from
    /proc/self/statm; where that file does not exist, the process's lifetime peak (``ru_maxrss``)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb = interval, float("nan")
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self) -> "RssMonitor":
        self.peak_mb = self.rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())
