"""Quality ablations on the synthetic phantoms: resolution s, K steps, N members, full resolution vs compact.

Every variant is trained with the demo's budget and recipe (``configs/demo_cpu.yaml``: the same data, loss,
optimiser, steps and seed as the U-Net), then each (variant, K, N) is scored on the held-out phantoms with the
same per-case Dice as ``medseg-diff evaluate`` (``evaluation.run.score_case`` on the original grid), and
compared with the U-Net and with the default variant by the same paired statistics (mean difference, BCa 95 %
bootstrap CI, Wilcoxon signed-rank p; ``evaluation.stats.compare_models``).

1. synthesise ``--cases`` phantoms at ``--spacing`` mm (30 % held out) unless ``OUT/data`` exists
2. train each variant into ``OUT/runs/NAME`` (a finished run of the same config is reused; a killed one resumes;
   ``harness.train_or_reuse``)
3. predict the held-out cases for each (variant, K, N), timing each case; per-case rows -> ``OUT/per_case.csv``
4. tables -> ``OUT/ablation.md`` (and ``.json``)

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.bench_ablation --out /tmp/ablation --samplers 5x2 10x4   # the README table, ~1 h
    .venv/bin/python -m benchmarks.bench_ablation --out /tmp/ablation --variants unet s4 --samplers 10x4
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import DEMO_CONFIG, phantom_manifest, run_config, scored_rows, train_or_reuse
from medseg_diff.config import load_config
from medseg_diff.data.conventions import REGIONS, get_convention
from medseg_diff.data.dataset import case_record
from medseg_diff.data.manifest import load_manifest
from medseg_diff.evaluation.run import select_cases
from medseg_diff.evaluation.stats import MEAN_REGION, compare_models
from medseg_diff.evaluation.tables import write_per_case_csv
from medseg_diff.inference.case import predict_case
from medseg_diff.inference.loading import load_model

CONFIG = DEMO_CONFIG
# name -> (--set overrides on configs/demo_cpu.yaml, what it is)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "unet": (["model.kind=unet"], "plain 3D U-Net (the baseline)"),
    "default": (["model.kind=diffusion"], "the demo's diffusion model: compact, s = 2, widths 8-16-32"),
    "shift8": (["model.kind=diffusion", "diffusion.snr_shift=8"], "as default, SNR shift 8 (= s³)"),
    "s4": (["model.kind=diffusion", "model.denoiser.patch_size=4"], "as default, s = 4"),
    "s4_shift64": (["model.kind=diffusion", "model.denoiser.patch_size=4", "diffusion.snr_shift=64"],
                   "as default, s = 4, SNR shift 64 (= s³)"),
    "s2_wide_shift8": (["model.kind=diffusion", "model.denoiser.channels=[16,32,64]", "diffusion.snr_shift=8"],
                       "as default, widths 16-32-64, SNR shift 8"),
    "s1": (["model.kind=diffusion", "model.denoiser.patch_size=1"], "as default, s = 1 (full resolution)"),
    "full_resolution": (
        ["model.kind=diffusion", "model.denoiser.patch_size=1", "model.denoiser.channels=[8,16,32,64]",
         "model.denoiser.encoder_factor=1", "model.denoiser.linear_attention_levels=[1,2]",
         "model.denoiser.cross_attention_levels=[3]"],
        "the full-resolution demo model before the compact design (s = 1, widths 8-64, encoder = denoiser widths)",
    ),
}  # fmt: skip


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--reference", default="default", help="the default variant, compared with every other")
    p.add_argument("--samplers", nargs="+", default=["demo"],
                   help="KxN sampler settings for every diffusion variant ('demo' = the config's own)")
    p.add_argument("--sweep", nargs="+", default=["1x1", "2x1", "4x1", "10x1", "1x4", "2x4", "4x4", "10x4"],
                   help="KxN settings measured for the reference variant only")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    return p.parse_args(argv)


def _data(out: Path, cases: int, spacing: float, seed: int) -> Path:
    return phantom_manifest(out / "data", cases, round(0.3 * cases), spacing, seed, name="synthetic-brats-ablation")


def _train(name: str, manifest: Path, out: Path, overrides: list[str]) -> tuple[Path, float]:
    run = train_or_reuse(run_config(manifest, out / "runs" / name, VARIANTS[name][0] + overrides, CONFIG))
    return run.checkpoint, run.seconds


def _sampler(text: str) -> tuple[int | None, int | None]:
    if text == "demo":
        return None, None
    k, n = text.lower().split("x")
    return int(k), int(n)


def _predict(label: str, ckpt: Path, manifest_path: Path, k: int | None, n: int | None) -> list[dict]:
    """Per-case rows for the held-out cases, scored as ``evaluate`` scores them (its own per-case helpers)."""
    manifest = load_manifest(manifest_path)
    conv = get_convention(manifest.convention)
    model = load_model(ckpt, "cpu", sample_steps=k, ensemble=n)
    rows = []
    for case in select_cases(manifest, "test"):
        rows += scored_rows(label, predict_case(model, case_record(manifest, case), conv), conv)
    return rows


def _label(name: str, k: int | None, n: int | None, cfg_k: int, cfg_n: int) -> str:
    return name if name == "unet" else f"{name} K{k or cfg_k} N{n or cfg_n}"


def _tables(rows: list[dict], labels: list[str], reference: str, train_s: dict[str, float]) -> tuple[str, dict]:
    """Markdown: mean Dice per region, seconds per case, and paired comparisons vs the U-Net and the reference."""
    lines = ["| variant | TC | WT | ET | mean | vs U-Net: Δ mean [95 % CI], p | vs default: Δ mean [95 % CI], p "
             "| uncertainty AUROC | s / case | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    out: dict = {}
    for label in labels:
        mine = [r for r in rows if r["model"] == label]
        dice = {reg: float(np.mean([float(r["dice"]) for r in mine if r["region"] == reg])) for reg in REGIONS}
        dice[MEAN_REGION] = float(np.mean(list(dice.values())))
        first = [r for r in mine if r["region"] == REGIONS[0]]
        seconds = float(np.mean([float(r["seconds"]) for r in first]))
        auroc = float(np.nanmean([float(r["uncertainty_auroc"]) for r in first]))
        cells, out[label] = [], {"dice": dice, "seconds_per_case": seconds, "uncertainty_auroc": auroc}
        for other in ("unet", reference):
            if other == label or not any(r["model"] == other for r in rows):
                cells.append("–")
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = compare_models(rows, label, other, metric="dice")[MEAN_REGION]
            out[label][f"vs_{other}"] = {"diff": c.mean_diff, "ci": [c.ci_low, c.ci_high], "p": c.wilcoxon_p,
                                         "n": c.n}
            cells.append(f"{c.mean_diff:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}], {c.wilcoxon_p:.3g}")
        base = label.split(" ")[0]
        lines.append(f"| {label} | " + " | ".join(f"{dice[r]:.3f}" for r in (*REGIONS, MEAN_REGION))
                     + f" | {cells[0]} | {cells[1]} | {auroc:.3f} | {seconds:.2f} | {train_s.get(base, float('nan')):.0f} |")
    return "\n".join(lines), out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = _data(args.out, args.cases, args.spacing, args.seed)
    cfg = load_config(CONFIG)
    cfg_k, cfg_n = cfg.diffusion.sample_steps, cfg.diffusion.ensemble
    checkpoints, train_s = {}, {}
    for name in args.variants:
        checkpoints[name], train_s[name] = _train(name, manifest, args.out, args.overrides)
        print(f"trained {name} in {train_s[name]:.0f} s", flush=True)
    jobs: list[tuple[str, int | None, int | None]] = []
    for name in args.variants:
        settings = [(None, None)] if name == "unet" else [_sampler(s) for s in args.samplers]
        if name == args.reference:
            settings += [_sampler(s) for s in args.sweep]
        for k, n in settings:
            if (name, k or cfg_k, n or cfg_n) not in [(j[0], j[1] or cfg_k, j[2] or cfg_n) for j in jobs]:
                jobs.append((name, k, n))
    rows, labels = [], []
    for name, k, n in jobs:
        label = _label(name, k, n, cfg_k, cfg_n)
        rows += _predict(label, checkpoints[name], manifest, k, n)
        labels.append(label)
        print(f"evaluated {label}", flush=True)
    write_per_case_csv(rows, args.out / "per_case.csv")
    reference = _label(args.reference, None, None, cfg_k, cfg_n)
    table, summary = _tables(rows, labels, reference, train_s)
    header = (f"Held-out phantoms: {len({r['case'] for r in rows})} ({args.cases} synthesised at {args.spacing} mm, "
              f"seed {args.seed}); budget and recipe of configs/demo_cpu.yaml; default = {reference}.\n"
              + "\n".join(f"- {n}: {VARIANTS[n][1]}" for n in args.variants))
    (args.out / "ablation.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    (args.out / "ablation.json").write_text(json.dumps({"variants": summary, "train_seconds": train_s}, indent=2),
                                            encoding="utf-8")
    print(header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
