"""Where a training step's GPU time goes: torch.profiler over a few steps of each model, top kernels by CUDA time.

The step is the one ``benchmarks.gpu_bench`` times and training runs: ``Trainer.train_step`` (``harness.build_trainer``:
loss under bf16 autocast, backward, clip, AdamW with the config's learning rate, LR schedule, EMA where the config
has one), for ``configs/diffusion.yaml`` and ``configs/baseline_unet.yaml`` at a 128³ crop, batch 2, after 3 warm-up
steps. (The profiles in ``results/profile_h200_2026-11-27/`` were taken with an earlier copy of the step: no EMA and
no LR schedule; ``--set train.ema_decay=0`` leaves the EMA out.)

Usage (from the repository root; on the device with the wheels as in GPU.md)::

    python -m benchmarks.gpu_profile_step --out $OUT          # writes profile_<model>.txt
    python -m benchmarks.gpu_profile_step --device cpu --crop 32 --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import CONFIGS, ball_batch, bench_config, build_trainer, pick_device, pin_threads, sync


def profile_step(config: Path, dev: torch.device, crop: int, batch: int, steps: int, sets: list[str]) -> str:
    trainer = build_trainer(bench_config(config, sets), dev)
    image, regions = ball_batch(batch, crop, dev)
    for _ in range(3):
        trainer.train_step(image, regions)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step(image, regions)
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return f"{config.name}: {steps} steps, {kernels / steps:.0f} CUDA kernels per step\n{table}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both models (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default MEDSEG_DIFF_THREADS)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    dev = pick_device(args.device)
    if dev.type == "cpu":
        pin_threads(args.threads)
    for name in ("diffusion", "baseline_unet"):
        text = profile_step(CONFIGS / f"{name}.yaml", dev, args.crop, args.batch, args.steps, args.overrides)
        print(text, flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"profile_{name}.txt").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
