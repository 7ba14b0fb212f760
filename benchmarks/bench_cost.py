"""Diffusion model vs U-Net cost on the CPU: FLOPs, bytes saved for backward, wall time, sliding windows.

Both models are built from the training configs (``--diffusion-config``, ``--unet-config``) with
``load_config`` + ``build_adapter``, the same ``--set`` overrides applied to both, randomly initialised with a
fixed seed (cost does not depend on the weights). ``DEFAULT_OVERRIDES`` (64³ crops, native grid of the
phantom, no caching, no tracking) always come first; ``--set`` items follow and win; ``--steps`` / ``--ensemble``
become ``diffusion.sample_steps`` / ``diffusion.ensemble``. Measured, with ``torch.set_num_threads(--threads)``:

1. one training step: a batch of ``data.batch_size × data.samples_per_volume`` random crops of
   ``data.roi_size`` (normal image, nested blob regions, seeded), ``objective.loss(objective.train_module(), ...)``
   in train mode, then ``backward()``:
   - FLOPs of forward + loss + backward with ``torch.utils.flop_counter.FlopCounterMode``. It counts matrix
     products, convolutions and attention kernels only, not elementwise ops (norms, activations, adds);
   - bytes saved for backward: the forward runs under ``torch.autograd.graph.saved_tensors_hooks``; every
     tensor autograd saves is keyed by its storage, and the sum of ``untyped_storage().nbytes()`` over unique
     storages that are not the model's parameters is reported (roughly the activation memory of training);
   - CPU wall time: median of ``--repeats`` steps (forward, loss, backward, AdamW step; no EMA, no clipping)
     after one warm-up, both models in the same run. Other busy processes distort it a lot (thread contention);
2. one whole-volume prediction of a synthetic phantom at ``--spacing`` mm through ``inference.case.predict_case``
   (eval transforms, sliding windows, inversion), diffusion sampler K = ``--steps`` × N = ``--ensemble``:
   FLOPs of the whole call (a first, counted run), then the wall time of a second, uncounted run: inference
   only (``CasePrediction.seconds``) and the whole call; windows as MONAI places them on the transformed grid;
3. (only when ``../shared/data/real`` exists) windows per real BraTS volume at 1 mm: original shape, shape after
   the eval pipeline's foreground crop, windows for 128³ at overlap 0.5 / 0.25 and 96³ at 0.5, with and
   without the crop.

Usage (a few minutes on 2 CPU cores with the defaults)::

    .venv/bin/python benchmarks/bench_cost.py --out benchmarks/results/cost
    .venv/bin/python benchmarks/bench_cost.py --set 'data.roi_size=[96,96,96]' --steps 10 --ensemble 4 --skip-real
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampler import median_seconds  # noqa: E402
from medseg_diff.config import load_config  # noqa: E402
from medseg_diff.data.conventions import get_convention  # noqa: E402
from medseg_diff.data.dataset import files_record  # noqa: E402
from medseg_diff.data.discovery import discover  # noqa: E402
from medseg_diff.data.synth import synthesize  # noqa: E402
from medseg_diff.data.transforms import IMAGE, eval_transforms  # noqa: E402
from medseg_diff.inference.run import input_records  # noqa: E402
from medseg_diff.inference.case import predict_case  # noqa: E402
from medseg_diff.inference.loading import LoadedModel  # noqa: E402
from medseg_diff.inference.adapters import build_adapter  # noqa: E402
from medseg_diff.training.objectives import build_objective  # noqa: E402
from medseg_diff.models import count_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
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
    p.add_argument("--diffusion-config", type=Path, default=ROOT / "configs" / "diffusion.yaml")
    p.add_argument("--unet-config", type=Path, default=ROOT / "configs" / "baseline_unet.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both models, after DEFAULT_OVERRIDES (repeatable)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps K (default 10)")
    p.add_argument("--ensemble", type=int, default=4, help="ensemble members N (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed training steps, median reported (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
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


def windows(shape, roi, overlap: float) -> int:
    """Sliding windows over ``shape`` as MONAI's ``sliding_window_inference`` places them."""
    count = 1
    for size, r in zip(shape, roi):
        stride = max(int(r * (1 - overlap)), 1)
        count *= 1 if size <= r else math.ceil((size - r) / stride) + 1
    return count


# -- 1. one training step --------------------------------------------------------------------------------------
def train_batch(cfg, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``batch_size × samples_per_volume`` crops: normal image ``[B,4,...]``, nested blob regions ``[B,3,...]``."""
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.data.batch_size * cfg.data.samples_per_volume, *cfg.data.roi_size)
    image = torch.randn(shape[0], 4, *shape[1:], generator=g)
    blur = F.avg_pool3d(torch.randn(shape[0], 1, *shape[1:], generator=g), 7, stride=1, padding=3)
    blur = blur / blur.std()
    regions = torch.cat([blur > 1.0, blur > 0.5, blur > 1.5], dim=1).float()  # TC ⊂ WT, ET ⊂ TC
    return image, regions


def measure_train(task, cfg, image: Tensor, regions: Tensor, repeats: int) -> dict:
    objective = build_objective(task)
    module = objective.train_module()
    module.train()

    def forward() -> Tensor:
        return objective.loss(module, image, regions, torch.Generator().manual_seed(0)).total

    flops, saved = forward_backward_cost(forward, task.net)
    optimizer = torch.optim.AdamW(task.net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward().backward()
        optimizer.step()

    return {"flops": flops, "saved_bytes": saved, "seconds": median_seconds(step, repeats)}


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
    torch.set_num_threads(args.threads)
    overrides = DEFAULT_OVERRIDES + args.overrides + [f"diffusion.sample_steps={args.steps}",
                                                      f"diffusion.ensemble={args.ensemble}"]
    paths = {"diffusion": args.diffusion_config, "unet": args.unet_config}
    cfgs = {k: load_config(paths[k], overrides + [f"model.kind={k}"]) for k in KINDS}
    start = time.perf_counter()
    tasks, models = {}, {}
    for kind in KINDS:
        torch.manual_seed(0)
        tasks[kind] = build_adapter(cfgs[kind])
        models[kind] = {"parameters": count_parameters(tasks[kind].net), "stride": tasks[kind].stride}
    # 1. one training step per model, same batch for both
    image, regions = train_batch(cfgs["diffusion"])
    for kind in KINDS:
        models[kind]["train"] = measure_train(tasks[kind], cfgs[kind], image, regions, args.repeats)
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
        (args.out / "cost.md").write_text(text, encoding="utf-8")
        (args.out / "cost.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
