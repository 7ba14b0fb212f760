"""Whole-volume inference: MONAI sliding windows with Gaussian blending for both models.

A ``Segmenter`` maps a batch of windows to named maps (probabilities, uncertainty, attention);
``infer_volume`` stitches probabilities and uncertainty with MONAI's Gaussian blending, and the attention maps
with :class:`AttentionStitcher` (per-window scales matched on the overlaps, feathered blending, normalised to the
head), because an attention map is defined relative to its window and MONAI's blending turns the differences
between windows into seams. An external mask prior travels as 3 extra input channels so that it is windowed
together with the image.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import threading
import time
from dataclasses import dataclass, field

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor

from medseg_diff.kinds.segmenters import ATTENTION_PREFIX, ENTROPY, PROBS, VARIANCE, Segmenter


@dataclass
class VolumePrediction:
    probs: Tensor  # [3, X, Y, Z] TC, WT, ET probabilities
    entropy: Tensor  # [1, X, Y, Z] predictive entropy (nats, summed over the 3 regions)
    variance: Tensor | None = None  # [1, X, Y, Z] ensemble member variance (diffusion only)
    # name -> [1, X, Y, Z], stitched by AttentionStitcher: 1 = the map's average over the head's voxels
    attention: dict[str, Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    peak_memory_mb: float | None = None  # CUDA: peak allocated; CPU: peak process RSS during inference


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
    """Sliding-window prediction of a whole volume ``image [1, 4, X, Y, Z]`` (already normalised; air is 0).

    Windows are batched ``sw_batch_size`` at a time, under bf16 autocast on CUDA. Probabilities, entropy and
    variance are blended by MONAI with ``mode`` (Gaussian weight, σ = 0.125·roi); the attention maps are
    stitched by :class:`AttentionStitcher` (``mode`` does not apply to them). Returns maps on the input grid.
    """
    device = image.device
    inputs = image if prior is None else torch.cat([image, prior.to(image)], dim=1)
    if segmenter.has_prior_input and prior is None:
        raise ValueError(f"{segmenter.name}: this model needs an external prior (prior_source=external)")
    stitcher = AttentionStitcher(image[0], roi_size)

    def predictor(windows: Tensor, coords: list) -> dict[str, Tensor]:
        """MONAI blends what this returns; the attention maps go to the stitcher with their window's place."""
        maps = segmenter(windows)
        attention = {k[len(ATTENTION_PREFIX):]: v for k, v in maps.items() if k.startswith(ATTENTION_PREFIX)}
        stitcher.add(attention, coords)
        return {k: v for k, v in maps.items() if not k.startswith(ATTENTION_PREFIX)}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    monitor = RssMonitor() if device.type == "cpu" else contextlib.nullcontext()
    start = time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and amp else contextlib.nullcontext()
    with autocast, monitor:
        maps = sliding_window_inference(
            inputs, roi_size=roi_size, sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap, mode=mode,
            with_coord=True,
        )
        attention = stitcher.result()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    maps = {k: v[0].float() for k, v in maps.items()}
    return VolumePrediction(
        probs=maps[PROBS],
        entropy=maps[ENTROPY],
        variance=maps.get(VARIANCE),
        attention=attention,
        seconds=seconds,
        peak_memory_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else monitor.peak_mb,
    )


class AttentionStitcher:
    """Whole-volume attention maps from per-window maps, without window seams.

    **Why per-window maps seam.** Each window's map is relative to that window: the model gives it in "times
    uniform within the window" units (mean 1 over the window's voxels; ``models/attention.py``), from softmaxes over
    the window's own positions (self-attention keys) or the window's own prior tokens (cross-attention). A bright
    structure such as a tumour takes a large share and darkens the rest of its window, so the same voxel gets
    different values in overlapping windows; a tumour cut by a window's edge piles the attention of the queries
    that look for it onto that window's edge tokens. MONAI's Gaussian blending (σ = roi/8, what ``infer_volume``
    uses for the probabilities) hands a voxel from one window to the next within about three voxels in the middle
    of each overlap, which turns every such difference into a line: a grid at the window stride and straight
    cut-offs through the tumour. Here instead:

    1. **per-window scale**: window ``w``'s map ``m_w`` is divided by a gain ``g_w``. The log-gains minimise
       ``sum over overlapping pairs (v, w) of n_vw (log g_v - log g_w - r_vw)^2``, where ``r_vw`` is the median of
       ``log m_v - log m_w`` over the head voxels the two windows share (all shared voxels if none is in the head)
       and ``n_vw`` their number; geometric mean of the gains 1. Overlapping windows then agree in level; windows
       that overlap nothing (``overlap = 0``) keep gain 1.
    2. **feathered blending**: at each voxel, the mean of ``m_w / g_w`` over the windows that contain it, weighted
       by the separable Hann weight ``prod_a sin^2(pi (x_a + 1/2) / roi_a)`` (1 at the window's centre, about 0 at
       its border). A window fades out across the whole overlap instead of stopping at a line, and the voxels
       near a window's border -- the least reliable ones -- count least. The stitched map is continuous.
    3. **units**: divided by its mean over the head (``any input modality != 0`` after preprocessing, where air
       is 0; the whole volume if that is empty): **1 = the average over the head's voxels**, 2 = twice that,
       independent of the window size and of how many windows the volume needed.

    What this cannot remove: the network's own dependence on the window (each window draws its own sampling
    noise, GroupNorm statistics and zero padding are per window), which the probabilities share; it shows as
    smooth differences spread over the overlaps, not as steps.

    Memory: every window's maps are kept until the end (``windows x roi`` float32 values per map). ``add`` takes
    MONAI's window coordinates (``with_coord=True``) on the padded grid MONAI uses when an axis is shorter than
    the roi (zeros, ``(roi - size) // 2`` of them before).
    """

    MAX_RATIO_SAMPLES = 2**15  # voxels per overlap used for the median (evenly strided beyond that)

    def __init__(self, image: Tensor, roi_size: tuple[int, ...]):
        """``image [C, X, Y, Z]`` (modalities first; only "!= 0" is used), ``roi_size`` the windows' size."""
        size = tuple(image.shape[1:])
        self.roi = tuple(int(r) for r in roi_size)
        self.crop = tuple(slice(max(r - s, 0) // 2, max(r - s, 0) // 2 + s) for r, s in zip(self.roi, size))
        self.padded = tuple(max(r, s) for r, s in zip(self.roi, size))
        head = (image[:4] != 0).any(dim=0)
        if not head.any():
            head = torch.ones_like(head)
        self.head = torch.zeros(self.padded, dtype=torch.bool, device=image.device)
        self.head[self.crop] = head
        self.windows: list[tuple[tuple[slice, ...], dict[str, Tensor]]] = []

    def add(self, maps: dict[str, Tensor], coords: list) -> None:
        """``maps``: name -> ``[b, 1, *roi]`` for a batch of windows; ``coords``: MONAI's per-window slices
        ``[batch, channel, *spatial]``."""
        if not maps:
            return
        for b, window in enumerate(coords):
            spatial = tuple(slice(int(s.start), int(s.stop)) for s in window[2:])
            self.windows.append((spatial, {name: m[b, 0].float() for name, m in maps.items()}))

    def result(self) -> dict[str, Tensor]:
        """name -> ``[1, X, Y, Z]`` on the input grid, in units of the head's mean (empty if no window had maps)."""
        if not self.windows:
            return {}
        weight = self.hann(self.roi, self.head.device)
        out = {}
        for name in self.windows[0][1]:
            gains = self.window_gains(name)
            num = torch.zeros(self.padded, device=self.head.device)
            den = torch.zeros(self.padded, device=self.head.device)
            for (spatial, maps), gain in zip(self.windows, gains.tolist()):
                num[spatial] += weight * (maps[name] / gain)
                den[spatial] += weight
            stitched = (num / den)[self.crop]
            mean = stitched[self.head[self.crop]].mean()
            if torch.isfinite(mean) and mean > 0:
                stitched = stitched / mean
            out[name] = stitched[None]
        return out

    def window_gains(self, name: str) -> Tensor:
        """``[n_windows]`` float64 gains ``g_w`` (geometric mean 1) that make overlapping windows agree."""
        n = len(self.windows)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if self._overlap(i, j) is not None]
        if not pairs:
            return torch.ones(n, dtype=torch.float64)
        # one device-to-host copy for all pairs (no per-pair synchronisation on a GPU)
        stats = torch.stack([self._pair_log_ratio(i, j, name) for i, j in pairs]).double().cpu()
        normal = torch.zeros(n, n, dtype=torch.float64)
        rhs = torch.zeros(n, dtype=torch.float64)
        for (i, j), (r, w) in zip(pairs, stats.tolist()):
            normal[i, i] += w
            normal[j, j] += w
            normal[i, j] -= w
            normal[j, i] -= w
            rhs[i] += w * r
            rhs[j] -= w * r
        normal += torch.eye(n, dtype=torch.float64) * 1e-6 * float(normal.diagonal().mean())
        log_gain = torch.linalg.solve(normal, rhs)
        return (log_gain - log_gain.mean()).exp()

    def _overlap(self, i: int, j: int) -> tuple[slice, ...] | None:
        """The padded-grid region that windows ``i`` and ``j`` share, or None."""
        (si, _), (sj, _) = self.windows[i], self.windows[j]
        shared = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(si, sj))
        return None if any(sl.stop <= sl.start for sl in shared) else shared

    def _pair_log_ratio(self, i: int, j: int, name: str) -> Tensor:
        """``[median of log(m_i / m_j), voxel count]`` over the head voxels windows ``i`` and ``j`` share (all shared
        voxels if none is in the head); beyond ``MAX_RATIO_SAMPLES`` voxels, on an evenly strided subgrid."""
        shared = self._overlap(i, j)
        (si, mi), (sj, mj) = self.windows[i], self.windows[j]
        size = [sl.stop - sl.start for sl in shared]
        step = max(1, math.ceil((math.prod(size) / self.MAX_RATIO_SAMPLES) ** (1 / 3)))
        local_i = tuple(slice(sl.start - w.start, sl.stop - w.start, step) for sl, w in zip(shared, si))
        local_j = tuple(slice(sl.start - w.start, sl.stop - w.start, step) for sl, w in zip(shared, sj))
        tiny = torch.finfo(torch.float32).tiny
        ratio = mi[name][local_i].clamp_min(tiny).log() - mj[name][local_j].clamp_min(tiny).log()
        head = self.head[tuple(slice(sl.start, sl.stop, step) for sl in shared)]
        use = head | ~head.any()
        median = torch.where(use, ratio, torch.full_like(ratio, float("nan"))).nanmedian()
        return torch.stack([median, use.sum().to(median.dtype)])

    @staticmethod
    def hann(roi: tuple[int, ...], device: torch.device | None = None) -> Tensor:
        """The separable Hann weight ``[*roi]``: ``prod_a sin^2(pi (x_a + 1/2) / roi_a)``, > 0, max at the centre."""
        axes = [torch.sin(torch.pi * (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n) ** 2 for n in roi]
        weight = axes[0]
        for axis in axes[1:]:
            weight = weight[..., None] * axis
        return weight


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
