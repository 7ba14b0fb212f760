"""Box plots keep empty-mask penalties apart and link paired cases; the reliability diagram says what it pools."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg_diff.data.conventions import REGIONS
from medseg_diff.evaluation.metrics import reliability_bins
from medseg_diff.evaluation.tables import (
    NEIGHBOURHOOD_POOLING,
    box_plot_figure,
    box_plots,
    calibration_figure,
    calibration_plot,
    penalised_cases,
)

DIAGONAL = 373.13  # HD95 when exactly one mask is empty: the 240x240x155 volume diagonal at 1 mm
# (model, case) whose ET prediction is empty while the reference is not
MISSED_ET = {("unet", "c1"), ("unet", "c4"), ("diffusion", "c4")}


def hd95_rows(cases=("c0", "c1", "c2", "c3", "c4", "c5"), models=("diffusion", "unet")) -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    rows = []
    for model in models:
        for case in cases:
            for region in REGIONS:
                missed = region == "ET" and (model, case) in MISSED_ET
                rows.append({"case": case, "model": model, "region": region, "dice": 0.0 if missed else 0.8,
                             "hd95_mm": DIAGONAL if missed else float(rng.uniform(2, 12)),
                             "pred_volume_ml": 0.0 if missed else 12.0, "gt_volume_ml": 10.0})
    return rows


def panels(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes}


def paired_lines(ax) -> int:
    return sum(1 for line in ax.get_lines() if line.get_gid() == "paired")


def penalty_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_gid() == "penalty-label"]


def test_penalties_are_spotted_from_the_volumes():
    found = penalised_cases(hd95_rows(), "hd95_mm")
    assert found[("unet", "ET")] == {"c1", "c4"} and found[("diffusion", "ET")] == {"c4"}
    assert found[("unet", "mean")] == {"c1", "c4"} and ("unet", "TC") not in found
    assert penalised_cases(hd95_rows(), "dice") == {}


def test_an_hd95_penalty_does_not_set_the_axis_and_is_counted_in_its_strip():
    axes = panels(box_plot_figure(hd95_rows(), metric="hd95_mm"))
    et = axes["ET"]
    assert et.get_ylim()[1] < 100 < DIAGONAL  # the axis covers the measured values (2-12 mm), not 373 mm
    assert penalty_labels(et) == ["empty-mask penalty (3 cases)"]
    assert any("373.1" in tick.get_text() and "penalty" in tick.get_text() for tick in et.get_yticklabels())
    assert penalty_labels(axes["mean of TC/WT/ET"]) == ["mean with an empty-mask penalty (3 cases)"]
    assert axes["mean of TC/WT/ET"].get_ylim()[1] < 100
    for region in ("TC", "WT"):  # no penalty: no strip
        assert penalty_labels(axes[region]) == []
        assert axes[region].get_ylim()[1] < 15


def test_each_paired_case_is_one_line_across_the_models():
    rows = [r for r in hd95_rows(cases=("c0", "c1", "c2", "c3", "c4", "c5", "c6"))
            if not (r["model"] == "unet" and r["case"] == "c6")]  # c6 scored by one model only: not paired
    axes = panels(box_plot_figure(rows, metric="hd95_mm"))
    for title, ax in axes.items():
        assert paired_lines(ax) == 6, title  # the penalised cases are paired too (their line goes to the strip)
    single = panels(box_plot_figure([r for r in rows if r["model"] == "unet"], metric="dice"))
    assert all(paired_lines(ax) == 0 for ax in single.values())


def test_lesion_wise_hd95_penalty_when_nothing_matched():
    rows = []
    for model in ("diffusion", "unet"):
        for case in ("c0", "c1", "c2"):
            for region in REGIONS:
                missed = (model, case, region) == ("unet", "c2", "ET")
                rows.append({"case": case, "model": model, "region": region,
                             "lesion_hd95_mm": 373.0 if missed else 3.0 + len(case),
                             "tp_lesions": 0 if missed else 1, "fp_lesions": 0, "fn_lesions": 1 if missed else 0})
    axes = panels(box_plot_figure(rows, metric="lesion_hd95_mm"))
    assert penalty_labels(axes["ET"]) == ["empty-mask penalty (1 case)"] and axes["ET"].get_ylim()[1] < 373


def test_box_plots_still_write_a_png(tmp_path: Path):
    path = box_plots(hd95_rows(), tmp_path / "box_hd95.png", metric="hd95_mm")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_reliability_diagram_names_what_it_pools(tmp_path: Path):
    rng = np.random.default_rng(0)
    p = rng.random(3000)
    bins = {"diffusion": reliability_bins(p, rng.random(3000) < p)}
    fig = calibration_figure(bins)
    texts = " ".join([fig.axes[0].get_title(), fig.get_suptitle()]).replace("\n", " ")
    for words in ("tumour neighbourhood", "all cases pooled", "TC, WT and ET probabilities",
                  "predicted ∪ reference whole tumour", "dilated by 3 voxels", "15 equal-width bins"):
        assert words in texts, words
    assert "n = 3 k" in fig.axes[0].get_legend().get_texts()[1].get_text()
    other = calibration_figure(bins, pooling="one case, whole volume")
    assert "one case, whole volume" in other.get_suptitle() and "neighbourhood" not in other.axes[0].get_title()
    assert calibration_plot(bins, tmp_path / "cal.png").read_bytes()[:4] == b"\x89PNG"
    assert NEIGHBOURHOOD_POOLING.startswith("All cases pooled")
