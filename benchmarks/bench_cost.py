"""Diffusion model vs U-Net cost on the CPU: FLOPs, bytes saved for backward, wall time, sliding windows.

Both models are built from the training configs (``--diffusion-config``, ``--unet-config``) with
``harness.bench_config`` + ``harness.build_trainer``, the same ``--set`` overrides applied to both, randomly
initialised with a fixed seed (cost does not depend on the weights). ``DEFAULT_OVERRIDES`` (64³ crops, native grid of the
phantom, no caching, no tracking) always come first; ``--set`` items follow and win; ``--steps`` / ``--ensemble``
become ``diffusion.sample_steps`` / ``diffusion.ensemble``. Measured with ``--threads`` torch threads (default
``MEDSEG_DIFF_THREADS``, else 2):

1. one training step of the package's ``Trainer`` (``harness.build_trainer``): a batch of
   ``data.batch_size × data.samples_per_volume`` random crops of ``data.roi_size`` (normal image, nested blob
   regions, seeded; ``harness.blob_batch``); the trainer's objective, ``objective.loss(trainer.module, ...)`` in train
   mode, then ``backward()``:
   - FLOPs of forward + loss + backward with ``torch.utils.flop_counter.FlopCounterMode``. It counts matrix
     products, convolutions and attention kernels only, not elementwise ops (norms, activations, adds);
   - bytes saved for backward: the forward runs under ``torch.autograd.graph.saved_tensors_hooks``; every
     tensor autograd saves is keyed by its storage, and the sum of ``untyped_storage().nbytes()`` over unique
     storages that are not the model's parameters is reported (roughly the activation memory of training);
   - CPU wall time: median of ``--repeats`` calls of ``Trainer.train_step`` (the step training runs: forward,
     loss, backward, clipping, AdamW, LR schedule, and the EMA update for the diffusion model) after one warm-up,
     both models in the same run. (Runs before issue 18 timed forward, loss, backward and AdamW only, without
     clipping or EMA.) Other busy processes distort it a lot (thread contention);
2. one whole-volume prediction of a synthetic phantom at ``--spacing`` mm through ``inference.case.predict_case``
   (eval transforms, sliding windows, inversion), diffusion sampler K = ``--steps`` × N = ``--ensemble``:
   FLOPs of the whole call (a first, counted run), then the wall time of a second, uncounted run: inference
   only (``CasePrediction.seconds``) and the whole call; windows as MONAI places them on the transformed grid;
3. (only when ``../shared/data/real`` exists) windows per real BraTS volume at 1 mm: original shape, shape after
   the eval pipeline's foreground crop, windows for 128³ at overlap 0.5 / 0.25 and 96³ at 0.5, with and
   without the crop.

Usage (from the repository root; a few minutes on 2 CPU cores with the defaults; ``make bench`` runs the first)::

    .venv/bin/python -m benchmarks.bench_cost --out /tmp/cost
    .venv/bin/python -m benchmarks.bench_cost --set 'data.roi_size=[96,96,96]' --steps 10 --ensemble 4 --skip-real
    .venv/bin/python -m benchmarks.bench_cost --set 'data.roi_size=[32,32,32]' --steps 2 --ensemble 2 --repeats 1 \
        --spacing 5 --skip-real --threads 1                   # smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import (
    DIFFUSION_CONFIG, ROOT, UNET_CONFIG, bench_config, blob_batch, build_trainer, median_seconds, pin_threads, windows,
    write_atomic,
)
from medseg_diff.data.conventions import get_convention
from medseg_diff.data.dataset import files_record
from medseg_diff.data.discovery import discover
from medseg_diff.data.synth import synthesize
from medseg_diff.data.transforms import IMAGE, eval_transforms
from medseg_diff.inference.case import predict_case
from medseg_diff.inference.loading import LoadedModel
from medseg_diff.stages.predict import input_records
from medseg_diff.models import count_parameters

CPU = torch.device("cpu")
REAL = ROOT.parent / "shared" / "data" / "real"
KINDS = ("diffusion", "unet")
DEFAULT_OVERRIDES = ["data.spacing=null", "data.roi_size=[64,64,64]", "data.cache=none", "data.max_val_cases=0",
                     "train.epochs=1", "train.steps_per_epoch=1", "train.progress=false", "tracking.enabled=false"]
REAL_WINDOWS = [(128, 0.5), (128, 0.25), (96, 0.5)]  # (roi side, overlap) for section 3
ROWS = [  # (json key, table label, scale, format)
    ("parameters", "parameters", 1, ",.0f"), ("train.flops", "train step: FLOPs (GFLOP)", 1e-9, ",.1f"),
    ("train.saved_bytes", "train step: saved for backward (MiB)", 2.0**-20, ",.0f"),
    ("train.seconds", "train step: CPU time (ms)", 1e3, ",.0f"),
    ("volume.flops", "whole volume: FLOPs (GFLOP)", 1e-9, ",.1f"), ("volume.windows", "whole volume: windows", 1, "d"),
    ("volume.seconds", "whole volume: CPU s (inference)", 1, ",.2f"),
    ("volume.wall_seconds", "whole volume: CPU s (whole predict_case)", 1, ",.2f"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--diffusion-config", type=Path, default=DIFFUSION_CONFIG)
    p.add_argument("--unet-config", type=Path, default=UNET_CONFIG)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both models, after DEFAULT_OVERRIDES (repeatable)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps K (default 10)")
    p.add_argument("--ensemble", type=int, default=4, help="ensemble members N (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed training steps, median reported (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default MEDSEG_DIFF_THREADS, else 2)")
    p.add_argument("--spacing", type=float, default=2.0, help="phantom spacing in mm (default 2)")
    p.add_argument("--real-root", type=Path, default=REAL, help="real BraTS cases (default ../shared/data/real)")
    p.add_argument("--out", type=Path, default=None, help="write cost.md and cost.json here")
    p.add_argument("--skip-volume", action="store_true", help="leave out the whole-volume prediction")
    p.add_argument("--skip-real", action="store_true", help="leave out the real-volume windows")
    return p.parse_args(argv)


class SavedTensorBytes:
    """Context manager: bytes of the unique storages autograd saves for backward inside the block, the
    storages of ``module``'s parameters excluded (a transposed weight saved by ``linear`` is such a view)."""

    def __init__(self, module: nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> "SavedTensorBytes":
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)


def forward_backward_cost(forward: Callable[[], Tensor], module: nn.Module) -> tuple[int, int]:
    """``(FLOPs of forward + backward, bytes saved for backward)`` of ``forward()`` (returns a scalar)."""
    with FlopCounterMode(display=False) as counter:
        with SavedTensorBytes(module) as saved:
            loss = forward()
        loss.backward()
    return counter.get_total_flops(), saved.nbytes


# -- 1. one training step --------------------------------------------------------------------------------------
def measure_train(trainer, image: Tensor, regions: Tensor, repeats: int) -> dict:
    """FLOPs and saved bytes of the trainer's forward + loss + backward (noise drawn from a generator seeded 0,
    so both counts are reproducible), then the median time of ``trainer.train_step``."""

    def forward() -> Tensor:
        return trainer.objective.loss(trainer.module, image, regions, torch.Generator().manual_seed(0)).total

    flops, saved = forward_backward_cost(forward, trainer.net)
    seconds = median_seconds(lambda: trainer.train_step(image, regions), repeats)
    return {"flops": flops, "saved_bytes": saved, "seconds": seconds}


# -- 2. one whole-volume prediction ----------------------------------------------------------------------------
def measure_volume(task, cfg, record: dict, convention) -> dict:
    model = LoadedModel(adapter=task, net=task.net.eval(), cfg=cfg, checkpoint=Path("<random init>"), run_id=None,
                        epoch=0)
    shape = eval_transforms(convention, cfg.data.spacing, with_label=False)(
        {k: v for k, v in record.items() if k != "label"})[IMAGE].shape[1:]
    roi = tuple(cfg.infer.roi_size or cfg.data.roi_size)
    with FlopCounterMode(display=False) as counter:
        predict_case(model, record, convention)
    start = time.perf_counter()
    pred = predict_case(model, record, convention)
    return {"flops": counter.get_total_flops(), "windows": windows(shape, roi, cfg.infer.overlap),
            "shape": list(shape), "roi": list(roi), "overlap": cfg.infer.overlap, "seconds": pred.seconds,
            "wall_seconds": time.perf_counter() - start, "peak_rss_mb": pred.peak_memory_mb}


# -- 3. windows per real volume --------------------------------------------------------------------------------
def measure_real(root: Path) -> list[dict]:
    convention, cases = discover(root)
    transform = eval_transforms(convention, (1.0, 1.0, 1.0), with_label=False)
    rows = []
    for case in cases:
        record = files_record(case, with_label=False)
        original = tuple(nib.load(record[IMAGE][0]).shape[:3])
        cropped = tuple(transform(record)[IMAGE].shape[1:])
        rows.append({"case": case.case_id, "original": list(original), "cropped": list(cropped), "windows": {
            f"{r}@{o}": {"crop": windows(cropped, (r,) * 3, o), "no_crop": windows(original, (r,) * 3, o)}
            for r, o in REAL_WINDOWS}})
        print(f"  3. {case.case_id}: {original} -> {cropped}", file=sys.stderr, flush=True)
    return rows


# -- tables ----------------------------------------------------------------------------------------------------
def _get(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _fmt(value, scale, fmt) -> str:
    return "–" if value is None else format(value * scale if scale != 1 else value, fmt)


def tables(result: dict) -> str:
    m = result["meta"]
    shape = m["volume_shape"]
    volume = f"; phantom at {m['spacing']:g} mm, {shape} after the eval transforms" if shape else ""
    lines = [f"# Diffusion vs U-Net cost ({m['platform']}, {m['threads']} torch threads, torch {m['torch']})\n",
             f"Configs `{m['configs']['diffusion']}` / `{m['configs']['unet']}`, overrides "
             f"`{' '.join(DEFAULT_OVERRIDES)}` then `{' '.join(m['set']) or '(no --set)'}`; sampler K × N = "
             f"{m['steps']} × {m['ensemble']}; train batch {m['batch']}, median of {m['repeats']} steps{volume}.\n",
             "| quantity | diffusion | U-Net | diffusion / U-Net |", "|---|---:|---:|---:|"]
    for key, label, scale, fmt in ROWS:
        (d, u), r = (_get(result["models"][k], key) for k in KINDS), result["ratios"].get(key)
        if d is None and u is None:
            continue
        ratio = "–" if r is None else f"{r:.2f}"
        lines.append(f"| {label} | {_fmt(d, scale, fmt)} | {_fmt(u, scale, fmt)} | {ratio} |")
    if result.get("real"):
        heads = [f"{r}³ @ {o}" for r, o in REAL_WINDOWS]
        lines += ["", "## Windows per real BraTS volume (1 mm; cropped / uncropped)\n",
                  "| case | original | after foreground crop | " + " | ".join(heads) + " |",
                  "|---|---|---|" + "---:|" * len(heads)]
        for row in result["real"]:
            cells = [f"{w['crop']} / {w['no_crop']}" for w in row["windows"].values()]
            lines.append(f"| {row['case']} | {'×'.join(map(str, row['original']))} | "
                         f"{'×'.join(map(str, row['cropped']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    pin_threads(args.threads, default=2)
    overrides = DEFAULT_OVERRIDES + args.overrides + [f"diffusion.sample_steps={args.steps}",
                                                      f"diffusion.ensemble={args.ensemble}"]
    paths = {"diffusion": args.diffusion_config, "unet": args.unet_config}
    cfgs = {k: bench_config(paths[k], overrides + [f"model.kind={k}"]) for k in KINDS}
    start = time.perf_counter()
    trainers, tasks, models = {}, {}, {}
    for kind in KINDS:
        trainers[kind] = build_trainer(cfgs[kind], CPU)  # weights from torch.manual_seed(0)
        tasks[kind] = trainers[kind].adapter
        models[kind] = {"parameters": count_parameters(tasks[kind].net), "stride": tasks[kind].stride}
    # 1. one training step per model, same batch for both
    image, regions = blob_batch(cfgs["diffusion"])
    for kind in KINDS:
        models[kind]["train"] = measure_train(trainers[kind], image, regions, args.repeats)
        print(f"  1. {kind}: {models[kind]['train']}", file=sys.stderr, flush=True)
    # 2. one whole-volume prediction per model, same phantom
    volume_shape = None
    if not args.skip_volume:
        with tempfile.TemporaryDirectory() as tmp:
            case = synthesize(Path(tmp), cases=1, spacing=args.spacing, seed=0)[0]
            convention = get_convention("brats2021")
            _, records = input_records(case, convention=convention.name)
            for kind in KINDS:
                models[kind]["volume"] = measure_volume(tasks[kind], cfgs[kind], records[0], convention)
                volume_shape = "×".join(map(str, models[kind]["volume"]["shape"]))
                print(f"  2. {kind}: {models[kind]['volume']}", file=sys.stderr, flush=True)
    # 3. windows per real volume
    real = measure_real(args.real_root) if not args.skip_real and args.real_root.is_dir() else None
    ratios = {}
    for key, *_ in ROWS:
        d, u = _get(models["diffusion"], key), _get(models["unet"], key)
        if d is not None and u:
            ratios[key] = d / u
    result = {"meta": {
        "configs": {k: _relative(paths[k]) for k in KINDS}, "overrides": DEFAULT_OVERRIDES + args.overrides,
        "set": args.overrides,
        "steps": args.steps, "ensemble": args.ensemble, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "platform": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs", "batch": f"{image.shape[0]} × {'×'.join(map(str, image.shape[2:]))}",
        "spacing": args.spacing, "volume_shape": volume_shape, "seconds": time.perf_counter() - start},
        "models": models, "ratios": ratios, "real": real}
    text = tables(result)
    print(text)
    print(f"total {result['meta']['seconds']:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / "cost.md", text)
        write_atomic(args.out / "cost.json", json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
