"""The GPU targets in one run: training step, linear attention, whole-volume inference (bf16 autocast on CUDA, fp32
on the CPU).

The GPU targets (issue 7): one training step at a 128³ crop, batch 2, of ``configs/diffusion.yaml`` at most 2x the
time of ``configs/baseline_unet.yaml``'s with a peak of at most 8 GiB; one linear attention block at 64³ tokens at most
5 ms and 1.1 GiB; a whole BraTS volume (the brain box) at K = 10 x N = 4 in at most 1 s. Items (``--items``):

1. ``train``     -- the trainer's own step (``Trainer.train_step``, ``benchmarks.gpu_train``): diffusion vs the
   U-Net, with and without EMA; MONAI ``UNet`` at 12.9 M parameters (channels 32-320, 2 residual units); the
   full-resolution ablation (``configs/ablations/full_resolution.yaml``); on CUDA (or with ``--compile``) both
   models with ``train.compile: true``. Median of 10 timed steps after 3 warm-up steps.
2. ``attention`` -- one attention block, 64 channels, 4 heads x 32, fwd+bwd at 32³ / 48³ / 64³ tokens:
   ``LinearAttention3d`` vs flash SDPA (``benchmarks.bench_attention``), median of 7 after 1 warm-up.
3. ``volume``    -- ``infer_volume`` on the brain box (140 x 190 x 137) and the uncropped 240 x 240 x 155 grid, the
   U-Net vs the diffusion model; ``sweep``: the brain box for K x N in ``Sizes.sweep`` (``benchmarks.gpu_volume``).
4. ``extras``    -- diagnostics, each only while the time budget (``--budget-s``) lasts (``benchmarks.gpu_volume``).

Every measurement is its own try/except: one failing (error or out of memory) leaves the others' results.
With ``--out DIR`` the results are rewritten to ``DIR/results.json`` and ``DIR/results.md`` after each one.

Usage (from the repository root)::

    python -m benchmarks.gpu_bench --device cuda --out OUT       # the GPU run (see benchmarks/GPU.md)
    python -m benchmarks.gpu_bench --device cpu --tiny --out /tmp/gpu_bench_smoke   # CPU smoke run, < 2 min
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from benchmarks.gpu_train import TINY, Sizes, run_attention, run_train
from benchmarks.gpu_volume import run_extras, run_sweep, run_volume
from benchmarks.harness import (
    DIFFUSION_CONFIG, FULL_RES_CONFIG, UNET_CONFIG, Budget, Report, bench_config, environment, pick_device, pin_threads,
)

ITEMS = ("train", "attention", "volume", "sweep", "extras")
UNET_12M9 = ["model.unet.channels=[32,64,128,256,320]", "model.unet.strides=[2,2,2,2]", "model.unet.num_res_units=2"]
# --tiny: shrink the networks and the sampler so that the whole run takes seconds on 2 CPU cores
TINY_SET = [
    "model.denoiser.channels=[4,8,16]", "model.denoiser.heads=1", "model.denoiser.dim_head=8",
    "model.unet.channels=[4,8,16,32,64]", "diffusion.sample_steps=2", "diffusion.ensemble=2",
]  # fmt: skip
TINY_12M9 = ["model.unet.channels=[4,8,16,32,40]"]
TINY_FULL_RES = ["model.denoiser.channels=[4,8,16,32]"]


def header(m: dict) -> list[str]:
    return [
        f"# medseg-diff GPU benchmark ({m['device']})",
        "",
        f"- device: **{m['device']}**; torch {m['torch']} (CUDA {m['cuda']}, cuDNN {m['cudnn']}); "
        f"MONAI {m['monai']}; Python {m['python']}",
        f"- precision: {m['precision']}; commit {m['commit']}; started {m['started']}; "
        f"{'tiny sizes (smoke run)' if m['tiny'] else 'full sizes'}",
        f"- peak memory: {m['peak_kind']}",
        "",
    ]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke sizes: 32³ crops, 16³ attention, a 64×64×48 volume, shrunk networks")
    p.add_argument("--out", type=Path, default=None, help="write results.json and results.md here (incrementally)")
    p.add_argument("--items", nargs="+", default=list(ITEMS), choices=ITEMS)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget; optional measurements are skipped when it runs short")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the torch.compile rows (default: on CUDA only; inductor takes minutes on 2 CPU cores)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every config, e.g. --set infer.sw_batch_size=2")
    p.add_argument("--sw-batch", type=int, default=None, help="sliding-window batch (default: infer.sw_batch_size)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default MEDSEG_DIFF_THREADS; --tiny: 1, as OpenMP threads competing "
                        "with other processes for 2 cores slow 3D convolutions down tenfold)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    dev = pick_device(args.device)
    if dev.type == "cpu":
        pin_threads(args.threads, default=1 if args.tiny else None)
    sizes = dataclasses.replace(TINY if args.tiny else Sizes())
    full = dev.type == "cuda" and not args.tiny  # targets are judged only on full-size GPU runs
    budget = Budget(args.budget_s)
    meta = environment(dev) | {
        "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "peak_kind": "torch.cuda.max_memory_allocated (reset before the timed part)" if dev.type == "cuda"
        else "peak process RSS (CPU; indicative only)",
        "tiny": args.tiny}
    report = Report(args.out, meta, header)
    print(f"device {meta['device']}; torch {torch.__version__}; {meta['precision']}", flush=True)

    base = (TINY_SET if args.tiny else []) + args.overrides
    cfgs = {
        "diffusion": bench_config(DIFFUSION_CONFIG, base),
        "diffusion_no_l0": bench_config(DIFFUSION_CONFIG, base + ["model.denoiser.linear_attention_levels=[1]"]),
        "full_resolution": bench_config(FULL_RES_CONFIG, base + (TINY_FULL_RES if args.tiny else [])),
        "unet": bench_config(UNET_CONFIG, base),
        "unet12m9": bench_config(UNET_CONFIG, base + (TINY_12M9 if args.tiny else UNET_12M9)),
    }
    sizes.sw_batch = args.sw_batch or cfgs["diffusion"].infer.sw_batch_size
    meta["configs"] = {k: {"model": dataclasses.asdict(c.model), "diffusion": dataclasses.asdict(c.diffusion),
                           "train": dataclasses.asdict(c.train)} for k, c in cfgs.items()}

    compile_ = args.compile if args.compile is not None else dev.type == "cuda"
    if "train" in args.items:
        run_train(report, dev, sizes, cfgs, full, compile_)
    if "attention" in args.items:
        run_attention(report, dev, sizes, full, budget)
    if "volume" in args.items:
        run_volume(report, dev, sizes, cfgs, full, budget)
    if "sweep" in args.items:
        run_sweep(report, dev, sizes, cfgs, budget)
    if "extras" in args.items:
        run_extras(report, dev, sizes, cfgs, full, budget, compile_)

    meta["seconds"] = round(budget.seconds - budget.left(), 1)
    report.save()
    print("\n" + report.markdown(), flush=True)
    return 1 if any(r.status == "error" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
