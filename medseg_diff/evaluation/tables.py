"""Evaluation artifacts: per-case CSV, markdown summary and comparison tables, box and calibration plots.

Rows are the flat per-case dicts of ``metrics.metric_rows`` (``case``, ``model``, ``region``, metric
columns). Tables add the pseudo-region ``"mean"`` (per-case mean over TC/WT/ET). Plots use matplotlib's
object API (``Figure``, Agg canvas), so no global backend is switched.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from medseg_diff.data.conventions import REGIONS
from medseg_diff.evaluation.lesionwise import LESION_COLUMNS
from medseg_diff.evaluation.metrics import CSV_COLUMNS, ReliabilityBins
from medseg_diff.evaluation.stats import MEAN_REGION, PairedComparison, mean_over_regions, values_by_case

Row = Mapping[str, object]

#: Display name and decimals of each metric column.
METRIC_FORMAT: dict[str, tuple[str, int]] = {
    "dice": ("Dice", 3),
    "hd95_mm": ("HD95 (mm)", 2),
    "sensitivity": ("Sensitivity", 3),
    "specificity": ("Specificity", 4),
    "volume_error_ml": ("Volume error (mL)", 2),
    "abs_volume_error_ml": ("|Volume error| (mL)", 2),
    "pred_volume_ml": ("Predicted volume (mL)", 2),
    "gt_volume_ml": ("Reference volume (mL)", 2),
    "lesion_dice": ("Lesion-wise Dice", 3),
    "lesion_hd95_mm": ("Lesion-wise HD95 (mm)", 2),
    "lesion_nsd": ("Lesion-wise NSD", 3),
    "lesion_f1": ("Lesion detection F1", 3),
    "seconds": ("Inference (s)", 2),
    "peak_memory_mb": ("Peak memory (MB)", 0),
}
#: Column order of per_case.csv: the global metrics, the lesion-wise ones, uncertainty, cost.
COLUMN_ORDER: tuple[str, ...] = (*CSV_COLUMNS, *LESION_COLUMNS, "uncertainty_auroc", "ece", "seconds", "peak_memory_mb")
#: Columns of the per-case CSV that hold text, not numbers.
TEXT_COLUMNS: tuple[str, ...] = ("case", "model", "region")
#: Regions of tables and plots: TC, WT, ET, then the per-case mean of the three.
TABLE_REGIONS: tuple[str, ...] = (*REGIONS, MEAN_REGION)


def metric_values(rows: Iterable[Row], metric: str) -> dict[tuple[str, str], dict[str, float]]:
    """``{(model, region): {case: value}}`` for every model of ``rows``, regions TC, WT, ET and ``"mean"``."""
    table = values_by_case(rows, metric)
    for model in _models(table):
        if all((model, r) in table for r in REGIONS):
            table[(model, MEAN_REGION)] = mean_over_regions(table, model, REGIONS)
    return table


def summary_table(rows: Sequence[Row], metrics: Sequence[str] = ("dice", "hd95_mm")) -> str:
    """Markdown table: per model and region, n cases and mean ± sd (sample sd) and median of each metric.

    Non-finite values are left out of the statistics; ``n`` counts the cases of the first metric.
    """
    tables = {m: metric_values(rows, m) for m in metrics}
    first = tables[metrics[0]]
    header = ["model", "region", "n"]
    for m in metrics:
        name = _metric_name(m)
        header += [f"{name} mean ± sd", f"{name} median"]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for model in _models(first):
        for region in TABLE_REGIONS:
            if (model, region) not in first:
                continue
            cells = [model, region, str(len(first[(model, region)]))]
            for m in metrics:
                values = _finite(tables[m].get((model, region), {}).values())
                cells += [_mean_sd(values, _decimals(m)), _fmt(_median(values), _decimals(m))]
            lines.append(_md_row(cells))
    return "\n".join(lines) + "\n"


def comparison_table(
    comparisons: Mapping[str, PairedComparison], model_a: str = "A", model_b: str = "B", metric: str = "dice"
) -> str:
    """Markdown table of ``compare_models`` output: n, both means, mean difference (A − B), CI, Wilcoxon p."""
    d = _decimals(metric) + 1
    level = next(iter(comparisons.values())).ci_level if comparisons else 0.95
    header = ["region", "n", model_a, model_b, f"{model_a} − {model_b}", f"{level * 100:g}% CI", "Wilcoxon p"]
    with_notes = any(c.note for c in comparisons.values())
    if with_notes:
        header.append("note")
    lines = [f"{_metric_name(metric)}: paired comparison, {model_a} vs {model_b}", "", _md_row(header)]
    lines.append(_md_row(["---"] * len(header)))
    for region, c in comparisons.items():
        cells = [region, str(c.n), _fmt(c.mean_a, d), _fmt(c.mean_b, d), _fmt(c.mean_diff, d, signed=True)]
        cells += [f"[{_fmt(c.ci_low, d, signed=True)}, {_fmt(c.ci_high, d, signed=True)}]", format_p(c.wilcoxon_p)]
        if with_notes:
            cells.append(c.note)
        lines.append(_md_row(cells))
    return "\n".join(lines) + "\n"


def format_p(p: float) -> str:
    """A p-value for tables: ``n/a`` for NaN, ``< 0.0001`` below that, else 4 decimals."""
    if not math.isfinite(p):
        return "n/a"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def write_per_case_csv(rows: Sequence[Row], path: str | Path) -> Path:
    """Write rows to ``path`` in the fixed column order ``COLUMN_ORDER`` (whatever the order of the models), then any
    other columns in first-seen order; missing cells empty.

    Written to a temporary file and renamed, so a crash never leaves a half-written CSV.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [c for c in COLUMN_ORDER if any(c in r for r in rows)]
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def read_per_case_csv(path: str | Path) -> list[dict[str, object]]:
    """Rows of a per-case CSV; TEXT_COLUMNS stay strings, other cells become floats (empty → NaN)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return [
            {k: v if k in TEXT_COLUMNS else (float(v) if v.strip() else math.nan) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def box_plots(
    rows: Sequence[Row], path_png: str | Path, metric: str = "dice", regions: Sequence[str] = TABLE_REGIONS
) -> Path:
    """PNG with one panel per region, one box per model, each case drawn as a jittered point."""
    table = metric_values(rows, metric)
    models = _models(table)
    regions = [r for r in regions if any((m, r) in table for m in models)]
    fig = Figure(figsize=(3.2 * max(len(regions), 1) + 0.8, 4.2), layout="constrained")
    axes = fig.subplots(1, max(len(regions), 1), squeeze=False)[0]
    jitter = np.random.default_rng(0)
    for ax, region in zip(axes, regions):
        data = [_finite(table.get((m, region), {}).values()) for m in models]
        positions = np.arange(1, len(models) + 1)
        ax.boxplot(data, positions=positions, widths=0.5, showfliers=False, medianprops={"color": "black"})
        for pos, values in zip(positions, data):
            x = pos + jitter.uniform(-0.12, 0.12, size=len(values))
            ax.scatter(x, values, s=12, alpha=0.6, zorder=3)
        ax.set_xticks(positions, labels=models, rotation=20 if len(models) > 2 else 0)
        ax.set_title(region if region != MEAN_REGION else "mean of TC/WT/ET")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(_metric_name(metric))
    fig.suptitle(f"{_metric_name(metric)} per case")
    return _save(fig, path_png)


def calibration_plot(bins: Mapping[str, ReliabilityBins], path_png: str | Path) -> Path:
    """Reliability diagram (observed frequency vs mean probability per bin) per model, with the voxel
    count per bin below on a log scale; ``bins`` maps a label (model) to its ReliabilityBins."""
    fig = Figure(figsize=(5.0, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for label, b in bins.items():
        filled = b.counts > 0
        top.plot(b.mean_prob[filled], b.frequency[filled], marker="o", label=f"{label} (ECE {b.ece:.3f})")
        centres = (b.edges[:-1] + b.edges[1:]) / 2
        bottom.step(centres, np.where(b.counts > 0, b.counts, np.nan), where="mid", label=label)
    top.set(ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title="Reliability diagram")
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    bottom.set(xlabel="predicted probability", ylabel="voxels", yscale="log")
    return _save(fig, path_png)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _models(table: Mapping[tuple[str, str], object]) -> list[str]:
    """Model names of a ``values_by_case`` table in first-seen order."""
    return list(dict.fromkeys(model for model, _ in table))


def _metric_name(metric: str) -> str:
    return METRIC_FORMAT.get(metric, (metric, 3))[0]


def _decimals(metric: str) -> int:
    return METRIC_FORMAT.get(metric, (metric, 3))[1]


def _finite(values: Iterable[float]) -> np.ndarray:
    """Finite values as a float array [k]."""
    arr = np.fromiter(values, dtype=np.float64)
    return arr[np.isfinite(arr)]


def _median(values: np.ndarray) -> float:
    return float(np.median(values)) if values.size else math.nan


def _mean_sd(values: np.ndarray, decimals: int) -> str:
    """``mean ± sd`` with sample sd (ddof 1); sd is ``n/a`` for fewer than 2 values."""
    if values.size == 0:
        return "n/a"
    sd = float(np.std(values, ddof=1)) if values.size > 1 else math.nan
    return f"{_fmt(float(values.mean()), decimals)} ± {_fmt(sd, decimals)}"


def _fmt(value: float, decimals: int, signed: bool = False) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _save(fig: Figure, path_png: str | Path) -> Path:
    """Save ``fig`` as PNG (parent folders created) and return the path."""
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
