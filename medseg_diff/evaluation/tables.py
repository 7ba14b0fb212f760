"""Evaluation artifacts: per-case CSV, markdown summary and comparison tables, box and calibration plots.

Rows are the flat per-case dicts of ``metrics.metric_rows`` (``case``, ``model``, ``region``, metric
columns). Tables add the pseudo-region ``"mean"`` (per-case mean over TC/WT/ET). Plots use matplotlib's
object API (``Figure``, Agg canvas), so no global backend is switched; ``box_plot_figure`` and
``calibration_figure`` return the figures that ``box_plots`` and ``calibration_plot`` save. In the box plots,
empty-mask penalties (HD95 = the volume diagonal when exactly one mask is empty; lesion-wise HD95 = 373 mm when
nothing matched) are shown apart from the measured values, and each case's points are joined across models.
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
    "lesion_dice_penalized": ("Lesion-wise Dice, penalised", 3),
    "lesion_hd95_penalized_mm": ("Lesion-wise HD95 (mm), penalised", 2),
    "lesion_dice": ("Lesion-wise Dice, matched pairs (unpenalised)", 3),
    "lesion_hd95_mm": ("Lesion-wise HD95 (mm), matched pairs (unpenalised)", 2),
    "lesion_nsd": ("Lesion-wise NSD, matched pairs (unpenalised)", 3),
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


#: How ``evaluation.run`` pools the voxels of its reliability diagram (``uncertainty_quality`` + ``pooled_bins``).
NEIGHBOURHOOD_POOLING = (
    "All cases pooled: the TC, WT and ET probabilities of every voxel in each case's tumour neighbourhood "
    "(predicted ∪ reference whole tumour, dilated by 3 voxels, 6-connected), 15 equal-width bins"
)


def _hd95_penalised(row: Row) -> bool:
    """Global HD95: exactly one of prediction and reference empty → the volume diagonal (``metrics``)."""
    pred, ref = row.get("pred_volume_ml"), row.get("gt_volume_ml")
    if pred is None or ref is None or not (_is_number(pred) and _is_number(ref)):
        return False
    return (float(pred) == 0.0) != (float(ref) == 0.0)


def _lesion_hd95_penalised(row: Row) -> bool:
    """Lesion-wise HD95: no lesion matched but some lesion in either mask → 373 mm (``lesionwise``)."""
    tp, fp, fn = (row.get(k) for k in ("tp_lesions", "fp_lesions", "fn_lesions"))
    if not all(_is_number(v) for v in (tp, fp, fn)):
        return False
    return float(tp) == 0.0 and float(fp) + float(fn) > 0.0


#: Metrics whose value is a fixed penalty in some cases, and the rule that spots those rows.
PENALTY_RULES = {"hd95_mm": _hd95_penalised, "lesion_hd95_mm": _lesion_hd95_penalised}


def penalised_cases(rows: Iterable[Row], metric: str) -> dict[tuple[str, str], set[str]]:
    """``{(model, region): {case, ...}}`` whose ``metric`` value is an empty-mask penalty, not a measurement
    (global HD95: exactly one mask empty; lesion-wise HD95: nothing matched). The ``"mean"`` region holds the
    cases with a penalty in any of TC/WT/ET. Empty for metrics without a penalty (Dice, ...)."""
    rule = PENALTY_RULES.get(metric)
    out: dict[tuple[str, str], set[str]] = {}
    if rule is None:
        return out
    for row in rows:
        if rule(row):
            model, region, case = str(row["model"]), str(row["region"]), str(row["case"])
            out.setdefault((model, region), set()).add(case)
            if region in REGIONS:
                out.setdefault((model, MEAN_REGION), set()).add(case)
    return out


def box_plot_figure(rows: Sequence[Row], metric: str = "dice", regions: Sequence[str] = TABLE_REGIONS) -> Figure:
    """The figure of :func:`box_plots`: one panel per region, one box per model, every case a jittered point, and
    a grey line joining each case's points across the models (``gid="paired"``, one per case that every model
    scored).

    Empty-mask penalties (:func:`penalised_cases`, e.g. HD95 = the 373 mm volume diagonal when one mask is empty)
    are not measurements: they are drawn as crosses in a strip above the axis, labelled "empty-mask penalty
    (N cases)", and the axis and the boxes cover the measured values only, so one penalty does not squash a panel.
    """
    table = metric_values(rows, metric)
    penalties = penalised_cases(rows, metric)
    models = _models(table)
    regions = [r for r in regions if any((m, r) in table for m in models)]
    fig = Figure(figsize=(3.2 * max(len(regions), 1) + 0.8, 4.4), layout="constrained")
    axes = fig.subplots(1, max(len(regions), 1), squeeze=False)[0]
    jitter = np.random.default_rng(0)
    for ax, region in zip(axes, regions):
        positions = np.arange(1, len(models) + 1)
        per_model = [{c: v for c, v in table.get((m, region), {}).items() if math.isfinite(v)} for m in models]
        penalised = [penalties.get((m, region), set()) & set(values) for m, values in zip(models, per_model)]
        measured = [np.array([v for c, v in values.items() if c not in pen])
                    for values, pen in zip(per_model, penalised)]
        every = np.concatenate(measured) if any(v.size for v in measured) else np.zeros(0)
        lo, hi = (float(every.min()), float(every.max())) if every.size else (0.0, 1.0)
        span = (hi - lo) or max(abs(hi), 1.0) * 0.1
        strip = hi + 0.16 * span  # display height of the penalty strip (not a value on the axis)
        ax.boxplot([v if v.size else [np.nan] for v in measured], positions=positions, widths=0.5, showfliers=False,
                   medianprops={"color": "black"})
        xy: dict[str, list[tuple[float, float]]] = {}
        for pos, values, pen in zip(positions, per_model, penalised):
            cases = sorted(values)
            x = pos + jitter.uniform(-0.12, 0.12, size=len(cases))
            y = np.array([strip if c in pen else values[c] for c in cases])
            is_pen = np.array([c in pen for c in cases], dtype=bool)
            ax.scatter(x[~is_pen], y[~is_pen], s=12, alpha=0.7, zorder=3)
            if is_pen.any():
                ax.scatter(x[is_pen], y[is_pen], s=28, marker="x", color="#b00020", zorder=3)
            for c, xc, yc in zip(cases, x, y):
                xy.setdefault(c, []).append((xc, yc))
        for case, points in xy.items():
            if len(points) == len(models) > 1:  # scored by every model: a paired case
                ax.plot(*zip(*points), color="grey", alpha=0.35, lw=0.7, zorder=2, gid="paired")
        n_pen = sum(len(p) for p in penalised)
        bottom = lo - 0.06 * span
        if n_pen:
            values = sorted({round(v, 1) for m, values, pen in zip(models, per_model, penalised)
                             for c, v in values.items() if c in pen})
            what = "mean with an empty-mask penalty" if region == MEAN_REGION else "empty-mask penalty"
            line = hi + 0.08 * span
            ax.axhline(line, color="#b00020", lw=0.6, ls="--")
            ax.set_ylim(bottom, strip + 0.1 * span)  # the penalty values are above this limit
            ticks = [t for t in ax.get_yticks() if bottom <= t <= line]
            shown = values[0] if len(values) == 1 else f"{values[0]}–{values[-1]}"
            ax.set_yticks([*ticks, strip], labels=[*(f"{t:g}" for t in ticks), f"{shown}\n(penalty)"])
            ax.text(0.5, 0.985, f"{what} ({n_pen} case{'s' if n_pen != 1 else ''})", transform=ax.transAxes,
                    ha="center", va="top", fontsize="x-small", color="#b00020", gid="penalty-label")
        elif every.size:
            ax.set_ylim(bottom, hi + 0.06 * span)
        ax.set_xticks(positions, labels=models, rotation=20 if len(models) > 2 else 0)
        ax.set_title(region if region != MEAN_REGION else "mean of TC/WT/ET")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(_metric_name(metric))
    notes = (["boxes and axis: measured values only"] if any(penalties.get((m, r)) for m in models for r in regions)
             else []) + (["grey lines join a case's models"] if len(models) > 1 else [])
    fig.suptitle(f"{_metric_name(metric)} per case" + (f" ({'; '.join(notes)})" if notes else ""))
    return fig


def box_plots(
    rows: Sequence[Row], path_png: str | Path, metric: str = "dice", regions: Sequence[str] = TABLE_REGIONS
) -> Path:
    """PNG of :func:`box_plot_figure`: per region, one box per model, each case a jittered point, paired cases
    joined across models, empty-mask penalties in a labelled strip above the axis."""
    return _save(box_plot_figure(rows, metric, regions), path_png)


def calibration_figure(bins: Mapping[str, ReliabilityBins], pooling: str = NEIGHBOURHOOD_POOLING) -> Figure:
    """The figure of :func:`calibration_plot`. ``pooling`` says which voxels the bins hold; it is printed under the
    title (the default is how ``evaluation.run`` pools them)."""
    fig = Figure(figsize=(5.2, 6.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for label, b in bins.items():
        filled = b.counts > 0
        n = int(b.counts.sum())
        top.plot(b.mean_prob[filled], b.frequency[filled], marker="o",
                 label=f"{label} (ECE {b.ece:.3f}, n = {_count(n)})")
        centres = (b.edges[:-1] + b.edges[1:]) / 2
        bottom.step(centres, np.where(b.counts > 0, b.counts, np.nan), where="mid", label=label)
    top.set(ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
    top.set_title("Reliability diagram\ntumour neighbourhood, all cases pooled"
                  if pooling == NEIGHBOURHOOD_POOLING else "Reliability diagram")
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    bottom.set(xlabel="predicted probability", ylabel="probabilities per bin", yscale="log")
    fig.suptitle(_wrap(pooling, 70), fontsize="x-small", y=0.0, va="bottom")
    fig.get_layout_engine().set(rect=(0, 0.07, 1, 0.93))
    return fig


def calibration_plot(bins: Mapping[str, ReliabilityBins], path_png: str | Path,
                     pooling: str = NEIGHBOURHOOD_POOLING) -> Path:
    """Reliability diagram (observed frequency vs mean probability per bin) per model, with the count per bin
    below on a log scale; ``bins`` maps a label (model) to its ReliabilityBins; ``pooling`` (printed on the figure)
    says which voxels they hold -- by default ``evaluation.run``'s: :data:`NEIGHBOURHOOD_POOLING`."""
    return _save(calibration_figure(bins, pooling), path_png)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _count(n: int) -> str:
    """``1234567 -> "1.23 M"``: a count for a legend."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


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
