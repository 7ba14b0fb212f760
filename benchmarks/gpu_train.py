"""The GPU benchmark's sizes and its ``train`` and ``attention`` items (``python -m benchmarks.gpu_bench`` runs them).

* ``train`` -- the trainer's own step, ``Trainer.train_step`` (``harness.build_trainer``: forward and loss under
  bf16 autocast, non-finite check, backward, grad clip, AdamW with the config's learning rate, LR schedule, and the
  EMA update where the config has one), at a ``Sizes.crop``³ crop, batch ``Sizes.batch``, on a fixed random batch.
  Median of ``step_repeats`` timed steps after ``step_warmup`` warm-up steps (CUDA events); peak =
  ``max_memory_allocated`` over the timed steps (weights, gradients, optimiser and EMA state, activations). Variants
  are configs: ``train.ema_decay=0`` for "no EMA", ``train.compile=true`` for the ``torch.compile`` rows.
* ``attention`` -- one attention block, 64 channels, 4 heads x 32, fwd+bwd: ``LinearAttention3d`` vs flash SDPA
  softmax attention (``benchmarks.bench_attention``); out-of-memory is reported, not raised.
"""

from __future__ import annotations

import dataclasses
import statistics
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks import bench_attention
from benchmarks.harness import GIB, Budget, Report, Row, ball_batch, build_trainer, free, is_oom, time_steps
from medseg_diff.config import Config

#: the GPU targets (issue 7): a training step at 128³, batch 2, bf16 -- the diffusion model at most 2x the U-Net's
#: time with a peak of at most 8 GiB; the linear attention block at 64³ tokens at most 5 ms and 1.1 GiB
TRAIN_TARGET = "≤ 2× U-Net step, peak ≤ 8 GiB"
ATTENTION_TARGET = "≤ 5 ms, ≤ 1.1 GiB"


@dataclass
class Sizes:
    crop: int = 128
    batch: int = 2
    attention_sides: tuple[int, ...] = (32, 48, 64)
    volume: tuple[int, int, int] = (240, 240, 155)
    brain: tuple[int, int, int] = (140, 190, 137)  # the largest brain box of the real BraTS cases (bench_cost)
    sweep: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (4, 1), (10, 1), (1, 4), (2, 4), (4, 4), (10, 4))
    roi: int = 128
    roi_alt: int = 96
    sw_batch: int = 4
    step_warmup: int = 3
    step_repeats: int = 10
    attention_repeats: int = 7
    volume_repeats: int = 3
    extra_volume_repeats: int = 2  # extras: median of 2 after 1 warm-up, to fit more of them in the budget


# smoke sizes: exercise every code path in well under 2 min on 2 CPU cores (fewer repeats than the GPU run)
TINY = Sizes(crop=32, attention_sides=(16,), volume=(64, 64, 48), brain=(48, 56, 40), roi=32, roi_alt=32, sw_batch=4,
             sweep=((1, 1), (2, 4)),
             step_warmup=1, step_repeats=2, attention_repeats=2, volume_repeats=1, extra_volume_repeats=1)


def with_train(cfg: Config, **changes) -> Config:
    """``cfg`` with ``train.<key>`` changed (e.g. ``ema_decay=0.0``, ``compile=True``)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def guarded(report: Report, item: str, name: str, dev: torch.device, **row_kw) -> Callable:
    """``guarded(...)(fn)`` runs ``fn() -> Row``: an error or out-of-memory becomes a row and the run goes on."""

    def run(fn: Callable[[], Row | None]) -> Row | None:
        try:
            row = fn()
        except Exception as err:  # one failing measurement must not lose the others
            oom = is_oom(err)
            if not oom:
                traceback.print_exc()
            msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            row = Row(item, name, status="out of memory" if oom else "error",
                      note=("" if oom else f"{type(err).__name__}: ") + msg, **row_kw)
        finally:
            free(dev)
        return report.add(row) if row is not None else None

    return run


# --- train ----------------------------------------------------------------------------------------------------


def measure_train(cfg: Config, dev: torch.device, sizes: Sizes, label: str, item: str = "train") -> Row:
    """``Trainer.train_step`` on one fixed random batch: median time and peak memory."""
    trainer = build_trainer(cfg, dev)
    image, regions = ball_batch(sizes.batch, sizes.crop, dev)
    timing = time_steps(lambda: trainer.train_step(image, regions), dev, sizes.step_warmup, sizes.step_repeats)
    params = sum(p.numel() for p in trainer.net.parameters())
    notes = [f"wall {statistics.median(timing.wall_ms):.1f} ms",
             f"first warm-up step {timing.warmup_ms[0]:.0f} ms" if timing.warmup_ms else "",
             "with EMA update" if trainer.ema is not None else "",
             "torch.compile (compilation in the warm-up)" if cfg.train.compile else ""]
    return Row(item, label, value=timing.median, unit="ms", peak_gib=timing.peak_bytes / GIB,
               settings=f"{sizes.crop}³ crop, batch {sizes.batch}, {params / 1e6:.1f} M params",
               note="; ".join(n for n in notes if n), samples=timing.ms,
               extra={"params": params, "wall_ms": timing.wall_ms, "warmup_ms": timing.warmup_ms})


def run_train(report: Report, dev: torch.device, sizes: Sizes, cfgs: dict[str, Config], full: bool,
              compile_: bool = False) -> None:
    unet, diffusion = cfgs["unet"], cfgs["diffusion"]
    runs = [("unet (baseline_unet.yaml)", unet),
            ("diffusion (diffusion.yaml), trainer step incl. EMA", diffusion),
            ("diffusion (diffusion.yaml), no EMA", with_train(diffusion, ema_decay=0.0)),
            ("MONAI UNet 12.9M (channels 32-320, 2 residual units)", cfgs["unet12m9"]),
            ("diffusion full resolution (ablations/full_resolution.yaml), incl. EMA", cfgs["full_resolution"])]
    if dev.type == "cuda" or compile_:
        runs += [("unet (baseline_unet.yaml), torch.compile", with_train(unet, compile=True)),
                 ("diffusion (diffusion.yaml), torch.compile, incl. EMA", with_train(diffusion, compile=True))]
    for name, cfg in runs:
        guarded(report, "train", name, dev)(lambda n=name, c=cfg: measure_train(c, dev, sizes, n))
    pairs = [("unet (baseline_unet.yaml)", "diffusion (diffusion.yaml), trainer step incl. EMA"),
             ("unet (baseline_unet.yaml)", "diffusion (diffusion.yaml), no EMA"),
             ("unet (baseline_unet.yaml), torch.compile", "diffusion (diffusion.yaml), torch.compile, incl. EMA")]
    for unet_label, label in pairs:
        u, d = report.find("train", unet_label), report.find("train", label)
        if u is None or d is None:
            continue
        ratio = d.value / u.value
        ok = ratio <= 2.0 and d.peak_gib <= 8.0
        report.add(Row("train", f"ratio {label.split(', ', 1)[1]} / {unet_label.split(' ', 1)[0]}"
                       + (" (both compiled)" if "compile" in unet_label else ""), value=ratio, unit="x",
                       peak_gib=d.peak_gib, target=TRAIN_TARGET, meets=("yes" if ok else "no") if full else "n/a",
                       settings=d.settings, note=f"{d.value:.1f} ms vs {u.value:.1f} ms"))


# --- attention ------------------------------------------------------------------------------------------------


def run_attention(report: Report, dev: torch.device, sizes: Sizes, full: bool, budget: Budget) -> None:
    amp = torch.bfloat16 if dev.type == "cuda" else None
    for side in sizes.attention_sides:
        for kind in ("linear", "sdpa"):
            name = f"{kind} {side}³ = {side**3:,} tokens"
            if budget.left() < 20:
                report.add(Row("attention", name, status="skipped", note="time budget"))
                continue

            def measure(kind=kind, side=side, name=name) -> Row:
                if dev.type == "cuda":
                    r = bench_attention.measure_cuda(kind, side, sizes.attention_repeats, amp)
                else:
                    r = bench_attention.measure(kind, side, "cpu", None, sizes.attention_repeats)
                if r.ms is None:
                    return Row("attention", name, status="out of memory", note=r.note)
                row = Row("attention", name, value=r.ms, unit="ms", peak_gib=r.peak_bytes / GIB,
                          settings="64 ch, 4 heads × 32, batch 1, fwd+bwd",
                          note=f"largest tensor {r.largest_bytes / 2**20:.0f} MiB; peak beyond inputs and weights"
                          + ("" if dev.type == "cuda" else "; CPU: RSS growth in-process, indicative only"))
                if kind == "linear" and side == 64:
                    row.target = ATTENTION_TARGET
                    row.meets = ("yes" if r.ms <= 5.0 and r.peak_bytes <= 1.1 * GIB else "no") if full else "n/a"
                if kind == "sdpa":
                    row.note += "; flash SDPA (default backend)"
                return row

            guarded(report, "attention", name, dev)(measure)
