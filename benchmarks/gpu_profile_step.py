"""Where a training step's GPU time goes: torch.profiler over a few steps of each model, top kernels by CUDA time.

The step is the one ``gpu_bench.py`` times (``measure_train``'s body: objective's loss under bf16 autocast, backward,
clip, AdamW), for ``configs/diffusion.yaml`` and ``configs/baseline_unet.yaml`` at a 128³ crop, batch 2.

Usage (device, one call, wheels as in GPU.md)::

    python benchmarks/gpu_profile_step.py --out $OUT          # writes profile_<model>.txt
    python benchmarks/gpu_profile_step.py --device cpu --crop 32 --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_bench import random_batch  # noqa: E402
from medseg_diff.config import load_config  # noqa: E402
from medseg_diff.inference.adapters import build_adapter  # noqa: E402
from medseg_diff.training.objectives import build_objective  # noqa: E402


def profile_step(config: Path, dev: torch.device, crop: int, batch: int, steps: int, sets: list[str]) -> str:
    torch.manual_seed(0)
    task = build_adapter(load_config(config, sets))
    net = task.net.to(dev).train()
    objective = build_objective(task)
    module = objective.train_module().to(dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    image, regions = random_batch(batch, crop, dev)
    generator = torch.Generator(device=dev).manual_seed(0)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = objective.loss(module, image, regions, generator)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return f"{config.name}: {steps} steps, {kernels / steps:.0f} CUDA kernels per step\n{table}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    dev = torch.device(args.device)
    for name in ("diffusion", "baseline_unet"):
        text = profile_step(ROOT / "configs" / f"{name}.yaml", dev, args.crop, args.batch, args.steps, args.overrides)
        print(text, flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"profile_{name}.txt").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
