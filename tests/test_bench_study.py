"""benchmarks/study.py: seed pooling and paired comparisons on made-up rows with known answers, the U-Net sized to
a parameter count, and which comparisons a set of variants yields. (The study itself: ``study.py --quick``.)"""

from __future__ import annotations


import numpy as np
import pytest

@pytest.fixture(scope="module")
def study():
    from benchmarks import study as module

    return module


def _rows(label: str, dice: dict[tuple[str, int], float], auroc: float = 0.8) -> list[dict]:
    """Rows of ``label``: Dice ``dice[(case, seed)]`` in every region (ET: 0), a per-case AUROC."""
    rows = []
    for (case, seed), value in dice.items():
        for region, v in (("TC", value), ("WT", value), ("ET", 0.0)):
            rows.append({"case": case, "model": label, "region": region, "seed": seed, "variant": label,
                         "dice": v, "uncertainty_auroc": auroc, "hd95_mm": 99.0})
    return rows


def test_seed_pooling_and_paired_comparison(study):
    from benchmarks.study_stats import CASE, Spec, build_table, compare, pooled, summary

    cases = [f"c{i}" for i in range(6)]
    a = {(c, s): 0.5 + 0.05 * i + 0.1 * s for i, c in enumerate(cases) for s in (0, 1)}  # seed 1: +0.1
    b = {(c, s): 0.5 + 0.05 * i - 0.02 * i * s for i, c in enumerate(cases) for s in (0, 1)}
    table = build_table(_rows("a", a) + _rows("b", b, auroc=0.7))
    # per case, mean over seeds; the "mean" region is the mean of TC, WT and ET
    assert pooled(table, ("a", "dice", "TC"))["c0"] == pytest.approx(0.55)
    assert pooled(table, ("a", "dice", "mean"))["c0"] == pytest.approx(2 * 0.55 / 3)
    assert ("a", "hd95_mm", CASE) not in table  # only the study's metrics
    s = summary(table, ("a", "dice", "TC"))
    assert s["mean"] == pytest.approx(0.5 + 0.05 * 2.5 + 0.05) and s["seed_sd"] == pytest.approx(0.1 / np.sqrt(2))
    c = compare(table, Spec("a vs b", ("a", "dice"), ("b", "dice")), "TC", n_boot=2000)
    diffs = [0.05 + 0.01 * i for i in range(6)]  # (0 + 0.1)/2 - (0 - 0.02 i)/2
    assert c.result.n == 6 and c.result.mean_diff == pytest.approx(np.mean(diffs))
    assert c.result.ci_low < c.result.mean_diff < c.result.ci_high
    assert c.per_seed_diff == pytest.approx({0: 0.0, 1: 0.1 + 0.02 * 2.5})
    auroc = compare(table, Spec("auroc", ("a", "uncertainty_auroc"), ("b", "uncertainty_auroc")), CASE, n_boot=100)
    assert auroc.result.mean_diff == pytest.approx(0.1) and auroc.result.ci_method == "degenerate"


def test_a_nan_seed_is_ignored_in_the_case_mean(study):
    from benchmarks.study_stats import build_table, pooled

    rows = _rows("a", {("c0", 0): 0.4, ("c0", 1): 0.6})
    rows[0]["uncertainty_auroc"] = float("nan")  # seed 0's TC row carries the per-case value
    table = build_table(rows)
    assert pooled(table, ("a", "uncertainty_auroc", "case"))["c0"] == pytest.approx(0.8)


def test_unet_equal_matches_a_parameter_count(study, tmp_path):
    from medseg_diff.config import load_config

    cfg = load_config(study.DEMO_CONFIG, ["model.kind=unet", f"experiment.output_dir={tmp_path}"])
    channels, count = study.equal_unet_channels(cfg, 963_899)
    assert abs(count / 963_899 - 1) < 0.02 and channels[0] > 16 and len(channels) == 4


def test_comparisons_need_both_labels(study):
    names = {s.name for s, _ in study.comparison_specs({"diffusion", "unet", "diffusion@K1N1"})}
    assert names == {"diffusion vs unet", "sampling refines: diffusion (config's K x N) vs K1xN1",
                     "uncertainty: diffusion member variance vs unet entropy"}
    full = study.comparison_specs({*study.VARIANTS, "diffusion@K1N1", "diffusion+outline"})
    assert len(full) == 2 * len(study.OTHERS) + 2 + 1 + 1 + 2


def test_quick_defaults_and_explicit_choices(study, tmp_path):
    quick = study._parse(["--out", str(tmp_path), "--quick"])
    assert (quick.train_cases, quick.held_out, quick.seeds, quick.variants) == (6, 2, [0], ["unet", "diffusion"])
    assert "train.epochs=1" in quick.overrides
    full = study._parse(["--out", str(tmp_path), "--variants", "unet", "--set", "train.epochs=2"])
    assert (full.train_cases, full.held_out, full.seeds) == (14, 24, [0, 1, 2]) and full.overrides == ["train.epochs=2"]
