"""One row per audit question: what was measured, the target, and a plain-language verdict.

Targets: each part of the diffusion model must do its job (the thresholds below, as README's audit table lists
them). ``met`` is True / False,
or None where the question does not apply or nothing was compared.
"""

from __future__ import annotations

import math

#: "clearly above": how far the true mask's Dice must be above the inverted mask's for "uses x_t".
XT_MARGIN = 0.10
XT_TARGET = 0.95
REFINE_TARGET = 0.01
VARIANCE_TARGET = 1e-3
AUROC_TARGET = 0.02
PRIOR_TARGET = 0.05
KNOCKOUT_TARGET = 0.01
ENRICHMENT_TARGET = 3.0
POINTING_TARGET = 0.9
FAITHFUL_TARGET = 2.0
UNIFORM_ENTROPY = 0.9  # normalised entropy above which attention weights are "nearly uniform"

#: key -> (question, target)
QUESTIONS: dict[str, tuple[str, str]] = {
    "quality": ("0. how good is the prediction?", "(context: mean Dice of TC, WT, ET)"),
    "xt_use": ("1. does the denoiser use x_t?",
               f"≥ {XT_TARGET} at ᾱ ≈ 0.9 with the true mask noised, clearly (≥ {XT_MARGIN}) above the inverted "
               "mask's"),
    "refinement": ("2. does sampling refine?", f"default sampler − one step × one member ≥ +{REFINE_TARGET} Dice"),
    "members": ("3. do the members differ?",
                f"variance ≥ {VARIANCE_TARGET:g} in the truth's WT dilated 3 voxels, and where the errors are "
                "(variance AUROC > 0.5)"),
    "uncertainty": ("4. is the uncertainty useful?", f"best diffusion map − the U-Net's entropy ≥ +{AUROC_TARGET} AUROC"),
    "prior": ("5. does the mask prior steer?", f"rough outline − no prior ≥ +{PRIOR_TARGET} Dice"),
    "attention_knockouts": ("6. do the attention layers matter?",
                            f"zeroing a layer's residual costs ≥ {KNOCKOUT_TARGET} Dice"),
    "attention_maps": ("7. do the attention maps point at the tumour?",
                       f"cross ≥ {ENRICHMENT_TARGET:g}× the head's average in the truth's WT dilated 3 voxels; "
                       f"maximum there in ≥ {POINTING_TARGET:.0%} of cases, cross and self"),
    "faithfulness": ("7b. are the maps faithful?",
                     f"occluding the 10 % most-attended head voxels lowers the tumour mass ≥ {FAITHFUL_TARGET:g}× "
                     "as much as a random 10 %"),
}
NOT_DIFFUSION = "not applicable: the {kind} model has no x_t, sampler, members or prior"
DIFFUSION_ONLY = "not applicable: measured on the diffusion model's attention layers only"


def _f(value, digits: int = 3, signed: bool = False) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _g(value) -> str:
    """Three significant digits (drops of a probability mass span many magnitudes)."""
    return "n/a" if value is None or not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.3g}"


def _ok(value, test) -> bool:
    return value is not None and math.isfinite(value) and bool(test(value))


def faithfulness_ratio(faith: dict, kind: str) -> float:
    """Mean drop of the tumour mass when the map's most-attended voxels are occluded over the mean drop for random
    voxels (NaN when the random drop is not positive)."""
    top, random_drop = faith.get(kind, {}).get("drop", float("nan")), faith.get("random_drop", float("nan"))
    return top / random_drop if random_drop > 0 else float("nan")


def _row(key: str, measured: str, verdict: str, met: bool | None) -> dict:
    question, target = QUESTIONS[key]
    return {"key": key, "question": question, "measured": measured, "target": target, "verdict": verdict, "met": met}


def _na(key: str, reason: str) -> dict:
    return _row(key, "—", reason, None)


def rows_for(settings: dict, mean: dict, per_case: dict) -> list[dict]:
    """The rows of the question table from the means over cases."""
    d = mean.get("dice", {})
    rows = [_row("quality", f"{_f(d.get('mean'), 4)} (TC {_f(d.get('TC'))}, WT {_f(d.get('WT'))}, "
                            f"ET {_f(d.get('ET'))})", "", None)]
    if settings["model_kind"] != "diffusion":
        reason = NOT_DIFFUSION.format(kind=settings["model_kind"])
        maps = (maps_row(mean["attention_maps"], len(per_case)) if mean.get("attention_maps")
                else _na("attention_maps", reason))
        return [rows[0], _na("xt_use", reason), _na("refinement", reason), _na("members", reason),
                uncertainty_row(mean.get("entropy_auroc"), None, mean.get("reference"), settings),
                _na("prior", reason), _na("attention_knockouts", DIFFUSION_ONLY), maps,
                _na("faithfulness", DIFFUSION_ONLY)]
    u = mean["uncertainty"]
    return rows + [xt_row(mean["xt_use"]), refinement_row(mean["refinement"], settings),
                   members_row(mean["members"], settings),
                   uncertainty_row(u["entropy_auroc"], u["variance_auroc"], mean.get("reference"), settings),
                   prior_row(mean["prior"]), knockout_row(mean["attention_knockouts"]),
                   maps_row(mean["attention_maps"], len(per_case)), faithfulness_row(mean["attention_maps"])]


def xt_row(x: dict) -> dict:
    label = "abar0.9"
    true, inverted = x["dice"]["true"][label], x["dice"]["inverted"][label]
    measured = (f"one x0 prediction at t = {x['timesteps'][label]:.0f} (ᾱ = {x['alpha_bar'][label]:.2f}), mean Dice "
                f"given x_t from the true mask {_f(true, 4)}, the inverted mask {_f(inverted, 4)}, the empty mask "
                f"{_f(x['dice']['empty'][label], 4)}, pure noise {_f(x['dice']['noise'][label], 4)}")
    if "skip_only" in x:
        measured += f" (the skip from x_t alone, network output 0: {_f(x['skip_only'][label], 4)})"
    gap = true - inverted
    if _ok(true, lambda v: v >= XT_TARGET) and _ok(gap, lambda v: v >= XT_MARGIN):
        return _row("xt_use", measured, f"uses x_t: the true mask noised gives {_f(true)}, the inverted one "
                                        f"{_f(inverted)}", True)
    if _ok(gap, lambda v: v >= XT_MARGIN):
        return _row("xt_use", measured, f"uses x_t, but too little: {_f(true)} < {XT_TARGET} with the true mask "
                                        f"noised (inverted: {_f(inverted)})", False)
    return _row("xt_use", measured, f"ignores x_t: the inverted mask scores the same ({_f(inverted, 4)} vs "
                                    f"{_f(true, 4)} with the true mask; at ᾱ ≈ 0.9 a denoiser that used its input "
                                    "would score near 1)", False)


def refinement_row(r: dict, s: dict) -> dict:
    one, default = r.get("K1xN1", float("nan")), r["default"]
    gain = default - one
    grid = [k for k in r if k not in ("default",)]
    largest = max(grid, key=lambda k: tuple(int(p[1:]) for p in k.split("x"))) if grid else None
    measured = (f"K1×N1 {_f(one, 4)}; default K{s['sample_steps']}×N{s['ensemble']} {_f(default, 4)} "
                f"({_f(gain, 4, True)})" + (f"; {largest.replace('x', '×')} {_f(r[largest], 4)}" if largest else ""))
    if _ok(gain, lambda v: v >= REFINE_TARGET):
        return _row("refinement", measured, f"sampling refines: the default sampler adds {_f(gain, 3, True)} Dice "
                                            "over one step × one member", True)
    return _row("refinement", measured, f"one pass gives the answer: the default sampler adds {_f(gain, 4, True)} "
                                        "Dice over one step × one member", False if math.isfinite(gain) else None)


def members_row(m: dict, s: dict) -> dict:
    if s["ensemble"] < 2:
        return _na("members", f"not applicable: the default sampler has one member (N = {s['ensemble']})")
    v, auroc = m["variance_near_tumour"], m["variance_auroc"]
    measured = (f"member variance in the truth's WT dilated 3 voxels {v:.2e} (largest {m['variance_max']:.2e}); "
                f"members' masks disagree on {m['disagreeing_voxels']:.0f} voxels per case; AUROC of the variance "
                f"for the errors {_f(auroc)}")
    if not _ok(v, lambda x: x >= VARIANCE_TARGET):
        return _row("members", measured, f"the ensemble is {s['ensemble']} copies of one mask: variance {v:.1e} "
                                         f"< {VARIANCE_TARGET:g}", False)
    if not _ok(auroc, lambda x: x > 0.5):
        return _row("members", measured, f"the members differ, but not where the errors are (variance AUROC "
                                         f"{_f(auroc)})", False)
    return _row("members", measured, f"the members differ where the model is wrong (variance AUROC {_f(auroc)})",
                True)


def uncertainty_row(entropy, variance, reference: dict | None, s: dict) -> dict:
    measured = f"AUROC for the errors: entropy {_f(entropy)}" + (
        f", member variance {_f(variance)}" if variance is not None else "")
    if not reference:
        return _row("uncertainty", measured, "not compared: give --reference with a U-Net checkpoint", None)
    ref = reference.get("entropy_auroc", float("nan"))
    candidates = [x for x in (entropy, variance) if x is not None and math.isfinite(x)]
    best = max(candidates) if candidates else float("nan")
    gap = best - ref
    measured += f"; the reference {s.get('reference_kind') or 'model'}'s entropy {_f(ref)} (best − it: {_f(gap, 3, True)})"
    if _ok(gap, lambda v: v >= AUROC_TARGET):
        return _row("uncertainty", measured, f"better than the reference's: {_f(gap, 3, True)} AUROC", True)
    if _ok(gap, lambda v: v <= -AUROC_TARGET):
        return _row("uncertainty", measured, f"worse than a plain U-Net's: {_f(gap, 3, True)} AUROC", False)
    return _row("uncertainty", measured, f"about the same as the reference's ({_f(gap, 3, True)} AUROC)",
                False if math.isfinite(gap) else None)


def prior_row(p: dict) -> dict:
    if not p.get("applicable"):
        return _na("prior", f"not applicable: {p.get('how', 'no prior')}")
    dice, delta = p["dice"], p["delta"]
    how = {"conditioning": "knocked out inside the conditioning (prior_source head: cond.prior replaced, the tokens "
                           f"rebuilt; zeroing it moves the tokens by {_f(100 * p['token_change_no_prior'], 2)} % of "
                           "their norm)",
           "input": "given as the network's external prior input"}.get(p.get("how"), str(p.get("how")))
    measured = (f"Dice without a prior {_f(dice['none'], 4)}; ΔDice with another case's outline "
                f"{_f(delta.get('other'), 4, True)}, the rough outline {_f(delta['outline'], 4, True)}, the true "
                f"regions {_f(delta['truth'], 4, True)}; with the model's own prior {_f(dice.get('own'), 4)} ({how})")
    gain = delta["outline"]
    if _ok(gain, lambda v: v >= PRIOR_TARGET):
        return _row("prior", measured, f"the prior steers: a rough outline adds {_f(gain, 3, True)} Dice", True)
    return _row("prior", measured, f"the prior does not steer: a rough outline changes Dice by {_f(gain, 4, True)}, "
                                   f"the true regions by {_f(delta['truth'], 4, True)}", False)


def knockout_row(k: dict) -> dict:
    names = {"cross": "cross-attention", "self": "linear self-attention"}
    present = {kind: v for kind, v in k.items() if v.get("layers", 0) > 0}
    if not present:
        return _na("attention_knockouts", "not applicable: the model has no attention layers")
    measured = "; ".join(f"{names[kind]} residual zeroed ({v['layers']:.0f} layers): ΔDice {_f(v['delta'], 4, True)}"
                         for kind, v in present.items())
    verdicts = []
    for kind, v in present.items():
        delta = v["delta"]
        if _ok(delta, lambda x: x <= -KNOCKOUT_TARGET):
            verdicts.append(f"{names[kind]} matters ({_f(delta, 3, True)})")
        elif _ok(delta, lambda x: x >= KNOCKOUT_TARGET):
            verdicts.append(f"{names[kind]} hurts: zeroing it improves Dice by {_f(delta, 3, True)}")
        else:
            verdicts.append(f"{names[kind]} has no measurable effect ({_f(delta, 4, True)})")
    met = all(_ok(v["delta"], lambda x: x <= -KNOCKOUT_TARGET) for v in present.values())
    return _row("attention_knockouts", measured, "; ".join(verdicts), met)


def maps_row(maps: dict, cases: int) -> dict:
    present = [k for k, v in maps.items() if isinstance(v, dict) and v.get("present")]
    if not present:
        return _na("attention_maps", "not applicable: the model exports no attention maps")
    parts, verdicts = [], []
    for kind in present:
        e, p = maps[kind].get("enrichment"), maps[kind].get("pointing_game")
        hits = "n/a" if p is None or not math.isfinite(p) else f"{round(p * cases)}/{cases}"
        parts.append(f"{kind}: {_f(e, 2)}× the head's average in the truth's WT dilated 3 voxels, maximum there in "
                     f"{hits} cases")
        if _ok(e, lambda v: v < 0.9):
            verdicts.append(f"the {kind} map points away from the tumour ({_f(e, 2)}×)")
        elif _ok(e, lambda v: v < 1.1):
            verdicts.append(f"the {kind} map does not single out the tumour ({_f(e, 2)}×)")
        elif _ok(e, lambda v: v < ENRICHMENT_TARGET):
            verdicts.append(f"the {kind} map is only weakly drawn to the tumour ({_f(e, 2)}×)")
        elif e is not None and math.isfinite(e):
            verdicts.append(f"the {kind} map concentrates on the tumour ({_f(e, 2)}×)")
    w = maps.get("cross_weights", {})
    if w.get("normalised_entropy") is not None and math.isfinite(w["normalised_entropy"]):
        parts.append(f"cross-attention weights' normalised entropy {_f(w['normalised_entropy'])} (largest weight "
                     f"{_f(w['largest_weight'], 4)}, uniform {_f(w['uniform_weight'], 4)})")
        if w["normalised_entropy"] >= UNIFORM_ENTROPY:
            verdicts.append("the cross-attention weights are nearly uniform: a global average pool")
    if "cross" not in present:  # the targets are the diffusion model's cross- and self-attention maps
        return _row("attention_maps", "; ".join(parts), "; ".join(verdicts), None)
    cross_ok = _ok(maps["cross"].get("enrichment"), lambda v: v >= ENRICHMENT_TARGET)
    pointing_ok = all(_ok(maps[k].get("pointing_game"), lambda v: v >= POINTING_TARGET) for k in ("cross", "self")
                      if k in present)
    return _row("attention_maps", "; ".join(parts), "; ".join(verdicts), bool(cross_ok and pointing_ok))


def faithfulness_row(maps: dict) -> dict:
    faith = maps.get("faithfulness", {})
    kinds = [k for k in ("cross", "self") if k in faith]
    if not kinds:
        return _na("faithfulness", "not applicable: the model exports no attention maps")
    random_drop = faith["random_drop"]
    measured = "; ".join(f"{kind}: the most-attended 10 % lower the tumour mass by {_g(faith[kind]['drop'])}"
                         for kind in kinds)
    measured += f"; a random 10 % by {_g(random_drop)} (of {_g(faith.get('mass'))} voxels' worth of WT probability)"
    ratios = {k: faithfulness_ratio(faith, k) for k in kinds}
    measured += "; ratio " + ", ".join(f"{k} {_f(r, 2)}×" for k, r in ratios.items())
    if not _ok(random_drop, lambda v: v > 0):
        return _row("faithfulness", measured, "undefined: occluding a random 10 % did not lower the tumour mass", None)
    main = "cross" if "cross" in ratios else kinds[0]
    r = ratios[main]
    if _ok(r, lambda v: v >= FAITHFUL_TARGET):
        return _row("faithfulness", measured, f"the {main} map is faithful: occluding what it attends to changes the "
                                              f"prediction {_f(r, 1)}× as much as random occlusion", True)
    return _row("faithfulness", measured, f"the {main} map is not faithful: occluding what it attends to changes the "
                                          f"prediction {_f(r, 2)}× as much as random occlusion", False)


def details(result: dict) -> list[str]:
    """The markdown below the table: x_t Dice per timestep, the K × N grid, the prior variants, per-case values."""
    s, mean, per_case = result["settings"], result["mean"], result["per_case"]
    lines = ["## Details", ""]
    if s["model_kind"] == "diffusion":
        x = mean["xt_use"]
        labels = list(x["timesteps"])
        lines += ["### 1. Mean Dice of one x0 prediction", "",
                  "| x_t from | " + " | ".join(f"t = {x['timesteps'][k]:.0f} (ᾱ = {x['alpha_bar'][k]:.3f})"
                                               for k in labels) + " |",
                  "| --- |" + " --- |" * len(labels)]
        for version, by_t in x["dice"].items():
            lines.append(f"| {version} | " + " | ".join(_f(by_t[k], 4) for k in labels) + " |")
        lines += ["", "### 2. Mean Dice of the sampler, K steps × N members", "",
                  "| K × N | Dice |", "| --- | --- |"]
        lines += [f"| {k.replace('x', ' × ')} | {_f(v, 4)} |" for k, v in mean["refinement"].items()]
        if mean["prior"].get("applicable"):
            lines += ["", "### 5. Mean Dice per prior", "", "| prior | Dice | Δ vs no prior |", "| --- | --- | --- |"]
            for name, value in mean["prior"]["dice"].items():
                lines.append(f"| {name} | {_f(value, 4)} | {_f(mean['prior']['delta'].get(name), 4, True)} |")
    lines += ["", "### Per case", "", "| case | Dice | " + ("x_t true / inverted (ᾱ ≈ 0.9) | refine gain | "
              "variance near tumour | entropy AUROC | outline gain | cross enrichment | cross max inside |"
              if s["model_kind"] == "diffusion" else "entropy AUROC |"),
              "| --- | --- |" + (" --- |" * 7 if s["model_kind"] == "diffusion" else " --- |")]
    for case, r in per_case.items():
        cells = [case, _f(r["dice"]["mean"], 4)]
        if s["model_kind"] == "diffusion":
            x, maps = r["xt_use"]["dice"], r["attention_maps"]
            cells += [f"{_f(x['true']['abar0.9'], 3)} / {_f(x['inverted']['abar0.9'], 3)}",
                      _f(r["refinement"]["default"] - r["refinement"].get("K1xN1", float("nan")), 4, True),
                      f"{r['members']['variance_near_tumour']:.2e}", _f(r["uncertainty"]["entropy_auroc"]),
                      _f(r["prior"].get("delta", {}).get("outline"), 4, True),
                      _f(maps["cross"].get("enrichment"), 2), str(maps["cross"].get("pointing_game", "n/a"))]
        else:
            cells.append(_f(r["entropy_auroc"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
