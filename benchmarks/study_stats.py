"""The study's statistics and tables (``benchmarks.study``): seed-pooled per-case values, paired comparisons, markdown.

Rows are the study's per-case rows (one per label, seed, case and region; ``label`` is the variant, or the variant
under another condition: ``diffusion@K1N1``, ``diffusion+outline``). A metric is either per region (Dice: TC, WT,
ET, and ``mean`` = the case's mean of the three) or per case (AUROCs, attention scores, seconds: region ``case``).

**Pooling over seeds.** For each case, the metric is averaged over the training seeds (NaN ignored: e.g. an AUROC
undefined for one seed); the paired comparison of two labels is then made over cases on those seed means:
mean difference, BCa bootstrap 95 % CI over cases and two-sided Wilcoxon signed-rank p
(``evaluation.stats.paired_comparison``). The seeds are thus treated as repeated measurements of one case, and the
CI describes case-to-case variation of the seed-averaged difference; how much a single training run moves the
result is reported separately as the seed-to-seed spread: the sd over seeds of the per-seed mean over cases
(of a metric, or of the paired difference).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from medseg_diff.data.conventions import REGIONS
from medseg_diff.evaluation.stats import MEAN_REGION, PairedComparison, paired_comparison

CASE = "case"  # the region of a per-case metric
REGION_METRICS = ("dice",)
CASE_METRICS = ("uncertainty_auroc", "ece", "variance_auroc", "seconds")
CASE_PREFIXES = ("enrichment_", "pointing_")  # + the attention map's name
DICE_REGIONS = (*REGIONS, MEAN_REGION)

# table[(label, metric, region)][case][seed] = value
Table = dict[tuple[str, str, str], dict[str, dict[int, float]]]


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def build_table(rows: list[dict]) -> Table:
    """Per (label, metric, region): case -> seed -> value; Dice also for the per-case mean of the regions."""
    table: Table = defaultdict(lambda: defaultdict(dict))
    numeric = sorted({k for r in rows for k in r
                      if k in REGION_METRICS or k in CASE_METRICS or k.startswith(CASE_PREFIXES)})
    for r in rows:
        label, case, seed = str(r["model"]), str(r["case"]), int(r["seed"])
        for metric in numeric:
            if metric not in r:
                continue
            if metric in REGION_METRICS:
                table[(label, metric, str(r["region"]))][case][seed] = _float(r[metric])
            elif r["region"] == REGIONS[0]:  # a per-case value, repeated on every region's row
                table[(label, metric, CASE)][case][seed] = _float(r[metric])
    for (label, metric, region), cases in list(table.items()):
        if metric in REGION_METRICS and region == REGIONS[0]:
            for case, seeds in cases.items():
                for seed in seeds:
                    values = [table[(label, metric, r)][case].get(seed, math.nan) for r in REGIONS]
                    table[(label, metric, MEAN_REGION)][case][seed] = float(np.mean(values))
    return table


def pooled(table: Table, key: tuple[str, str, str]) -> dict[str, float]:
    """case -> the metric averaged over seeds (NaN ignored; NaN when every seed is NaN)."""
    out = {}
    for case, seeds in table.get(key, {}).items():
        values = np.array(list(seeds.values()), dtype=np.float64)
        out[case] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    return out


def per_seed_means(table: Table, key: tuple[str, str, str]) -> dict[int, float]:
    """seed -> mean over cases of the metric for that seed's model."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for seeds in table.get(key, {}).values():
        for seed, value in seeds.items():
            by_seed[seed].append(value)
    return {s: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for s, v in sorted(by_seed.items())}


def summary(table: Table, key: tuple[str, str, str]) -> dict:
    """``{"mean": mean over cases of the seed means, "seed_sd": sd over seeds of the case-mean, "seeds": n}``."""
    values = np.array(list(pooled(table, key).values()), dtype=np.float64)
    seeds = np.array(list(per_seed_means(table, key).values()), dtype=np.float64)
    finite = seeds[np.isfinite(seeds)]
    return {"mean": float(np.nanmean(values)) if np.isfinite(values).any() else math.nan,
            "seed_sd": float(np.std(finite, ddof=1)) if finite.size > 1 else math.nan, "seeds": int(seeds.size),
            "cases": int(np.isfinite(values).sum())}


@dataclass(frozen=True)
class Spec:
    """One comparison: ``a`` minus ``b``, each ``(label, metric)``, over ``regions``."""

    name: str
    a: tuple[str, str]
    b: tuple[str, str]
    regions: tuple[str, ...] = (MEAN_REGION,)


@dataclass
class Comparison:
    spec: Spec
    region: str
    result: PairedComparison  # over cases, on the seed means
    per_seed_diff: dict[int, float]  # seed -> mean over cases of a - b with that seed's models
    seed_sd: float


def compare(table: Table, spec: Spec, region: str, n_boot: int = 10000) -> Comparison:
    """The paired comparison of ``spec`` in ``region`` (see the module docstring for the pooling)."""
    key_a, key_b = (*spec.a, region), (*spec.b, region)
    a, b = pooled(table, key_a), pooled(table, key_b)
    cases = sorted(a.keys() & b.keys())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = paired_comparison(np.array([a[c] for c in cases]), np.array([b[c] for c in cases]), n_boot=n_boot,
                                   seed=0)
    ta, tb = table.get(key_a, {}), table.get(key_b, {})
    diffs: dict[int, list[float]] = defaultdict(list)
    for case in cases:
        for seed in ta[case].keys() & tb[case].keys():
            diffs[seed].append(ta[case][seed] - tb[case][seed])
    per_seed = {s: float(np.nanmean(d)) if np.isfinite(d).any() else math.nan for s, d in sorted(diffs.items())}
    finite = np.array([v for v in per_seed.values() if math.isfinite(v)])
    return Comparison(spec, region, result, per_seed, float(np.std(finite, ddof=1)) if finite.size > 1 else math.nan)


def comparison_json(c: Comparison) -> dict:
    return {"name": c.spec.name, "a": list(c.spec.a), "b": list(c.spec.b), "region": c.region,
            **asdict(c.result), "per_seed_diff": c.per_seed_diff, "seed_sd": c.seed_sd}


# --- markdown -----------------------------------------------------------------------------------------


def _num(x: float, fmt: str = ".3f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, fmt)


def mean_sd(s: dict, fmt: str = ".3f") -> str:
    if not math.isfinite(s["mean"]):
        return "–"
    return _num(s["mean"], fmt) + ("" if not math.isfinite(s["seed_sd"]) else f" ± {_num(s['seed_sd'], fmt)}")


def comparisons_markdown(comparisons: list[Comparison]) -> str:
    lines = ["| comparison (a − b) | metric | region | n | a | b | Δ [BCa 95 % CI] | Wilcoxon p "
             "| Δ per seed (sd) |", "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        r = c.result
        seeds = ", ".join(f"{v:+.3f}" for v in c.per_seed_diff.values())
        spread = f"{seeds} ({_num(c.seed_sd)})" if len(c.per_seed_diff) > 1 else seeds
        metric = c.spec.a[1] if c.spec.a[1] == c.spec.b[1] else f"{c.spec.a[1]} vs {c.spec.b[1]}"
        lines.append(f"| {c.spec.name} | {metric} | {c.region} | {r.n} | {_num(r.mean_a)} | {_num(r.mean_b)} | "
                     f"{_num(r.mean_diff, '+.3f')} [{_num(r.ci_low, '+.3f')}, {_num(r.ci_high, '+.3f')}] | "
                     f"{_num(r.wilcoxon_p, '.3g')} | {spread} |")
    return "\n".join(lines)


def variants_markdown(table, labels: list[str], runs: dict) -> tuple[str, dict]:
    """Per label: Dice per region (mean over cases of the seed means ± sd over seeds of the case-mean), AUROCs,
    attention scores, parameters, train and inference seconds."""
    metrics = sorted({m for (lab, m, _) in table if m.startswith(("enrichment_", "pointing_"))})
    head = ["label", "params", "train s", "s / case", *DICE_REGIONS, "entropy AUROC", "variance AUROC", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out = {}
    for label in labels:
        variant = label.split("@")[0].split("+")[0]
        mine = [r for (v, _), r in runs.items() if v == variant]
        s = {f"dice_{r}": summary(table, (label, "dice", r)) for r in DICE_REGIONS}
        s |= {m: summary(table, (label, m, CASE)) for m in ("uncertainty_auroc", "variance_auroc", "seconds", *metrics)}
        params = mine[0]["parameters"] if mine else math.nan
        train_s = float(np.nanmean([r["train_seconds"] for r in mine])) if mine else math.nan
        out[label] = {"parameters": params, "train_seconds_mean": train_s, **s}
        cells = [label, f"{params:,}" if mine else "–", f"{train_s:.0f}" if math.isfinite(train_s) else "–",
                 mean_sd(s["seconds"], ".2f"), *(mean_sd(s[f"dice_{r}"]) for r in DICE_REGIONS),
                 mean_sd(s["uncertainty_auroc"]), mean_sd(s["variance_auroc"]),
                 *(mean_sd(s[m], ".2f") for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), out
