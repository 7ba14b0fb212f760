"""Paired statistics and the summary artifacts built on them (tables, CSV, plots)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medseg_diff.data.conventions import REGIONS
from medseg_diff.evaluation.metrics import reliability_bins
from medseg_diff.evaluation.tables import (
    box_plots,
    calibration_plot,
    comparison_table,
    read_per_case_csv,
    summary_table,
    write_per_case_csv,
)
from medseg_diff.evaluation.stats import MEAN_REGION, UnmatchedCasesWarning, compare_models, paired_comparison


def shifted_pairs(n: int = 40, shift: float = 0.05, noise: float = 0.02, seed: int = 1):
    rng = np.random.default_rng(seed)
    b = rng.uniform(0.6, 0.9, n)
    return b + shift + rng.normal(0.0, noise, n), b


def model_rows(cases: list[str], model: str, dice: dict[str, float], hd95: float = 4.0) -> list[dict[str, object]]:
    return [
        {"case": c, "model": model, "region": r, "dice": dice[r], "hd95_mm": hd95 + i} for i, c in enumerate(cases)
        for r in REGIONS
    ]


# ---------------------------------------------------------------------------------------------- paired_comparison


def test_ci_contains_true_shift_and_p_is_small_for_a_consistent_shift() -> None:
    a, b = shifted_pairs()
    c = paired_comparison(a, b, n_boot=2000, seed=0)
    assert c.n == 40 and c.ci_method == "BCa"
    assert c.mean_diff == pytest.approx(float(np.mean(a - b)))
    assert c.mean_a == pytest.approx(a.mean()) and c.mean_b == pytest.approx(b.mean())
    assert c.ci_low < 0.05 < c.ci_high
    assert c.ci_low < c.mean_diff < c.ci_high
    assert c.wilcoxon_p < 1e-6


def test_p_is_large_for_pure_noise() -> None:
    a, b = shifted_pairs(shift=0.0, noise=0.05, seed=4)
    c = paired_comparison(a, b, n_boot=2000, seed=0)
    assert c.wilcoxon_p > 0.1
    assert c.ci_low < 0.0 < c.ci_high


def test_paired_comparison_is_deterministic_for_a_seed() -> None:
    a, b = shifted_pairs(n=25, noise=0.05)
    first = paired_comparison(a, b, n_boot=1000, seed=7)
    assert paired_comparison(a, b, n_boot=1000, seed=7) == first
    assert paired_comparison(a, b, n_boot=1000, seed=8).ci_low != first.ci_low


def test_degenerate_samples_do_not_crash() -> None:
    same = paired_comparison(np.ones(5), np.ones(5))
    assert (same.mean_diff, same.ci_low, same.ci_high, same.wilcoxon_p, same.wilcoxon_stat) == (0.0, 0.0, 0.0, 1.0, 0.0)
    assert "all differences zero" in same.note
    single = paired_comparison(np.array([0.8]), np.array([0.7]))
    assert single.n == 1 and single.mean_diff == pytest.approx(0.1)
    assert math.isnan(single.ci_low) and math.isnan(single.wilcoxon_p) and "fewer than 2" in single.note
    empty = paired_comparison(np.array([]), np.array([]))
    assert empty.n == 0 and math.isnan(empty.mean_diff)
    dropped = paired_comparison(np.array([0.8, np.nan, 0.9, 0.7]), np.array([0.7, 0.5, 0.8, 0.5]))
    assert dropped.n == 3 and "non-finite" in dropped.note
    with pytest.raises(ValueError, match="same length"):
        paired_comparison(np.ones(3), np.ones(4))


# ---------------------------------------------------------------------------------------------- compare_models


def test_compare_models_pairs_by_case_and_drops_unmatched() -> None:
    rows = model_rows(["c1", "c2", "c3", "c4"], "diffusion", {"TC": 0.8, "WT": 0.9, "ET": 0.7})
    rows += model_rows(["c2", "c3", "c4", "c5"], "unet", {"TC": 0.7, "WT": 0.85, "ET": 0.7})
    with pytest.warns(UnmatchedCasesWarning, match=r"only 'diffusion' has \['c1'\].*only 'unet' has \['c5'\]"):
        comps = compare_models(list(reversed(rows)), "diffusion", "unet", n_boot=500)
    assert list(comps) == [*REGIONS, MEAN_REGION]
    assert all(c.n == 3 for c in comps.values())
    assert comps["TC"].mean_diff == pytest.approx(0.1)
    assert comps["ET"].wilcoxon_p == 1.0
    assert comps[MEAN_REGION].mean_diff == pytest.approx((0.1 + 0.05 + 0.0) / 3)
    with pytest.warns(UnmatchedCasesWarning):
        hd = compare_models(rows, "diffusion", "unet", metric="hd95_mm", n_boot=500)
    # c2..c4 are the 2nd..4th diffusion cases (5, 6, 7 mm) and the 1st..3rd unet cases (4, 5, 6 mm)
    assert (hd["WT"].mean_a, hd["WT"].mean_b, hd["WT"].mean_diff) == pytest.approx((6.0, 5.0, 1.0))


def test_compare_models_rejects_unknown_model_and_duplicates() -> None:
    rows = model_rows(["c1", "c2"], "unet", {"TC": 0.7, "WT": 0.8, "ET": 0.6})
    with pytest.raises(ValueError, match="diffusion"):
        compare_models(rows, "diffusion", "unet")
    with pytest.raises(ValueError, match="duplicate"):
        compare_models(rows + rows[:1], "unet", "unet")


# ---------------------------------------------------------------------------------------------- artifacts


def two_model_rows() -> list[dict[str, object]]:
    rows = model_rows(["c1", "c2", "c3"], "diffusion", {"TC": 0.8, "WT": 0.9, "ET": 0.7})
    rows += model_rows(["c1", "c2", "c3"], "unet", {"TC": 0.6, "WT": 0.9, "ET": 0.6}, hd95=10.0)
    return rows


def test_summary_table_contains_means_sds_and_medians() -> None:
    table = summary_table(two_model_rows())
    lines = table.splitlines()
    assert lines[0].startswith("| model | region | n | Dice mean ± sd | Dice median | HD95 (mm) mean ± sd")
    # diffusion TC: Dice 0.8 everywhere; HD95 4, 5, 6 mm → 5.00 ± 1.00, median 5.00
    assert "| diffusion | TC | 3 | 0.800 ± 0.000 | 0.800 | 5.00 ± 1.00 | 5.00 |" in lines
    # unet mean of TC/WT/ET: Dice (0.6 + 0.9 + 0.6) / 3 = 0.7; HD95 11 mm median
    assert "| unet | mean | 3 | 0.700 ± 0.000 | 0.700 | 11.00 ± 1.00 | 11.00 |" in lines
    assert len(lines) == 2 + 2 * 4


def test_comparison_table_contains_difference_ci_and_p() -> None:
    a, b = shifted_pairs(n=30)
    rows = [{"case": f"c{i}", "model": "diffusion", "region": r, "dice": a[i]} for i in range(30) for r in REGIONS]
    rows += [{"case": f"c{i}", "model": "unet", "region": r, "dice": b[i]} for i in range(30) for r in REGIONS]
    comps = compare_models(rows, "diffusion", "unet", n_boot=1000)
    table = comparison_table(comps, "diffusion", "unet")
    c = comps["WT"]
    assert "| region | n | diffusion | unet | diffusion − unet | 95% CI | Wilcoxon p |" in table
    ci = f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]"
    expected = f"| WT | 30 | {c.mean_a:.4f} | {c.mean_b:.4f} | {c.mean_diff:+.4f} | {ci} | < 0.0001 |"
    assert expected in table
    assert "| mean | 30 |" in table


def test_per_case_csv_round_trip(tmp_path: Path) -> None:
    rows = two_model_rows()
    rows[0]["seconds"] = 1.25
    path = write_per_case_csv(rows, tmp_path / "out" / "per_case.csv")
    header = path.read_text(encoding="utf-8").splitlines()[0]
    assert header == "case,model,region,dice,hd95_mm,seconds"
    back = read_per_case_csv(path)
    assert len(back) == len(rows)
    assert back[0]["seconds"] == 1.25 and math.isnan(back[1]["seconds"])
    assert back[4]["dice"] == pytest.approx(rows[4]["dice"]) and back[4]["case"] == "c2"


def test_box_plot_and_calibration_plot_are_written(tmp_path: Path) -> None:
    path = box_plots(two_model_rows(), tmp_path / "box_dice.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    rng = np.random.default_rng(0)
    p = rng.random(5000)
    bins = {"diffusion": reliability_bins(p, rng.random(5000) < p)}
    cal = calibration_plot(bins, tmp_path / "calibration.png")
    assert cal.stat().st_size > 10_000
