"""SPEC §7 GPU targets in one run: training step, linear attention, whole-volume inference.

What is measured (bf16 autocast on CUDA, fp32 on the CPU):

1. ``train``     -- one trainer step (forward + loss + backward + grad clip + AdamW step) at a 128³ crop,
   batch 2, done exactly as ``training/trainer.py`` does it: ``build_adapter(load_config(...))``, the adapter's
   ``train_module()`` and ``loss()`` (for the diffusion model ``DiffusionLoss`` through ``EncodeDenoise``),
   plus the EMA update the trainer does for the diffusion model. Diffusion (``configs/diffusion.yaml``)
   vs the plain U-Net (``configs/baseline_unet.yaml``), MONAI ``UNet`` at the 12.9 M-parameter setting of
   ANCHORS.md, the full-resolution ablation (``configs/ablations/full_resolution.yaml``), and (CUDA, or with
   ``--compile``) both models under ``torch.compile`` as ``train.compile: true`` runs them. Median of 10 timed
   steps after 3 warm-up steps (CUDA events); peak = ``max_memory_allocated`` over the timed steps (weights,
   gradients, optimiser state and activations).
2. ``attention`` -- one attention block, 64 channels, 4 heads x 32, fwd+bwd at 32³ / 48³ / 64³ tokens:
   ``LinearAttention3d`` vs flash SDPA softmax attention (``benchmarks/bench_attention.measure``, median of 7
   after 1 warm-up; peak beyond inputs and weights); out-of-memory is reported, not raised.
3. ``volume``    -- a whole volume (random normalised input) through ``infer_volume``: the brain box of a real
   BraTS case (140 x 190 x 137: what ``predict`` runs on after its foreground crop) and the uncropped
   240 x 240 x 155 grid; ``UNetSegmenter`` vs ``DiffusionSegmenter`` (N = 4 members x K = 10 DDIM steps from the
   config, attention maps on the last step); sliding windows 128³, overlap 0.5, ``sw_batch_size`` 4 (halved on
   out-of-memory, and reported). Seconds per volume = median of 3 after 1 warm-up (fewer, noted, if the budget
   runs short); peak memory. ``sweep``: the brain box for K x N in ``Sizes.sweep``.
4. ``extras``    -- diagnostics, each reported separately and only while the time budget (``--budget-s``)
   lasts, median of 2 volumes after 1 warm-up: one denoiser forward (and encode) per window batch; the
   diffusion step without level-0 linear attention; the volume with ``cudnn.benchmark``, without attention
   maps, with 96³ windows, with ``channels_last_3d`` weights, with a ``torch.compile``-d denoiser forward
   (CUDA only unless ``--compile``).

Every measurement is its own try/except: one failing (error or out of memory) leaves the others' results.
With ``--out DIR`` the results are rewritten to ``DIR/results.json`` and ``DIR/results.md`` after each one.

Usage::

    python benchmarks/gpu_bench.py --device cuda --out OUT       # the GPU run (see benchmarks/GPU.md)
    python benchmarks/gpu_bench.py --device cpu --tiny --out /tmp/gpu_bench_smoke   # CPU smoke run, < 2 min
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_attention  # noqa: E402
from medseg_diff.config import Config, load_config  # noqa: E402
from medseg_diff.inference.sliding_window import RssMonitor, UNetSegmenter, infer_volume  # noqa: E402
from medseg_diff.inference.adapters import build_adapter  # noqa: E402
from medseg_diff.training.objectives import build_objective  # noqa: E402

GIB = 2**30
DIFFUSION_CFG = ROOT / "configs" / "diffusion.yaml"
UNET_CFG = ROOT / "configs" / "baseline_unet.yaml"
FULL_RES_CFG = ROOT / "configs" / "ablations" / "full_resolution.yaml"
UNET_12M9 = ["model.unet.channels=[32,64,128,256,320]", "model.unet.strides=[2,2,2,2]", "model.unet.num_res_units=2"]
# --tiny: shrink the networks and the sampler so that the whole run takes seconds on 2 CPU cores
TINY_SET = [
    "model.denoiser.channels=[4,8,16]", "model.denoiser.heads=1", "model.denoiser.dim_head=8",
    "model.unet.channels=[4,8,16,32,64]", "diffusion.sample_steps=2", "diffusion.ensemble=2",
]  # fmt: skip
TINY_12M9 = ["model.unet.channels=[4,8,16,32,40]"]
TINY_FULL_RES = ["model.denoiser.channels=[4,8,16,32]"]


@dataclass
class Sizes:
    crop: int = 128
    batch: int = 2
    attention_sides: tuple[int, ...] = (32, 48, 64)
    volume: tuple[int, int, int] = (240, 240, 155)
    brain: tuple[int, int, int] = (140, 190, 137)  # the largest brain box of the real BraTS cases (bench_cost.py)
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


@dataclass
class Row:
    item: str  # train | attention | volume | extra
    name: str
    status: str = "ok"  # ok | out of memory | error | skipped
    value: float | None = None  # median, in `unit`
    unit: str = "ms"
    peak_gib: float | None = None
    target: str = ""
    meets: str = ""  # yes | no | n/a | ""
    settings: str = ""
    note: str = ""
    samples: list[float] = field(default_factory=list)  # every timed iteration, in `unit`
    extra: dict = field(default_factory=dict)


class Report:
    """Rows plus environment; rewritten to ``out/results.{json,md}`` after every row."""

    def __init__(self, out: Path | None, meta: dict):
        self.out, self.meta, self.rows = out, meta, []
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
        _write_atomic(self.out / "results.json", json.dumps(data, indent=2, default=str) + "\n")
        _write_atomic(self.out / "results.md", self.markdown() + "\n")

    def markdown(self) -> str:
        m = self.meta
        lines = [
            f"# medseg-diff GPU benchmark ({m['device']})",
            "",
            f"- device: **{m['device']}**; torch {m['torch']} (CUDA {m['cuda']}, cuDNN {m['cudnn']}); "
            f"MONAI {m['monai']}; Python {m['python']}",
            f"- precision: {m['precision']}; commit {m['commit']}; started {m['started']}; "
            f"{'tiny sizes (smoke run)' if m['tiny'] else 'full sizes'}",
            f"- peak memory: {m['peak_kind']}",
            "",
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- environment, timing, memory -------------------------------------------------------------------------


def _commit() -> str:
    """``git rev-parse`` here; the device's copy of the tree has no ``.git``: pass ``BENCH_COMMIT`` there."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"] + " (BENCH_COMMIT)"
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or "unknown (no git)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def environment(dev: torch.device, tiny: bool) -> dict:
    import monai

    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU ({platform.processor() or platform.machine()}), " \
                                                        f"{torch.get_num_threads()} thread(s)"
    return {
        "device": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))) if cuda else None,
        "memory_gib": round(torch.cuda.get_device_properties(dev).total_memory / GIB, 1) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "precision": "bf16 autocast" if cuda else "fp32",
        "peak_kind": "torch.cuda.max_memory_allocated (reset before the timed part)" if cuda
        else "peak process RSS (CPU; indicative only)",
        "commit": _commit(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "tiny": tiny,
        "argv": sys.argv[1:],
    }


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
    ms: list[float]  # per timed iteration: CUDA events on the GPU, wall clock on the CPU
    wall_ms: list[float]
    peak_bytes: int | None
    warmup_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ms)


def time_steps(fn: Callable[[], None], dev: torch.device, warmup: int, repeats: int) -> Timing:
    """``warmup`` untimed calls, then ``repeats`` timed ones; peak memory over the timed calls."""
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        warm.append(1000 * (time.perf_counter() - t0))
    monitor: contextlib.AbstractContextManager = contextlib.nullcontext()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
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
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else int(monitor.peak_mb * 2**20)
    return Timing(ms, wall, peak, warm)


class Budget:
    """A wall-clock budget for the whole run; optional measurements are skipped when it runs short."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def guarded(report: Report, item: str, name: str, dev: torch.device, **row_kw) -> Callable:
    """Decorator-like runner: ``guarded(...)(fn)`` runs ``fn() -> Row``; errors and OOM become a row."""

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


# --- 1. training step -------------------------------------------------------------------------------------


def _ema_multi_avg_fn(decay: float) -> Callable:
    """The trainer's EMA update (imported, so that the step is the trainer's own)."""
    from medseg_diff.training.trainer import ema_multi_avg_fn

    return ema_multi_avg_fn(decay)


def random_batch(batch: int, side: int, dev: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised 4-modality image and nested {0, 1} regions [TC, WT, ET] (a ball per case)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 4, side, side, side, generator=g)
    axis = torch.arange(side, dtype=torch.float32) - side / 2
    r = (axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2).sqrt() / side
    wt, tc, et = r < 0.3, r < 0.18, (r < 0.18) & (r > 0.12)
    regions = torch.stack([tc, wt, et]).float().expand(batch, -1, -1, -1, -1).contiguous()
    return image.to(dev), regions.to(dev)


def measure_train(cfg: Config, dev: torch.device, sizes: Sizes, ema: bool, label: str, compiled: bool = False) -> Row:
    torch.manual_seed(0)
    task = build_adapter(cfg)
    net = task.net.to(dev).train()
    objective = build_objective(task)
    module = objective.train_module().to(dev)
    if compiled:  # as the trainer does with train.compile: true (the warm-up steps include the compilation)
        module = torch.compile(module)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ema_model, ema_note = None, ""
    if ema and task.uses_ema and cfg.train.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel

        ema_note = "trainer.ema_multi_avg_fn"
        ema_model = AveragedModel(net, multi_avg_fn=_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
    amp = cfg.train.amp and dev.type == "cuda"
    generator = torch.Generator(device=dev).manual_seed(0)
    image, regions = random_batch(sizes.batch, sizes.crop, dev)

    def step() -> None:  # training/trainer.py Trainer._train_step, minus data loading and the LR schedule
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = objective.loss(module, image, regions, generator)
        if not math.isfinite(float(out.total.detach())):  # the trainer's non-finite check (a host sync)
            raise FloatingPointError("non-finite loss")
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
        optimizer.step()
        if ema_model is not None:
            ema_model.update_parameters(net)

    timing = time_steps(step, dev, sizes.step_warmup, sizes.step_repeats)
    params = sum(p.numel() for p in net.parameters())
    settings = f"{sizes.crop}³ crop, batch {sizes.batch}, {params / 1e6:.1f} M params"
    notes = [f"wall {statistics.median(timing.wall_ms):.1f} ms",
             f"first warm-up step {timing.warmup_ms[0]:.0f} ms" if timing.warmup_ms else ""]
    if ema_model is not None:
        notes.append(f"with EMA update ({ema_note})")
    return Row("train", label, value=timing.median, unit="ms", peak_gib=timing.peak_bytes / GIB,
               settings=settings, note="; ".join(n for n in notes if n), samples=timing.ms,
               extra={"params": params, "wall_ms": timing.wall_ms, "warmup_ms": timing.warmup_ms})


def run_train(report: Report, dev: torch.device, sizes: Sizes, cfgs: dict[str, Config], full: bool,
              compile_: bool = False) -> None:
    def one(name: str, cfg: Config, ema: bool) -> None:
        guarded(report, "train", name, dev)(lambda: measure_train(cfg, dev, sizes, ema, name))

    one("unet (baseline_unet.yaml)", cfgs["unet"], ema=False)
    one("diffusion (diffusion.yaml), trainer step incl. EMA", cfgs["diffusion"], ema=True)
    one("diffusion (diffusion.yaml), no EMA", cfgs["diffusion"], ema=False)
    one("MONAI UNet 12.9M (ANCHORS setting)", cfgs["unet12m9"], ema=False)
    one("diffusion full resolution (ablations/full_resolution.yaml), incl. EMA", cfgs["full_resolution"], ema=True)
    if dev.type == "cuda" or compile_:
        for name, cfg, ema in (("unet (baseline_unet.yaml), torch.compile", cfgs["unet"], False),
                               ("diffusion (diffusion.yaml), torch.compile, incl. EMA", cfgs["diffusion"], True)):
            guarded(report, "train", name, dev)(
                lambda n=name, c=cfg, e=ema: measure_train(c, dev, sizes, e, n, compiled=True))
    pairs = [("unet (baseline_unet.yaml)", "diffusion (diffusion.yaml), trainer step incl. EMA"),
             ("unet (baseline_unet.yaml)", "diffusion (diffusion.yaml), no EMA"),
             ("unet (baseline_unet.yaml), torch.compile", "diffusion (diffusion.yaml), torch.compile, incl. EMA")]
    for unet_label, label in pairs:
        unet, diff = report.find("train", unet_label), report.find("train", label)
        if unet is None or diff is None:
            continue
        ratio = diff.value / unet.value
        ok = ratio <= 2.0 and diff.peak_gib <= 8.0
        report.add(Row("train", f"ratio {label.split(', ', 1)[1]} / {unet_label.split(' ', 1)[0]}"
                       + (" (both compiled)" if "compile" in unet_label else ""), value=ratio, unit="x",
                       peak_gib=diff.peak_gib, target="≤ 2× U-Net step, peak ≤ 8 GiB",
                       meets=("yes" if ok else "no") if full else "n/a",
                       settings=diff.settings, note=f"{diff.value:.1f} ms vs {unet.value:.1f} ms"))


# --- 2. attention block -----------------------------------------------------------------------------------


def run_attention(report: Report, dev: torch.device, sizes: Sizes, full: bool, budget: Budget) -> None:
    amp = torch.bfloat16 if dev.type == "cuda" else None
    for side in sizes.attention_sides:
        for kind in ("linear", "sdpa"):
            name = f"{kind} {side}³ = {side**3:,} tokens"
            if budget.left() < 20:
                report.add(Row("attention", name, status="skipped", note="time budget"))
                continue

            def measure(kind=kind, side=side) -> Row:
                if dev.type == "cuda":
                    r = bench_attention.measure_cuda(kind, side, sizes.attention_repeats, amp)
                else:
                    r = bench_attention.measure(kind, side, "cpu", None, sizes.attention_repeats)
                if r.ms is None:
                    return Row("attention", f"{kind} {side}³ = {side**3:,} tokens", status="out of memory",
                               note=r.note)
                row = Row("attention", f"{kind} {side}³ = {side**3:,} tokens", value=r.ms, unit="ms",
                          peak_gib=r.peak_bytes / GIB, settings="64 ch, 4 heads × 32, batch 1, fwd+bwd",
                          note=f"largest tensor {r.largest_bytes / 2**20:.0f} MiB; peak beyond inputs and weights"
                          + ("" if dev.type == "cuda" else "; CPU: RSS growth in-process, indicative only"))
                if kind == "linear" and side == 64:
                    row.target = "≤ 5 ms, ≤ 1.1 GiB"
                    row.meets = ("yes" if r.ms <= 5.0 and r.peak_bytes <= 1.1 * GIB else "no") if full else "n/a"
                if kind == "sdpa":
                    row.note += "; flash SDPA (default backend)"
                return row

            guarded(report, "attention", name, dev)(measure)


# --- 3. whole volume --------------------------------------------------------------------------------------


def n_windows(size: tuple[int, ...], roi: int, overlap: float) -> int:
    """Number of sliding windows MONAI takes (its ``_get_scan_interval`` + ``dense_patch_slices``)."""
    total = 1
    for s in size:
        if s <= roi:
            continue
        interval = max(int(roi * (1 - overlap)), 1)
        total *= math.ceil((s - roi) / interval) + 1
    return total


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


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


def volume_row(name: str, seconds: list, sw: int, peak_mb: float, pred, warm: float, sizes: Sizes, roi: int,
               segmenter, target: str = "", full: bool = False, extra_note: str = "", repeats: int = 0,
               size: tuple[int, ...] | None = None) -> Row:
    size = tuple(size or sizes.volume)
    notes = [f"{n_windows(size, roi, 0.5)} windows", f"warm-up {warm:.2f} s"]
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
    return Row("volume", name, value=value, unit="s", peak_gib=peak_mb / 1024, target=target, meets=meets,
               settings=settings, note="; ".join(notes), samples=seconds)


def diffusion_segmenter(cfg: Config, dev: torch.device, attention: bool = True, channels_last: bool = False,
                        compiled: bool = False):
    torch.manual_seed(0)
    task = build_adapter(cfg)
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
    torch.manual_seed(0)
    task = build_adapter(cfg)
    return UNetSegmenter(task.net.to(dev).eval(), name="unet")


def run_volume(report: Report, dev: torch.device, sizes: Sizes, cfgs: dict[str, Config], full: bool,
               budget: Budget) -> None:
    """Both models on the brain's bounding box of a BraTS volume (what ``predict`` runs on: its eval pipeline
    crops to the foreground first) and on the whole uncropped 240x240x155 grid."""
    g = torch.Generator().manual_seed(0)
    images = {size: torch.randn(1, 4, *size, generator=g).to(dev) for size in (sizes.brain, sizes.volume)}

    def run(name, make, size, target="") -> Row | None:
        def go() -> Row:
            segmenter = make()
            seconds, sw, peak, pred, warm = measure_volume(segmenter, images[size], dev, sizes, sizes.roi,
                                                           sizes.volume_repeats, budget)
            return volume_row(name, seconds, sw, peak, pred, warm, sizes, sizes.roi, segmenter, target, full,
                              size=size)

        return guarded(report, "volume", name, dev)(go)

    # the U-Net first: it takes a fraction of a second, so a slow diffusion run cannot cost its row
    for size, where in ((sizes.brain, "brain box"), (sizes.volume, "uncropped")):
        run(f"unet (baseline_unet.yaml), {where}", lambda: unet_segmenter(cfgs["unet"], dev), size)
        run(f"diffusion (diffusion.yaml), {where}", lambda: diffusion_segmenter(cfgs["diffusion"], dev), size,
            target="≤ 1 s" if where == "brain box" else "")


def run_sweep(report: Report, dev: torch.device, sizes: Sizes, cfgs: dict[str, Config], budget: Budget) -> None:
    """Whole brain-box volume for each (K steps, N members) of ``sizes.sweep``: the cost side of the few-step
    curve (its Dice side is benchmarks/bench_ablation.py on the phantoms)."""
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
            seconds, sw, peak, pred, warm = measure_volume(segmenter, image, dev, sizes, sizes.roi,
                                                           sizes.extra_volume_repeats, budget)
            row = volume_row(name, seconds, sw, peak, pred, warm, sizes, sizes.roi, segmenter,
                             repeats=sizes.extra_volume_repeats, size=sizes.brain)
            row.item = "sweep"
            return row

        guarded(report, "sweep", name, dev)(go)


# --- 4. extras (each only if the budget allows) -----------------------------------------------------------


def run_extras(report: Report, dev: torch.device, sizes: Sizes, cfgs: dict[str, Config], full: bool,
               budget: Budget, compile_: bool) -> None:
    """Diagnostics, most useful first, each only while the budget lasts."""
    base = report.find("volume", "diffusion (diffusion.yaml), uncropped")
    # one volume variant costs about (1 warm-up + repeats) base volumes, plus set-up
    per_volume = (base.value * (1 + sizes.extra_volume_repeats) + 10) if base is not None else 60.0
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 4, *sizes.volume, generator=g).to(dev)

    def volume_extra(name, make, roi=sizes.roi, ctx=contextlib.nullcontext, need=per_volume, note=""):
        if budget.left() < need:
            report.add(Row("extra", name, status="skipped", note=f"time budget ({budget.left():.0f} s left)"))
            return

        def go() -> Row:
            with ctx():
                segmenter = make()
                seconds, sw, peak, pred, warm = measure_volume(segmenter, image, dev, sizes, roi,
                                                               sizes.extra_volume_repeats, budget)
            row = volume_row(name, seconds, sw, peak, pred, warm, sizes, roi, segmenter, "",
                             full, note, repeats=sizes.extra_volume_repeats)
            row.item = "extra"
            return row

        guarded(report, "extra", name, dev)(go)

    diffusion = cfgs["diffusion"]
    for windows in sorted({1, sizes.sw_batch}):
        name = f"denoiser forward, {windows} window(s) × N members"
        if budget.left() > 30:
            guarded(report, "extra", name, dev)(
                lambda w=windows, nm=name: measure_forward(diffusion, dev, sizes, w, nm))
        else:
            report.add(Row("extra", name, status="skipped", note="time budget"))
    name = "train: diffusion, linear attention only at level 1 (no EMA)"
    if budget.left() > 30:
        guarded(report, "extra", name, dev)(
            lambda: _as_extra(measure_train(cfgs["diffusion_no_l0"], dev, sizes, False, name)))
    else:
        report.add(Row("extra", name, status="skipped", note="time budget"))
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


def measure_forward(cfg: Config, dev: torch.device, sizes: Sizes, windows: int, label: str) -> Row:
    """One denoiser forward (no grad, eval, autocast) on ``windows`` x N members, and the encoder on the
    windows: a volume costs about ceil(n_windows / sw_batch_size) x (encode + K x forward)."""
    torch.manual_seed(0)
    task = build_adapter(cfg)
    net = task.net.to(dev).eval()
    n = cfg.diffusion.ensemble
    image = torch.randn(windows, 4, *(sizes.roi,) * 3, device=dev)
    x = torch.randn(windows * n, 3, *(sizes.roi,) * 3, device=dev)
    t = torch.full((windows * n,), 999, device=dev, dtype=torch.long)
    amp = dev.type == "cuda"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        enc = time_steps(lambda: net.encode(image), dev, 2, 5)
        cond = net.encode(image).repeat(n)
        fwd = time_steps(lambda: net(x, t, cond), dev, 2, 5)
        maps = time_steps(lambda: net.forward_with_attention(x, t, cond), dev, 1, 3)
    return Row("extra", label, value=fwd.median, unit="ms", peak_gib=fwd.peak_bytes / GIB,
               settings=f"roi {sizes.roi}³, {windows} window(s) × N={n} = batch {windows * n}, no grad",
               note=f"encode({windows} window(s)) {enc.median:.1f} ms; forward_with_attention {maps.median:.1f} ms "
                    f"(peak {maps.peak_bytes / GIB:.2f} GiB)",
               samples=fwd.ms, extra={"encode_ms": enc.ms, "forward_with_attention_ms": maps.ms})


def _as_extra(row: Row) -> Row:
    row.item = "extra"
    return row


# --- main -------------------------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke sizes: 32³ crops, 16³ attention, a 64×64×48 volume, shrunk networks")
    p.add_argument("--out", type=Path, default=None, help="write results.json and results.md here (incrementally)")
    p.add_argument("--items", nargs="+", default=["train", "attention", "volume", "sweep", "extras"],
                   choices=("train", "attention", "volume", "sweep", "extras"))
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget; optional measurements are skipped when it runs short")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the torch.compile extra (default: on CUDA only; inductor takes minutes on 2 CPU cores)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every config, e.g. --set infer.sw_batch_size=2")
    p.add_argument("--sw-batch", type=int, default=None, help="sliding-window batch (default: infer.sw_batch_size)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads (--tiny defaults to 1: OpenMP threads competing with other "
                        "processes for 2 cores slow 3D convolutions down tenfold)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    threads = args.threads or (1 if args.tiny and args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(args.device)
    sizes = TINY if args.tiny else Sizes()
    full = dev.type == "cuda" and not args.tiny  # targets are judged only on full-size GPU runs
    budget = Budget(args.budget_s)
    report = Report(args.out, environment(dev, args.tiny))
    print(f"device {report.meta['device']}; torch {torch.__version__}; {report.meta['precision']}", flush=True)

    base = (TINY_SET if args.tiny else []) + args.overrides
    cfgs = {
        "diffusion": load_config(DIFFUSION_CFG, base),
        "diffusion_no_l0": load_config(DIFFUSION_CFG, base + ["model.denoiser.linear_attention_levels=[1]"]),
        "full_resolution": load_config(FULL_RES_CFG, base + (TINY_FULL_RES if args.tiny else [])),
        "unet": load_config(UNET_CFG, base),
        "unet12m9": load_config(UNET_CFG, base + (TINY_12M9 if args.tiny else UNET_12M9)),
    }
    sizes.sw_batch = args.sw_batch or cfgs["diffusion"].infer.sw_batch_size
    report.meta["configs"] = {k: {"model": dataclasses.asdict(c.model), "diffusion": dataclasses.asdict(c.diffusion)}
                              for k, c in cfgs.items()}

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

    report.meta["seconds"] = round(budget.seconds - budget.left(), 1)
    report.save()
    print("\n" + report.markdown(), flush=True)
    failed = [r for r in report.rows if r.status == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
