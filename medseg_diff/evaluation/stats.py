"""Paired statistics for comparing two models on the same cases.

Conventions (the README repeats them):

* Differences are ``a − b`` (model A minus model B), per case; pairs with a non-finite value are dropped.
* CI: bootstrap of the mean paired difference, ``n_boot`` resamples of the cases, bias-corrected and
  accelerated (BCa, ``scipy.stats.bootstrap``) with a NumPy generator seeded by ``seed``; falls back to the
  percentile method if BCa is undefined. All differences equal → the CI is that value (no resampling);
  fewer than 2 pairs → NaN.
* Test: Wilcoxon signed-rank, two-sided, ``zero_method="wilcox"`` (zero differences are dropped before
  ranking, Wilcoxon's original treatment); the statistic is scipy's (the smaller signed-rank sum).
  All differences zero → p = 1.0, statistic 0.0 (no evidence of a difference), with a note; fewer than
  2 pairs → NaN, with a note.
* ``compare_models`` pairs rows by case id (sorted, so the result does not depend on row order), drops
  cases that only one model has with an ``UnmatchedCasesWarning`` naming them, and adds the pseudo-region
  ``"mean"``: the per-case mean over TC/WT/ET (only cases with all three regions).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap, wilcoxon

from medseg_diff.data.conventions import REGIONS

#: Key of the pseudo-region "mean of TC/WT/ET per case".
MEAN_REGION = "mean"


class UnmatchedCasesWarning(UserWarning):
    """Some cases were evaluated for only one of the two models and were left out of the comparison."""


@dataclass(frozen=True)
class PairedComparison:
    """Paired comparison of per-case values ``a`` and ``b`` (difference = a − b)."""

    n: int  # pairs used
    mean_a: float
    mean_b: float
    mean_diff: float  # mean(a − b)
    ci_low: float  # bootstrap CI of mean_diff
    ci_high: float
    wilcoxon_p: float  # two-sided
    wilcoxon_stat: float
    ci_level: float = 0.95
    ci_method: str = "BCa"  # BCa | percentile | degenerate (all differences equal) | none
    note: str = ""  # why a value is NaN / conventional, or which pairs were dropped


def paired_comparison(
    a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0, ci: float = 0.95
) -> PairedComparison:
    """Mean paired difference of ``a`` [n] and ``b`` [n] with a bootstrap CI and a Wilcoxon signed-rank p.

    Deterministic for a given ``seed``. Never raises for small or degenerate samples (see module docstring).
    """
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    notes: list[str] = []
    finite = np.isfinite(a) & np.isfinite(b)
    if not finite.all():
        notes.append(f"dropped {int((~finite).sum())} pair(s) with a non-finite value")
        a, b = a[finite], b[finite]
    n = int(a.size)
    if n == 0:
        notes.append("no pairs")
        nan = float("nan")
        return PairedComparison(0, nan, nan, nan, nan, nan, nan, nan, ci, "none", "; ".join(notes))
    diff = a - b
    ci_low, ci_high, method, ci_note = _bootstrap_mean_ci(diff, n_boot, seed, ci)
    stat, p, test_note = _wilcoxon(diff)
    notes += [x for x in (ci_note, test_note) if x]
    return PairedComparison(
        n=n,
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        mean_diff=float(diff.mean()),
        ci_low=ci_low,
        ci_high=ci_high,
        wilcoxon_p=p,
        wilcoxon_stat=stat,
        ci_level=ci,
        ci_method=method,
        note="; ".join(notes),
    )


def compare_models(
    rows: Iterable[Mapping[str, object]],
    model_a: str,
    model_b: str,
    metric: str = "dice",
    regions: Sequence[str] = REGIONS,
    n_boot: int = 10000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, PairedComparison]:
    """``paired_comparison`` of ``metric`` between two models, per region and for ``"mean"``.

    ``rows`` are per-case rows (``case``, ``model``, ``region``, metric columns; values may be strings,
    as read from CSV). Returns ``{region: PairedComparison}`` for each of ``regions`` then ``"mean"``.
    Raises ValueError if a model has no rows or a (case, model, region) appears twice.
    """
    table = values_by_case(rows, metric)
    for model in (model_a, model_b):
        if not any(key[0] == model for key in table):
            known = sorted({key[0] for key in table})
            raise ValueError(f"no '{metric}' rows for model '{model}'; models present: {known}")
    per_region = {r: (table.get((model_a, r), {}), table.get((model_b, r), {})) for r in regions}
    per_region[MEAN_REGION] = (
        mean_over_regions(table, model_a, regions),
        mean_over_regions(table, model_b, regions),
    )
    _warn_unmatched(per_region, model_a, model_b)
    out: dict[str, PairedComparison] = {}
    for region, (values_a, values_b) in per_region.items():
        cases = sorted(values_a.keys() & values_b.keys())
        a = np.array([values_a[c] for c in cases], dtype=np.float64)
        b = np.array([values_b[c] for c in cases], dtype=np.float64)
        out[region] = paired_comparison(a, b, n_boot=n_boot, seed=seed, ci=ci)
    return out


def values_by_case(rows: Iterable[Mapping[str, object]], metric: str) -> dict[tuple[str, str], dict[str, float]]:
    """``{(model, region): {case: float(row[metric])}}``; empty strings become NaN; duplicates raise."""
    table: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        if metric not in row:
            raise ValueError(f"row {dict(row)} has no column '{metric}'")
        key = (str(row["model"]), str(row["region"]))
        case = str(row["case"])
        per_case = table.setdefault(key, {})
        if case in per_case:
            raise ValueError(f"duplicate row for case '{case}', model '{key[0]}', region '{key[1]}'")
        per_case[case] = _to_float(row[metric])
    return table


def mean_over_regions(
    table: Mapping[tuple[str, str], Mapping[str, float]], model: str, regions: Sequence[str] = REGIONS
) -> dict[str, float]:
    """``{case: mean over regions}`` of a ``values_by_case`` table, for the cases of ``model`` that have
    every region (the ``"mean"`` pseudo-region)."""
    per_region = [table.get((model, r), {}) for r in regions]
    cases = set.intersection(*(set(v) for v in per_region)) if per_region else set()
    return {c: float(np.mean([v[c] for v in per_region])) for c in cases}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _bootstrap_mean_ci(diff: np.ndarray, n_boot: int, seed: int, ci: float) -> tuple[float, float, str, str]:
    """(low, high, method, note) of the bootstrap CI of mean(diff) [n]."""
    if diff.size < 2:
        return math.nan, math.nan, "none", "fewer than 2 pairs: no CI"
    if np.all(diff == diff[0]):
        value = float(diff[0])
        return value, value, "degenerate", "all differences equal: CI collapses to that value"
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():  # BCa failing is handled by the percentile fallback below
            warnings.simplefilter("ignore", DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            res = bootstrap(
                (diff,),
                np.mean,
                n_resamples=n_boot,
                batch=max(1, min(n_boot, 2_000_000 // diff.size)),  # bounds memory to ~16 MB per batch
                vectorized=True,
                confidence_level=ci,
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            note = "" if method == "BCa" else "BCa undefined: percentile bootstrap CI"
            return low, high, method, note
    return math.nan, math.nan, "none", "bootstrap CI undefined"


def _wilcoxon(diff: np.ndarray) -> tuple[float, float, str]:
    """(statistic, two-sided p, note) of the Wilcoxon signed-rank test of diff [n] (zero_method='wilcox')."""
    if diff.size < 2:
        return math.nan, math.nan, "fewer than 2 pairs: no Wilcoxon test"
    if not np.any(diff != 0):
        return 0.0, 1.0, "all differences zero: Wilcoxon p set to 1.0"
    res = wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), float(res.pvalue), ""


def _warn_unmatched(
    per_region: Mapping[str, tuple[Mapping[str, float], Mapping[str, float]]], model_a: str, model_b: str
) -> None:
    """One UnmatchedCasesWarning naming the cases that only one model has (any region)."""
    only_a: set[str] = set()
    only_b: set[str] = set()
    for values_a, values_b in per_region.values():
        only_a |= values_a.keys() - values_b.keys()
        only_b |= values_b.keys() - values_a.keys()
    if not (only_a or only_b):
        return
    parts = []
    if only_a:
        parts.append(f"only '{model_a}' has {sorted(only_a)}")
    if only_b:
        parts.append(f"only '{model_b}' has {sorted(only_b)}")
    warnings.warn(
        f"unmatched cases dropped from the paired comparison: {'; '.join(parts)}", UnmatchedCasesWarning, stacklevel=3
    )


def _to_float(value: object) -> float:
    """A metric cell as float; ``None`` and empty strings are NaN."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    return float(value)  # type: ignore[arg-type]
