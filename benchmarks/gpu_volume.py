"""The GPU benchmark's ``volume``, ``sweep`` and ``extras`` items (``python -m benchmarks.gpu_bench`` runs them).

* ``volume`` -- a whole volume (random normalised input) through ``infer_volume``: the brain box of a real BraTS case
  (140 x 190 x 137: what ``predict`` runs on after its foreground crop) and the uncropped 240 x 240 x 155 grid;
  ``UNetSegmenter`` vs ``DiffusionSegmenter`` (the config's N members x K DDIM steps, attention maps on the last
  step); sliding windows ``Sizes.roi``³, overlap 0.5, ``sw_batch_size`` ``Sizes.sw_batch`` (halved on
  out-of-memory, and reported). Seconds per volume = median of ``volume_repeats`` after 1 warm-up (fewer, noted,
  when the budget runs short); peak memory as ``infer_volume`` reports it. The GPU target: at most 1 s for the brain
  box at K = 10 x N = 4.
* ``sweep`` -- the brain box for each (K, N) of ``Sizes.sweep``: the cost side of the few-step curve (its Dice side
  is ``benchmarks.bench_ablation`` on the phantoms).
* ``extras`` -- diagnostics, each only while the time budget lasts: one denoiser forward (and encode) per window
  batch; the diffusion training step with linear attention at level 1 only; the volume with ``cudnn.benchmark``,
  without attention maps, with ``Sizes.roi_alt``³ windows, with ``channels_last_3d`` weights, with a
  ``torch.compile``-d denoiser forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Iterator

import torch

from benchmarks.gpu_train import Sizes, guarded, measure_train, with_train
from benchmarks.harness import GIB, Budget, Report, Row, build_model, free, is_oom, time_steps, windows
from medseg_diff.config import Config
from medseg_diff.inference.sliding_window import UNetSegmenter, infer_volume

VOLUME_TARGET = "≤ 1 s"


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def diffusion_segmenter(cfg: Config, dev: torch.device, attention: bool = True, channels_last: bool = False,
                        compiled: bool = False):
    task = build_model(cfg)
    net = task.net.to(dev).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    if compiled:
        # compile the denoiser forward only (9 of K steps); encode() and the last step with maps stay eager
        net.forward = torch.compile(net.forward, dynamic=False)
    segmenter = task.segmenter(net, validation=False, seed=cfg.experiment.seed)
    segmenter.attention = attention
    return segmenter


def unet_segmenter(cfg: Config, dev: torch.device):
    return UNetSegmenter(build_model(cfg).net.to(dev).eval(), name="unet")


def measure_volume(segmenter, image: torch.Tensor, dev: torch.device, sizes: Sizes, roi: int, repeats: int,
                   budget: Budget, overlap: float = 0.5) -> tuple[list[float], int, float, object, float]:
    """1 warm-up + ``repeats`` timed volumes; on out-of-memory the window batch is halved and retried.

    Returns ``(seconds per timed run, sw_batch_size used, peak MiB, last prediction, warm-up seconds)``.
    """
    sw = sizes.sw_batch
    while True:
        try:
            pred = infer_volume(segmenter, image, (roi,) * 3, overlap=overlap, sw_batch_size=sw, amp=True)
            break
        except Exception as err:
            if not is_oom(err) or sw == 1:
                raise
            print(f"  out of memory at sw_batch_size {sw}; retrying with {sw // 2}", flush=True)
        sw //= 2
        free(dev)  # after the except block, once the failed attempt's frames (and tensors) are released
    warm = pred.seconds
    # fewer timed runs when a volume is slow and the budget short (noted in the row)
    affordable = int(max(budget.left() - 30, 0) // max(warm, 1e-3))
    runs = max(1, min(repeats, affordable))
    seconds, peak = [], pred.peak_memory_mb or 0.0
    for _ in range(runs):
        pred = infer_volume(segmenter, image, (roi,) * 3, overlap=overlap, sw_batch_size=sw, amp=True)
        seconds.append(pred.seconds)
        peak = max(peak, pred.peak_memory_mb or 0.0)
    return seconds, sw, peak, pred, warm


def volume_row(item: str, name: str, measured: tuple, sizes: Sizes, roi: int, segmenter, target: str = "",
               full: bool = False, extra_note: str = "", repeats: int = 0,
               size: tuple[int, ...] | None = None) -> Row:
    seconds, sw, peak_mb, pred, warm = measured
    size = tuple(size or sizes.volume)
    notes = [f"{windows(size, roi, 0.5)} windows", f"warm-up {warm:.2f} s"]
    sampler = getattr(segmenter, "sampler", None)
    settings = f"{'×'.join(map(str, size))}, roi {roi}³, overlap 0.5, sw_batch_size {sw}"
    if sampler is not None:
        settings += f", N={sampler.ensemble} × K={sampler.steps} DDIM"
        maps = sorted(pred.attention)
        notes.append(f"attention maps computed: {', '.join(maps)}" if maps else "attention maps: not computed")
    if sw != sizes.sw_batch:
        notes.append(f"sw_batch_size {sizes.sw_batch} ran out of memory")
    if len(seconds) < (repeats or sizes.volume_repeats):
        notes.append(f"only {len(seconds)} timed run(s): time budget")
    if not bool(torch.isfinite(pred.probs).all()):
        notes.append("NON-FINITE probabilities")
    if extra_note:
        notes.append(extra_note)
    value = statistics.median(seconds)
    meets = ("yes" if value <= 1.0 else "no") if target and full else ("n/a" if target else "")
    return Row(item, name, value=value, unit="s", peak_gib=peak_mb / 1024, target=target, meets=meets,
               settings=settings, note="; ".join(notes), samples=seconds)


def run_volume(report: Report, dev: torch.device, sizes: Sizes, cfgs: dict[str, Config], full: bool,
               budget: Budget) -> None:
    """Both models on the brain's bounding box of a BraTS volume (what ``predict`` runs on: its eval pipeline
    crops to the foreground first) and on the whole uncropped 240x240x155 grid."""
    g = torch.Generator().manual_seed(0)
    images = {size: torch.randn(1, 4, *size, generator=g).to(dev) for size in (sizes.brain, sizes.volume)}

    def run(name, make, size, target="") -> Row | None:
        def go() -> Row:
            segmenter = make()
            measured = measure_volume(segmenter, images[size], dev, sizes, sizes.roi, sizes.volume_repeats, budget)
            return volume_row("volume", name, measured, sizes, sizes.roi, segmenter, target, full, size=size)

        return guarded(report, "volume", name, dev)(go)

    # the U-Net first: it takes a fraction of a second, so a slow diffusion run cannot cost its row
    for size, where in ((sizes.brain, "brain box"), (sizes.volume, "uncropped")):
        run(f"unet (baseline_unet.yaml), {where}", lambda: unet_segmenter(cfgs["unet"], dev), size)
        run(f"diffusion (diffusion.yaml), {where}", lambda: diffusion_segmenter(cfgs["diffusion"], dev), size,
            target=VOLUME_TARGET if where == "brain box" else "")


def run_sweep(report: Report, dev: torch.device, sizes: Sizes, cfgs: dict[str, Config], budget: Budget) -> None:
    """Whole brain-box volume for each (K steps, N members) of ``sizes.sweep``."""
    image = torch.randn(1, 4, *sizes.brain, generator=torch.Generator().manual_seed(0)).to(dev)
    for k, n in sizes.sweep:
        name = f"sweep: diffusion K={k} × N={n}, brain box"
        if budget.left() < 30:
            report.add(Row("sweep", name, status="skipped", note="time budget"))
            continue
        cfg = dataclasses.replace(cfgs["diffusion"], diffusion=dataclasses.replace(
            cfgs["diffusion"].diffusion, sample_steps=k, ensemble=n))

        def go(cfg=cfg, name=name) -> Row:
            segmenter = diffusion_segmenter(cfg, dev)
            measured = measure_volume(segmenter, image, dev, sizes, sizes.roi, sizes.extra_volume_repeats, budget)
            return volume_row("sweep", name, measured, sizes, sizes.roi, segmenter,
                              repeats=sizes.extra_volume_repeats, size=sizes.brain)

        guarded(report, "sweep", name, dev)(go)


def run_extras(report: Report, dev: torch.device, sizes: Sizes, cfgs: dict[str, Config], full: bool,
               budget: Budget, compile_: bool) -> None:
    """Diagnostics, most useful first, each only while the budget lasts."""
    base = report.find("volume", "diffusion (diffusion.yaml), uncropped")
    # one volume variant costs about (1 warm-up + repeats) base volumes, plus set-up
    per_volume = (base.value * (1 + sizes.extra_volume_repeats) + 10) if base is not None else 60.0
    image = torch.randn(1, 4, *sizes.volume, generator=torch.Generator().manual_seed(0)).to(dev)

    def skipped(name: str, need: float) -> bool:
        if budget.left() >= need:
            return False
        report.add(Row("extra", name, status="skipped", note=f"time budget ({budget.left():.0f} s left)"))
        return True

    def volume_extra(name, make, roi=sizes.roi, ctx=contextlib.nullcontext, need=per_volume, note=""):
        if skipped(name, need):
            return

        def go() -> Row:
            with ctx():
                segmenter = make()
                measured = measure_volume(segmenter, image, dev, sizes, roi, sizes.extra_volume_repeats, budget)
            return volume_row("extra", name, measured, sizes, roi, segmenter, "", full, note,
                              repeats=sizes.extra_volume_repeats)

        guarded(report, "extra", name, dev)(go)

    diffusion = cfgs["diffusion"]
    for count in sorted({1, sizes.sw_batch}):
        name = f"denoiser forward, {count} window(s) × N members"
        if not skipped(name, 30):
            guarded(report, "extra", name, dev)(lambda w=count, nm=name: measure_forward(diffusion, dev, sizes, w, nm))
    name = "train: diffusion, linear attention only at level 1 (no EMA)"
    if not skipped(name, 30):
        cfg = with_train(cfgs["diffusion_no_l0"], ema_decay=0.0)
        guarded(report, "extra", name, dev)(lambda: measure_train(cfg, dev, sizes, name, item="extra"))
    if dev.type == "cuda":
        volume_extra("volume: diffusion, cudnn.benchmark=True", lambda: diffusion_segmenter(diffusion, dev),
                     ctx=lambda: cudnn_benchmark(True), note="autotuning is in the warm-up")
    volume_extra("volume: diffusion, no attention maps", lambda: diffusion_segmenter(diffusion, dev, attention=False))
    volume_extra(f"volume: diffusion, roi {sizes.roi_alt}³", lambda: diffusion_segmenter(diffusion, dev),
                 roi=sizes.roi_alt)
    volume_extra("volume: diffusion, channels_last_3d weights",
                 lambda: diffusion_segmenter(diffusion, dev, channels_last=True))
    if compile_:
        # compilation itself takes minutes on a big 3D graph: ask for generous head-room
        volume_extra("volume: diffusion, torch.compile(net.forward)",
                     lambda: diffusion_segmenter(diffusion, dev, compiled=True), need=per_volume + 150,
                     note="compile time is in the warm-up; encode() and the last step (with maps) run eager")


def measure_forward(cfg: Config, dev: torch.device, sizes: Sizes, count: int, label: str) -> Row:
    """One denoiser forward (no grad, eval, autocast) on ``count`` windows x N members, and the encoder on the
    windows: a volume costs about ceil(n_windows / sw_batch_size) x (encode + K x forward)."""
    net = build_model(cfg).net.to(dev).eval()
    n = cfg.diffusion.ensemble
    image = torch.randn(count, 4, *(sizes.roi,) * 3, device=dev)
    x = torch.randn(count * n, 3, *(sizes.roi,) * 3, device=dev)
    t = torch.full((count * n,), 999, device=dev, dtype=torch.long)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        enc = time_steps(lambda: net.encode(image), dev, 2, 5)
        cond = net.encode(image).repeat(n)
        fwd = time_steps(lambda: net(x, t, cond), dev, 2, 5)
        maps = time_steps(lambda: net.forward_with_attention(x, t, cond), dev, 1, 3)
    return Row("extra", label, value=fwd.median, unit="ms", peak_gib=fwd.peak_bytes / GIB,
               settings=f"roi {sizes.roi}³, {count} window(s) × N={n} = batch {count * n}, no grad",
               note=f"encode({count} window(s)) {enc.median:.1f} ms; forward_with_attention {maps.median:.1f} ms "
                    f"(peak {maps.peak_bytes / GIB:.2f} GiB)",
               samples=fwd.ms, extra={"encode_ms": enc.ms, "forward_with_attention_ms": maps.ms})
