"""What every benchmark shares: set-up (configs, threads, device, synthetic data, models and the trainer's own
training step), timing, results files, and for the quality benchmarks phantoms, training runs and scoring.

Benchmarks run as modules from the repository root (``python -m benchmarks.bench_cost``) and import this one as
``benchmarks.harness``; none of them edits the import path. One module on purpose (issue 18: one harness), hence
a little over 400 lines, in four sections: set-up, timing, results, quality runs.

**Set-up**

* :func:`bench_config` -- a config file with ``--set``-style overrides (``config.load_config``); ``DIFFUSION_CONFIG``,
  ``UNET_CONFIG``, ``FULL_RES_CONFIG`` and ``DEMO_CONFIG`` name the usual ones.
* :func:`pin_threads` -- torch's intra-op threads: the option given, else ``MEDSEG_DIFF_THREADS``, else a default;
  :func:`pick_device` -- ``cpu`` or ``cuda`` (an error when CUDA is asked for and absent).
* :func:`ball_batch`, :func:`blob_batch` -- a random normalised 4-modality image and nested {0, 1} regions
  [TC, WT, ET] (a ball per case; smoothed-noise blobs); :func:`phantom_manifest` -- synthetic phantoms on disk;
  :func:`windows` -- how many sliding windows MONAI places over a volume.
* :func:`build_model` -- the model of a config (its kind: ``kinds.build_kind``, the network seeded);
  :func:`build_trainer` -- the package's ``Trainer`` for that model, without data, seeded, in train mode:
  ``trainer.train_step(image, regions)`` is the step training runs (forward and loss under bf16 autocast on CUDA,
  non-finite check, backward, clipping, AdamW with the config's learning rate, LR schedule, EMA).

**Timing and results**

* :func:`time_steps` -- warm-up calls, then timed calls (CUDA events and ``torch.cuda.synchronize`` on the GPU, wall
  clock on the CPU) and the peak memory over the timed calls (``max_memory_allocated``; peak RSS on the CPU);
  :func:`median_seconds` -- the CPU-only short form (median wall seconds after one warm-up); :class:`Budget` -- a
  wall-clock budget for optional measurements.
* :class:`Row` and :class:`Report` -- result rows rewritten to ``OUT/results.{json,md}`` after every row;
  :func:`write_atomic`, :func:`environment` (card, versions, commit) for any results file.

**Quality runs** (``bench_ablation``, ``study``, ``bench_mechanisms``)

* :func:`run_config` -- ``configs/demo_cpu.yaml`` (or another) with ``--set`` overrides, trained into ``run_dir``
  without MLflow; :func:`train_or_reuse` -- a finished run (``best.pt`` present, ``last.pt`` at ``train.epochs``, the
  same config) is reused, an unfinished one resumes (``training.run.train``), one of another config is refused; the
  training wall time is kept in ``RUN_DIR/bench_train.json`` so that a reused run still reports it.
* :func:`scored_rows` -- per-case, per-region rows of one ``CasePrediction``: ``evaluation.run.score_case``
  (global and lesion-wise metrics, entropy AUROC and ECE), as ``evaluate`` writes them to ``per_case.csv``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from medseg_diff.config import Config, load_config
from medseg_diff.inference.sliding_window import RssMonitor

if TYPE_CHECKING:
    from medseg_diff.data.conventions import LabelConvention

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEMO_CONFIG = CONFIGS / "demo_cpu.yaml"
DIFFUSION_CONFIG = CONFIGS / "diffusion.yaml"
UNET_CONFIG = CONFIGS / "baseline_unet.yaml"
FULL_RES_CONFIG = CONFIGS / "ablations" / "full_resolution.yaml"
GIB = 2**30
TRAIN_RECORD = "bench_train.json"
#: config keys that do not change what a run trains (where it writes, what it logs, the manifest's path)
_NOT_TRAINING = {"experiment": ("output_dir",), "data": ("manifest", "root"), "train": ("progress", "device"),
                 "tracking": None}


# --- set-up ---------------------------------------------------------------------------------------------------


def bench_config(path: Path, overrides: Sequence[str] = ()) -> Config:
    """``path`` with ``--set``-style ``overrides`` applied in order (later ones win)."""
    return load_config(path, list(overrides))


def pin_threads(threads: int | None = None, default: int | None = None) -> int:
    """``torch.set_num_threads``: ``threads`` if given, else ``MEDSEG_DIFF_THREADS``, else ``default`` (``None``:
    leave torch's choice). Returns the thread count in use."""
    chosen = threads or int(os.environ.get("MEDSEG_DIFF_THREADS") or 0) or default
    if chosen:
        torch.set_num_threads(chosen)
    return torch.get_num_threads()


def pick_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} but torch.cuda.is_available() is False")
    return torch.device(name)


def ball_batch(batch: int, side: int, dev: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A normal 4-modality image ``[batch, 4, side³]`` and nested {0, 1} regions [TC, WT, ET] (a ball per case)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 4, side, side, side, generator=g)
    axis = torch.arange(side, dtype=torch.float32) - side / 2
    r = (axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2).sqrt() / side
    wt, tc, et = r < 0.3, r < 0.18, (r < 0.18) & (r > 0.12)
    regions = torch.stack([tc, wt, et]).float().expand(batch, -1, -1, -1, -1).contiguous()
    return image.to(dev), regions.to(dev)


def blob_batch(cfg: Config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The config's training batch shape (``batch_size × samples_per_volume`` crops of ``data.roi_size``): a normal
    image ``[B, 4, ...]`` and nested blob regions ``[B, 3, ...]`` (TC ⊂ WT, ET ⊂ TC) from smoothed noise."""
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.data.batch_size * cfg.data.samples_per_volume, *cfg.data.roi_size)
    image = torch.randn(shape[0], 4, *shape[1:], generator=g)
    blur = F.avg_pool3d(torch.randn(shape[0], 1, *shape[1:], generator=g), 7, stride=1, padding=3)
    blur = blur / blur.std()
    regions = torch.cat([blur > 1.0, blur > 0.5, blur > 1.5], dim=1).float()
    return image, regions


def build_model(cfg: Config, seed: int = 0):
    """The model adapter of ``cfg.model.kind`` (``kinds.build_kind``: network, segmenter, prior),
    its network's weights drawn after ``torch.manual_seed(seed)`` (cost does not depend on the weights)."""
    from medseg_diff.kinds import build_kind

    torch.manual_seed(seed)
    return build_kind(cfg)


def build_trainer(cfg: Config, dev: torch.device, seed: int = 0):
    """The package's ``Trainer`` for ``cfg`` on ``dev``, with no data (its loader is never iterated): weights from
    ``torch.manual_seed(seed)``, the diffusion noise generator seeded with ``seed``, the module in train mode.
    ``train.compile``, ``train.ema_decay``, ``train.amp``, ``train.lr`` and ``train.grad_clip`` act as in training."""
    from medseg_diff.training.trainer import Trainer  # training modules only where a step is run

    trainer = Trainer(cfg, build_model(cfg, seed), train_data=[None], val_data=[], device=dev)
    trainer.module.train()
    trainer.noise_generator.manual_seed(seed)
    return trainer


def windows(shape: Sequence[int], roi: int | Sequence[int], overlap: float) -> int:
    """Sliding windows over ``shape`` as MONAI's ``sliding_window_inference`` places them."""
    rois = (roi,) * len(shape) if isinstance(roi, int) else roi
    count = 1
    for size, r in zip(shape, rois):
        stride = max(int(r * (1 - overlap)), 1)
        count *= 1 if size <= r else math.ceil((size - r) / stride) + 1
    return count


# --- timing ---------------------------------------------------------------------------------------------------


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


@dataclass
class Timing:
    ms: list[float]  # per timed call: CUDA events on the GPU, wall clock on the CPU
    wall_ms: list[float]
    peak_bytes: int | None  # over the timed calls (None when not measured)
    warmup_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ms)


def time_steps(fn: Callable[[], object], dev: torch.device, warmup: int, repeats: int,
               memory: bool = True) -> Timing:
    """``warmup`` untimed calls, then ``repeats`` timed ones; with ``memory``, the peak over the timed calls
    (CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``; CPU: peak RSS sampled by ``RssMonitor``)."""
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        warm.append(1000 * (time.perf_counter() - t0))
    monitor: contextlib.AbstractContextManager = contextlib.nullcontext()
    if memory and dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    elif memory:
        monitor = RssMonitor()
    ms, wall = [], []
    with monitor:
        for _ in range(repeats):
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                start.record()
                fn()
                end.record()
                end.synchronize()
                wall.append(1000 * (time.perf_counter() - t0))
                ms.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                wall.append(1000 * (time.perf_counter() - t0))
                ms.append(wall[-1])
    peak = None
    if memory:
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else int(monitor.peak_mb * 2**20)
    return Timing(ms, wall, peak, warm)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """CPU: median wall seconds of ``repeats`` calls after one warm-up call."""
    return time_steps(fn, torch.device("cpu"), 1, repeats, memory=False).median / 1000


class Budget:
    """A wall-clock budget for a whole run; optional measurements are skipped when it runs short."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


# --- results --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    item: str  # e.g. train | attention | volume | sweep | extra
    name: str
    status: str = "ok"  # ok | out of memory | error | skipped
    value: float | None = None  # median, in `unit`
    unit: str = "ms"
    peak_gib: float | None = None
    target: str = ""
    meets: str = ""  # yes | no | n/a | ""
    settings: str = ""
    note: str = ""
    samples: list[float] = field(default_factory=list)  # every timed call, in `unit`
    extra: dict = field(default_factory=dict)


class Report:
    """Rows plus ``meta``; rewritten to ``out/results.json`` and ``out/results.md`` after every row, so a run cut
    short keeps what it measured. ``header(meta)`` gives the markdown lines above the table."""

    def __init__(self, out: Path | None, meta: dict, header: Callable[[dict], list[str]] | None = None):
        self.out, self.meta, self.rows, self.header = out, meta, [], header
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        value = "—" if row.value is None else f"{row.value:.4g} {row.unit}"
        peak = "—" if row.peak_gib is None else f"{row.peak_gib:.2f} GiB"
        print(f"[{time.strftime('%H:%M:%S')}] {row.item}/{row.name}: {row.status} {value} peak {peak} {row.note}",
              flush=True)
        self.save()
        return row

    def find(self, item: str, name: str) -> Row | None:
        return next((r for r in self.rows if r.item == item and r.name == name and r.status == "ok"), None)

    def save(self) -> None:
        if self.out is None:
            return
        data = {"meta": self.meta, "rows": [asdict(r) for r in self.rows]}
        write_atomic(self.out / "results.json", json.dumps(data, indent=2, default=str) + "\n")
        write_atomic(self.out / "results.md", self.markdown() + "\n")

    def markdown(self) -> str:
        lines = (self.header(self.meta) if self.header else []) + [
            "| item | what | median | peak memory | target | meets | settings | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            value = "—" if r.value is None else f"{r.value:.4g} {r.unit}"
            if r.status != "ok":
                value = f"{r.status}" if r.value is None else f"{value} ({r.status})"
            peak = "—" if r.peak_gib is None else f"{r.peak_gib:.2f} GiB"
            lines.append(f"| {r.item} | {r.name} | {value} | {peak} | {r.target} | {r.meets} | {r.settings} | "
                         f"{r.note.replace('|', '/')} |")
        return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def commit() -> str:
    """``git describe`` here; a copy of the tree without ``.git`` (the device machine) passes ``BENCH_COMMIT``."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"] + " (BENCH_COMMIT)"
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or "unknown (no git)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def environment(dev: torch.device) -> dict:
    """The machine and software a result was measured with."""
    import monai

    cuda = dev.type == "cuda"
    name = (torch.cuda.get_device_name(dev) if cuda else
            f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)")
    return {
        "device": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))) if cuda else None,
        "memory_gib": round(torch.cuda.get_device_properties(dev).total_memory / GIB, 1) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "commit": commit(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv[1:],
    }


# --- quality runs: phantoms, training runs, scoring -----------------------------------------------------------


def phantom_manifest(data_dir: Path, cases: int, held_out: int, spacing: float = 3.0, seed: int = 0,
                     name: str = "synthetic-brats-bench", workers: int = 1) -> Path:
    """``data_dir/manifest.json`` of ``cases`` phantoms at ``spacing`` mm, ``held_out`` of them in the test subset
    (5 folds over the rest, fold 0 validates, as in the demo); synthesised only if the manifest does not exist
    (``build_manifest``'s ``test_fraction`` = held_out / cases; the files do not depend on ``workers``)."""
    from medseg_diff.data.manifest import build_manifest, write_manifest
    from medseg_diff.data.synth import synthesize

    manifest = data_dir / "manifest.json"
    if not manifest.exists():
        if not 0 < held_out < cases:
            raise ValueError(f"held_out must be in 1..{cases - 1}, got {held_out}")
        synthesize(data_dir, cases=cases, spacing=spacing, seed=seed, layout="brats2021", workers=workers)
        write_manifest(build_manifest(data_dir, name=name, convention="brats2021", folds=5,
                                      test_fraction=held_out / cases, seed=seed), manifest)
    return manifest


def run_config(manifest: Path, run_dir: Path, overrides: list[str], config: Path = DEMO_CONFIG) -> Config:
    """``config`` with ``overrides``, training into ``run_dir`` on ``manifest`` without MLflow or progress bars."""
    return bench_config(config, [*overrides, f"data.manifest={manifest}", f"experiment.output_dir={run_dir}",
                                 "tracking.enabled=false", "train.progress=false"])


@dataclass
class TrainedRun:
    checkpoint: Path  # best.pt
    seconds: float  # training wall time (NaN for a reused run that has no record of it)
    reused: bool


def train_or_reuse(cfg: Config) -> TrainedRun:
    """Train ``cfg`` into ``experiment.output_dir`` unless a finished run of the same config is there."""
    from medseg_diff.training.run import train  # training modules only when something is trained

    run_dir = Path(cfg.experiment.output_dir)
    record = run_dir / TRAIN_RECORD
    if finished_run(cfg):
        seconds = json.loads(record.read_text())["seconds"] if record.exists() else float("nan")
        return TrainedRun(run_dir / "best.pt", seconds, reused=True)
    resumed = (run_dir / "last.pt").exists()
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"seconds": seconds, "resumed": resumed}), encoding="utf-8")
    return TrainedRun(run_dir / "best.pt", seconds, reused=False)


def finished_run(cfg: Config) -> bool:
    """``best.pt`` exists and ``last.pt`` reached ``train.epochs`` with this config. A run of another config
    (changed model, budget, data or a newer model version's defaults) raises ``RuntimeError``: delete its folder."""
    from medseg_diff.checkpoint import load_checkpoint, upgrade_config
    from medseg_diff.config import config_from_dict

    run_dir = Path(cfg.experiment.output_dir)
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    if not last.exists():
        return False
    ckpt = load_checkpoint(last, map_location="cpu")
    saved = config_from_dict(upgrade_config(ckpt["config"], ckpt.get("format", 1))).to_dict()
    differ = _differences(_training_part(saved), _training_part(cfg.to_dict()))
    if differ:
        raise RuntimeError(f"{run_dir} holds a run of another config ({'; '.join(differ[:4])}); delete the folder "
                           "to retrain it, or use another --out")
    return best.exists() and int(ckpt.get("epoch", 0)) >= cfg.train.epochs


def _training_part(raw: dict) -> dict:
    """The settings that shape the trained weights: no sampler or tracking settings, and of ``model``, ``loss`` and
    ``diffusion`` only what the run's own model kind uses (a U-Net run is not stale when the diffusion defaults move)."""
    out = {}
    kind = raw.get("model", {}).get("kind")
    for section, values in raw.items():
        skip = _NOT_TRAINING.get(section, ())
        if skip is None or (section == "diffusion" and kind != "diffusion"):
            continue
        out[section] = {k: v for k, v in values.items() if k not in skip} if isinstance(values, dict) else values
    if kind is not None:
        own = {"diffusion": "denoiser"}.get(kind, kind)
        out["model"] = {k: v for k, v in out.get("model", {}).items() if k in ("kind", own)}
        if kind != "diffusion":
            out["loss"] = {k: v for k, v in out.get("loss", {}).items() if k in ("dice", "bce")}
    return out


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], key)
        elif a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{key}: {a.get(k, '<absent>')!r} there, {b.get(k, '<absent>')!r} here")
    return out


def scored_rows(label: str, pred, conv: LabelConvention) -> list[dict]:
    """Rows ``{case, model=label, region, dice, ..., uncertainty_auroc, ece, seconds}`` of one ``CasePrediction``
    (``inference.case.predict_case``), scored by ``evaluation.run.score_case`` on the original grid."""
    from medseg_diff.evaluation.metrics import metric_rows
    from medseg_diff.evaluation.scoring import score_case
    from medseg_diff.evaluation.sources import ScoredInputs

    inputs = ScoredInputs(pred.case_id, pred.labels, pred.ground_truth, pred.spacing, Path(), probs=pred.probs,
                          uncertainty=pred.entropy, seconds=pred.seconds, peak_memory_mb=pred.peak_memory_mb)
    result, extra, _ = score_case(label, inputs, conv)  # global, lesion-wise, AUROC and ECE
    rows = metric_rows([result])
    for row in rows:
        row.update(extra[row["region"]])
    return rows
