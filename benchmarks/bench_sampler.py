"""DDIM ensemble sampler on the CPU: cost of K steps x N members, what caching the encoder saves, whole volumes.

The model is the ``configs/demo_cpu.yaml`` denoiser (``load_config`` + ``kinds.build_kind``), randomly initialised
with a fixed seed: speed does not depend on the weights. Three markdown tables:

(a) ``DDIMSampler.sample`` wall time for K in ``--steps`` and N in ``--members`` on ``--batch`` windows of
    ``--window``³ voxels (median of ``--repeats`` runs after one warm-up), with attention maps on the last step
    as in inference, and the time per denoised member-step (wall / (K·N·B));
(b) encoder caching at K = 10, N = 4: ``sample()`` as implemented (encoder once per call, the N members as one
    batch) vs. a re-implementation of the same loop, written here and not in the package, that re-runs
    ``model.encode`` at every step (members batched), and one that also runs every member separately, i.e.
    K·N encoder passes; the last column checks that all three give the same probabilities;
(c) one whole-volume prediction (``inference.sliding_window.infer_volume``, the config's windows, overlap, batch and
    Gaussian blending) of a synthetic 3 mm phantom, normalised channel-wise, diffusion (K = 10, N = 4) vs the
    plain U-Net of the same config.

Usage (from the repository root; about 3 minutes on 2 idle CPU cores)::

    .venv/bin/python -m benchmarks.bench_sampler
    .venv/bin/python -m benchmarks.bench_sampler --steps 1 2 5 10 --members 1 2 4 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from einops import rearrange
from monai.transforms import NormalizeIntensity

from benchmarks.harness import DEMO_CONFIG, ROOT, bench_config, build_model, median_seconds, pin_threads, windows
from medseg_diff.data.conventions import BRATS2021, MODALITIES
from medseg_diff.data.synth import case_files, synthesize
from medseg_diff.diffusion.sampler import DDIMSampler, summarise_members
from medseg_diff.diffusion.schedules import build_scheduler, scheduler_input, x0_from_output
from medseg_diff.inference.sliding_window import DiffusionSegmenter, UNetSegmenter, infer_volume
from medseg_diff.models import count_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEMO_CONFIG)
    p.add_argument("--window", type=int, default=32, help="window side in voxels (default 32)")
    p.add_argument("--batch", type=int, default=1, help="windows per sample() call (default 1)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10], help="K values (default 1 2 5 10)")
    p.add_argument("--members", type=int, nargs="+", default=[1, 2, 4], help="N values (default 1 2 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell, median reported (default 3)")
    p.add_argument("--spacing", type=float, default=3.0, help="phantom spacing in mm for (c) (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default MEDSEG_DIFF_THREADS, else torch's choice)")
    p.add_argument("--skip", choices=["a", "b", "c"], nargs="*", default=[], help="tables to leave out")
    return p.parse_args(argv)


def make_sampler(cfg, steps: int, members: int) -> DDIMSampler:
    d = cfg.diffusion
    return DDIMSampler(build_scheduler(d.timesteps, d.schedule, d.prediction), steps=steps, ensemble=members,
                       step_uncertainty_weighting=d.step_uncertainty_weighting, seed=0)


# -- (a) K x N -----------------------------------------------------------------------------------------------------
def table_steps_members(cfg, net, args) -> list[str]:
    image = torch.randn(args.batch, 4, *(args.window,) * 3, generator=torch.Generator().manual_seed(0))
    rows = ["| K | N | sample() s | ms per member-step |", "|---:|---:|---:|---:|"]
    for k in args.steps:
        for n in args.members:
            sampler = make_sampler(cfg, k, n)
            with torch.no_grad():
                seconds = median_seconds(lambda: sampler.sample(net, image), args.repeats)
            rows.append(f"| {k} | {n} | {seconds:.3f} | {1e3 * seconds / (k * n * args.batch):.1f} |")
            print(f"  (a) K={k} N={n}: {seconds:.3f} s", file=sys.stderr, flush=True)
    return rows


# -- (b) encoder caching -------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_reencoding(sampler: DDIMSampler, net, image: torch.Tensor, per_member: bool) -> torch.Tensor:
    """The same DDIM loop as ``DDIMSampler.sample`` (same noise, same steps, attention maps on the last step) but
    without the cached conditioning: ``net.encode`` at every step, and with ``per_member`` every member alone."""
    b, n = image.shape[0], sampler.ensemble
    generator = torch.Generator(device=image.device).manual_seed(sampler.seed)
    x = torch.randn((b * n, 3, *image.shape[2:]), generator=generator, device=image.device)
    groups = [[j] for j in range(b * n)] if per_member else [list(range(b * n))]
    sampler.scheduler.set_timesteps(sampler.steps, device=image.device)  # as DDIMSampler.sample does
    timesteps = sampler.scheduler.timesteps
    member_probs = torch.empty_like(x)
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        for rows in groups:
            cond = net.encode(image[[r // n for r in rows]])  # every step, every member (row r: window r // n)
            x_g, t_g = x[rows], t.expand(len(rows))
            output = (net.forward_with_attention(x_g, t_g, cond).pred if last else net(x_g, t_g, cond)).float()
            member_probs[rows] = (x0_from_output(sampler.scheduler, output, x_g, t_g) + 1.0) / 2.0
            x[rows], _ = sampler.scheduler.step(scheduler_input(sampler.scheduler, output), int(t), x_g)
    probs, _, _ = summarise_members(rearrange(member_probs, "(b n) c ... -> b n c ...", n=n))
    return probs


def table_encoder_cache(cfg, net, args, steps: int = 10, members: int = 4) -> list[str]:
    image = torch.randn(args.batch, 4, *(args.window,) * 3, generator=torch.Generator().manual_seed(0))
    sampler = make_sampler(cfg, steps, members)
    with torch.no_grad():
        reference = sampler.sample(net, image).probs
    variants = {
        f"sample() as implemented: 1 encoder pass, {members} members batched": lambda: sampler.sample(net, image),
        f"re-encode every step, members batched ({steps} encoder passes)":
            lambda: sample_reencoding(sampler, net, image, per_member=False),
        f"re-encode every step and member, members one by one ({steps * members} encoder passes)":
            lambda: sample_reencoding(sampler, net, image, per_member=True),
    }
    rows = [f"| variant (K = {steps}, N = {members}, {args.batch} window of {args.window}³) | s | × implemented "
            "| max abs Δprobs |", "|---|---:|---:|---:|"]
    base = None
    for name, fn in variants.items():
        seconds = median_seconds(fn, args.repeats)
        with torch.no_grad():
            out = fn()
        probs = out.probs if hasattr(out, "probs") else out
        base = base or seconds
        delta = (probs - reference).abs().max().item()
        rows.append(f"| {name} | {seconds:.3f} | {seconds / base:.2f} | {delta:.1e} |")
        print(f"  (b) {name}: {seconds:.3f} s", file=sys.stderr, flush=True)
    return rows


# -- (c) whole volume ----------------------------------------------------------------------------------------------
def phantom(spacing: float) -> torch.Tensor:
    """One synthetic phantom at ``spacing`` mm, ``[1, 4, X, Y, Z]`` normalised channel-wise over the head."""
    with tempfile.TemporaryDirectory() as tmp:
        case = synthesize(Path(tmp), cases=1, spacing=spacing, seed=0)[0]
        files = case_files(case, BRATS2021)
        arrays = [np.asarray(nib.load(str(files[m])).dataobj, dtype=np.float32) for m in MODALITIES]
    image = NormalizeIntensity(nonzero=True, channel_wise=True)(torch.from_numpy(np.stack(arrays)))
    return torch.as_tensor(image)[None].float()


def table_volume(cfg, diffusion_task, args, steps: int = 10, members: int = 4) -> list[str]:
    image = phantom(args.spacing)
    unet_cfg = bench_config(args.config, ["model.kind=unet"])
    unet = build_model(unet_cfg).net.eval()
    roi = tuple(cfg.infer.roi_size or cfg.data.roi_size)
    segmenters = {
        f"diffusion (K = {steps}, N = {members})":
            DiffusionSegmenter(diffusion_task.net, make_sampler(cfg, steps, members), name="diffusion"),
        "U-Net": UNetSegmenter(unet, name="unet"),
    }
    size = "×".join(map(str, image.shape[2:]))
    count = windows(image.shape[2:], roi, cfg.infer.overlap)
    rows = [f"| model ({size} voxels at {args.spacing:g} mm, {count} windows of {roi[0]}³, overlap "
            f"{cfg.infer.overlap}, sw_batch {cfg.infer.sw_batch_size}) | parameters | s | peak RSS MB |",
            "|---|---:|---:|---:|"]
    for name, segmenter in segmenters.items():
        pred = infer_volume(segmenter, image, roi_size=roi, overlap=cfg.infer.overlap,
                            sw_batch_size=cfg.infer.sw_batch_size, mode=cfg.infer.mode)
        assert pred.probs.shape[1:] == image.shape[2:]
        rows.append(f"| {name} | {count_parameters(segmenter.net):,} | {pred.seconds:.2f} | "
                    f"{pred.peak_memory_mb:.0f} |")
        print(f"  (c) {name}: {pred.seconds:.2f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pin_threads(args.threads)
    cfg = bench_config(args.config)
    task = build_model(cfg)
    net = task.net.eval()
    print(f"# DDIM sampler on the CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__})\n")
    print(f"Denoiser of `{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}`: "
          f"channels {cfg.model.denoiser.channels}, {count_parameters(net):,} parameters, random weights; "
          f"median of {args.repeats} runs after a warm-up.\n")
    start = time.perf_counter()
    if "a" not in args.skip:
        print(f"## (a) sample() wall time, {args.batch} window of {args.window}³\n")
        print("\n".join(table_steps_members(cfg, net, args)) + "\n")
    if "b" not in args.skip:
        print("## (b) what caching the encoder saves\n")
        print("\n".join(table_encoder_cache(cfg, net, args)) + "\n")
    if "c" not in args.skip:
        print("## (c) one whole-volume sliding-window prediction\n")
        print("\n".join(table_volume(cfg, task, args)) + "\n")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
