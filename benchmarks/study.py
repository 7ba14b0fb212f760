"""The fair multi-seed study (issue 17, item 2): every variant trained with the demo's recipe and budget, several
training seeds, scored on held-out phantoms, compared with paired statistics pooled over seeds. (A little over 400
lines: the five steps below read top to bottom; the statistics and tables are in ``benchmarks.study_stats``.)

Command (from the repository root; the full study, about an hour on 2 CPU cores; ``--quick``, a smoke test of the
whole pipeline, 2-3 minutes)::

    .venv/bin/python -m benchmarks.study --out /tmp/study                       # 9 variants x seeds 0 1 2
    .venv/bin/python -m benchmarks.study --out /tmp/study --variants unet diffusion --seeds 0 1 2 3 4
    .venv/bin/python -m benchmarks.study --out /tmp/study_quick --quick         # smoke test, not a result

1. **Data.** ``--train-cases`` (14, the demo's training + validation cases) + ``--held-out`` (24) phantoms at 3 mm
   (``data.synth.synthesize``, seed ``--data-seed``), the manifest holding exactly ``--held-out`` test cases
   (5 folds over the rest; fold 0 validates), unless ``OUT/data`` exists (its test count must match).
2. **Variants** (``VARIANTS``: ``--set`` overrides on ``configs/demo_cpu.yaml``, plus ``--set`` extras for all),
   each trained once per ``--seeds`` value (``experiment.seed``) into ``OUT/runs/VARIANT_seedS``. A finished run of
   the same config is reused, a killed one resumes, one of another config is refused (``harness.train_or_reuse``).
   ``unet_equal``'s widths are the demo U-Net's scaled by the factor whose parameter count is closest to the
   ``diffusion`` variant's network (bisection on the factor, from the built networks; both counts printed).
3. **Per (variant, seed)**, each held-out case is predicted with the package's own ``inference.case.predict_case``
   (the checkpoint's sampler: K = 2 x N = 4 in the demo config) and scored with ``evaluation.run.score_case``
   (``harness.scored_rows``): Dice per region, the entropy's voxel AUROC for errors (tumour neighbourhood) and
   the rest of ``evaluate``'s columns. Also, per case:
   - sampling diffusion variants (``model.kind=diffusion``, not ``diffusion.mode=direct``): the AUROC of the member
     variance (same definition as the entropy's, ``evaluation.run.uncertainty_quality``), and the same checkpoint
     sampled with K = 1 x N = 1 (label ``VARIANT@K1N1``: does sampling refine?);
   - the ``diffusion`` variant, when its network takes an external prior: the case predicted with a rough outline
     prior (label ``diffusion+outline``): the truth's whole tumour dilated 2 voxels (26-neighbourhood), Gaussian
     blur sigma = 1 voxel, copied into the 3 region channels, written as ``OUT/priors/CASE.nii.gz`` and given through
     the record's prior path, as ``--prior-dir`` gives it; a model that takes no prior is reported as such;
   - every attention map the prediction has (diffusion: ``cross``, ``self``; attention_unet: ``gate``): enrichment
     and pointing game (``audit.scores``) in the truth's whole tumour dilated 3 voxels, against the head mask
     ``predict`` uses (``data.transforms.head_mask`` through ``eval_transforms(head_mask_key=HEAD)``).
4. **Statistics** (``study_stats``): for each case the metric is averaged over seeds; each comparison is the
   paired mean difference over cases of those seed means with a BCa bootstrap 95 % CI over cases (``--n-boot``
   10,000 resamples, seed 0) and the Wilcoxon signed-rank p (``evaluation.stats.paired_comparison``). The seeds are
   not resampled: the CI is over cases; the seed-to-seed spread is reported beside it as the sd over seeds of the
   per-seed case-mean (of each metric, and of each paired difference).
5. **Outputs**: ``OUT/per_case.csv`` (one row per label, seed, case, region), ``OUT/study.md`` and
   ``OUT/study.json``; MLflow experiment ``medseg-diff-study`` (``--tracking-uri``, default
   ``sqlite:///OUT/mlflow.db``; ``--no-tracking``): a parent run per study with the comparisons and the files,
   a nested run per variant x seed with its metrics.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import DEMO_CONFIG, finished_run, phantom_manifest, run_config, scored_rows, train_or_reuse
from benchmarks.study_stats import (
    CASE, DICE_REGIONS, Spec, build_table, compare, comparison_json, comparisons_markdown, summary,
    variants_markdown,
)
from medseg_diff.audit.scores import dilated, enrichment, pointing_game
from medseg_diff.config import Config
from medseg_diff.data.conventions import LabelConvention, get_convention
from medseg_diff.data.dataset import case_record
from medseg_diff.data.manifest import load_manifest
from medseg_diff.errors import ConfigError, DataError
from medseg_diff.evaluation.run import select_cases
from medseg_diff.evaluation.scoring import uncertainty_quality
from medseg_diff.evaluation.tables import write_per_case_csv
from medseg_diff.kinds import build_kind, build_network
from medseg_diff.kinds.unet import UNetKind
from medseg_diff.inference.case import predict_case
from medseg_diff.inference.loading import load_model
from medseg_diff.models import count_parameters

REFERENCE = "diffusion"
D = "model.kind=diffusion"
# name -> (--set overrides on configs/demo_cpu.yaml, what it is)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "unet": (["model.kind=unet"], "the demo U-Net (MONAI UNet, widths 16-32-64-128)"),
    "unet_equal": (["model.kind=unet"], "the U-Net widened to the diffusion model's parameter count"),
    "attention_unet": (["model.kind=attention_unet"], "MONAI AttentionUnet, the demo U-Net's widths, trained like it"),
    "direct": ([D, "diffusion.mode=direct"], "the diffusion network trained directly for segmentation (one pass)"),
    "diffusion": ([D], "the demo's diffusion default (with the width-6 refiner since 2026-12-07)"),
    "full_res": ([D, "model.denoiser.patch_size=1"], "as diffusion, s = 1 (full resolution)"),
    "no_refine": ([D, "model.denoiser.refine=false"],
                  "as diffusion, without the full-resolution refiner (the default before 2026-12-07)"),
    "refine": ([D, "model.denoiser.refine=true", "model.denoiser.refine_width=8"],
               "as diffusion, with a refiner of width 8 (stem_channels // 2)"),
    "refine6": ([D, "model.denoiser.refine=true", "model.denoiser.refine_width=6"],
                "as diffusion, with a refiner of width 6"),
    "refine4": ([D, "model.denoiser.refine=true", "model.denoiser.refine_width=4"],
                "as diffusion, with a refiner of width 4"),
    "refine_ctx1": ([D, "model.denoiser.refine_context=1"],
                    "as diffusion, one residual conv on the refiner's image features (once per window)"),
    "refine_ctx2": ([D, "model.denoiser.refine_context=2"],
                    "as diffusion, two residual convs on the refiner's image features (once per window)"),
    "recycle": ([D, "diffusion.recycle=0.5"],
                "as diffusion, half the training samples noised from the model's own estimate (Fu et al. 2023)"),
    "chain": ([D, "diffusion.chain=0.5"],
              "as diffusion, half the training samples drawn along the sampler's own chain (x_t, t, self-conditioning)"),
    "chain_all": ([D, "diffusion.chain=1.0"], "as diffusion, every training sample drawn along the sampler's own chain"),
    "no_cross": ([D, "model.denoiser.cross_attention_levels=[]"], "as diffusion, no cross-attention"),
    "no_linear": ([D, "model.denoiser.linear_attention_levels=[]"], "as diffusion, no linear self-attention"),
    "no_prior": ([D, "model.denoiser.prior_source=none"], "as diffusion, no mask prior"),
}  # fmt: skip
#: compared with the reference (diffusion) on Dice and entropy AUROC
OTHERS = ("direct", "unet_equal", "unet", "attention_unet", "full_res", "no_refine", "refine", "refine6", "refine4",
          "refine_ctx1", "refine_ctx2", "recycle", "chain", "chain_all", "no_cross", "no_linear", "no_prior")
QUICK = dict(train_cases=6, held_out=2, seeds=[0], variants=["unet", "diffusion"],
             overrides=["train.epochs=1", "train.steps_per_epoch=2", "train.val_every=1", "data.max_val_cases=1"])
EXPERIMENT = "medseg-diff-study"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all (--quick: unet diffusion)")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--train-cases", type=int, help="training + validation phantoms (default 14, the demo's)")
    p.add_argument("--held-out", type=int, help="held-out test phantoms (default 24)")
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra override for every variant")
    p.add_argument("--n-boot", type=int, default=10000)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///OUT/mlflow.db)")
    p.add_argument("--no-tracking", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke test: 8 cases (2 held out), 1 epoch x 2 steps, "
                                                         "seed 0, variants unet and diffusion")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else dict(train_cases=14, held_out=24, seeds=[0, 1, 2], variants=list(VARIANTS))
    for key in ("train_cases", "held_out", "seeds", "variants"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.overrides = (QUICK["overrides"] if args.quick else []) + args.overrides
    return args


# --- configs ------------------------------------------------------------------------------------------


def _parameters(cfg: Config) -> int:
    return count_parameters(build_kind(cfg).net)


def equal_unet_channels(unet_cfg: Config, target: int) -> tuple[list[int], int]:
    """The demo U-Net's widths times the factor whose parameter count is closest to ``target`` (bisection on the
    factor; the count grows with it), and that count."""
    base = unet_cfg.model.unet.channels
    spec = UNetKind.network_spec(unet_cfg)

    def widths(f: float) -> list[int]:
        return [max(1, round(c * f)) for c in base]

    def count(f: float) -> int:
        return count_parameters(build_network({**spec, "kwargs": {**spec["kwargs"], "channels": widths(f)}}))

    lo, hi = 0.1, 10.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda f: abs(count(f) - target))
    return widths(best), count(best)


def study_configs(args, manifest: Path) -> tuple[dict[tuple[str, int], tuple[Config, list[str]]], dict]:
    """The config (and its overrides) of every (variant, seed), validated before any training; ``unet_equal``
    sized here."""
    runs = args.out / "runs"
    extra = args.overrides
    info: dict = {}
    if "unet_equal" in args.variants:
        diffusion = run_config(manifest, runs / "probe", VARIANTS["diffusion"][0] + extra)
        unet = run_config(manifest, runs / "probe", VARIANTS["unet"][0] + extra)
        target = _parameters(diffusion)
        channels, count = equal_unet_channels(unet, target)
        info["unet_equal"] = {"channels": channels, "parameters": count, "diffusion_parameters": target}
        print(f"unet_equal: widths {channels}: {count:,} parameters; diffusion model: {target:,} "
              f"({100 * (count / target - 1):+.1f} %)", flush=True)
        if abs(count / target - 1) > 0.1:
            print("warning: unet_equal is more than 10 % away from the diffusion model's count", flush=True)
    configs = {}
    for name in args.variants:
        overrides = list(VARIANTS[name][0])
        if name == "unet_equal":
            overrides.append(f"model.unet.channels={info['unet_equal']['channels']}")
        for seed in args.seeds:
            mine = overrides + [f"experiment.seed={seed}"] + extra
            try:
                configs[(name, seed)] = run_config(manifest, runs / f"{name}_seed{seed}", mine), mine
            except ConfigError as err:
                raise SystemExit(f"variant {name}: the config is refused: {err} (leave it out with --variants)")
    return configs, info


# --- per-case measurements ----------------------------------------------------------------------------


def head_of(record: dict, conv: LabelConvention) -> np.ndarray:
    """The head mask ``predict`` uses (``data.transforms.head_mask``), bool on the input file's grid."""
    from medseg_diff.data.transforms import HEAD, LABEL, eval_transforms

    transform = eval_transforms(conv, None, with_label=False, crop_foreground=False, head_mask_key=HEAD)
    return np.asarray(transform({k: v for k, v in record.items() if k != LABEL})[HEAD], dtype=bool)


def outline_prior(pred, image_path: str, conv: LabelConvention, folder: Path) -> Path:
    """``folder/CASE.nii.gz``: the audit's rough outline (``audit.cases.rough_outline``: the truth's WT dilated 2
    voxels, Gaussian blur sigma 1 voxel, in 3 channels), as a 4D NIfTI on the case's grid."""
    import nibabel as nib

    from medseg_diff.audit.cases import rough_outline
    from medseg_diff.data.io import read_image

    path = folder / f"{pred.case_id}.nii.gz"
    if not path.exists():
        outline = rough_outline(conv.to_regions(pred.ground_truth))  # [3, X, Y, Z]
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{pred.case_id}.tmp.nii.gz"
        nib.save(nib.Nifti1Image(np.moveaxis(outline, 0, -1), read_image(image_path).affine), str(tmp))
        tmp.replace(path)
    return path


def case_scores(pred, head: np.ndarray, conv: LabelConvention) -> dict[str, float]:
    """Member-variance AUROC (when the prediction has a variance map) and every attention map's enrichment and
    pointing game in the truth's WT dilated 3 voxels."""
    truth, mask = conv.to_regions(pred.ground_truth), conv.to_regions(pred.labels)
    out: dict[str, float] = {}
    if pred.variance is not None:
        out["variance_auroc"] = uncertainty_quality(pred.probs, pred.variance, mask, truth)[0]["uncertainty_auroc"]
    region = dilated(truth[1], 3)
    for name, values in sorted(pred.attention.items()):
        out[f"enrichment_{name}"] = enrichment(values, region, head)
        out[f"pointing_{name}"] = float(pointing_game(values, region, head))
    return out


def _takes_prior(model) -> bool:
    try:
        model.adapter.check_prior(True, model.checkpoint)
        return True
    except DataError:
        return False


def measure_run(name: str, seed: int, ckpt: Path, manifest, cases, conv, heads: dict, priors: Path
                ) -> tuple[list[dict], dict]:
    """Per-case rows of one trained (variant, seed) under each of its conditions, and facts about the run."""
    model = load_model(ckpt, "cpu")
    sampling = model.kind == "diffusion" and getattr(model.cfg.diffusion, "mode", None) != "direct"
    k1n1 = load_model(ckpt, "cpu", sample_steps=1, ensemble=1) if sampling else None
    outline = name == REFERENCE and _takes_prior(model)
    info = {"parameters": count_parameters(model.net), "kind": model.kind, "epoch": model.epoch,
            "outline_prior": outline if name == REFERENCE else None}
    rows: list[dict] = []

    def tagged(new: list[dict], sampler: str, prior: str, extra: dict | None = None) -> list[dict]:
        for row in new:
            row.update(variant=name, seed=seed, sampler=sampler, prior=prior, **(extra or {}))
        return new

    for case in cases:
        record = case_record(manifest, case)
        if case.id not in heads:
            heads[case.id] = head_of(record, conv)
        pred = predict_case(model, record, conv)
        rows += tagged(scored_rows(name, pred, conv), "default", "none", case_scores(pred, heads[case.id], conv))
        if k1n1 is not None:
            rows += tagged(scored_rows(f"{name}@K1N1", predict_case(k1n1, record, conv), conv), "K1N1", "none")
        if outline:
            image = record["image"] if isinstance(record["image"], str) else record["image"][0]
            prior = outline_prior(pred, image, conv, priors)
            with_prior = predict_case(model, case_record(manifest, case, prior=prior), conv)
            rows += tagged(scored_rows(f"{name}+outline", with_prior, conv), "default", "outline")
    return rows, info


# --- tables -------------------------------------------------------------------------------------------


def comparison_specs(labels: set[str]) -> list[tuple[Spec, tuple[str, ...]]]:
    """Every comparison whose two labels were measured, with its regions."""
    dice, auroc = ("dice", DICE_REGIONS), ("uncertainty_auroc", (CASE,))
    ref = REFERENCE
    specs = []
    for other in OTHERS:
        for metric, regions in (dice, auroc):
            specs.append((Spec(f"{ref} vs {other}", (ref, metric), (other, metric)), regions))
    for metric, regions in (dice, auroc):
        specs.append((Spec(f"sampling refines: {ref} (config's K x N) vs K1xN1", (ref, metric),
                           (f"{ref}@K1N1", metric)), regions))
    specs.append((Spec(f"prior steers: {ref} with the outline prior vs none", (f"{ref}+outline", "dice"),
                       (ref, "dice")), DICE_REGIONS))
    specs.append((Spec(f"uncertainty: {ref} member variance vs unet entropy", (ref, "variance_auroc"),
                       ("unet", "uncertainty_auroc")), (CASE,)))
    for kind in ("cross", "self"):
        specs.append((Spec(f"maps: {ref} {kind} vs attention_unet gate", (ref, f"enrichment_{kind}"),
                           ("attention_unet", "enrichment_gate")), (CASE,)))
    return [(s, r) for s, r in specs if s.a[0] in labels and s.b[0] in labels]


# --- MLflow -------------------------------------------------------------------------------------------


def _metric_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in text)


def track(args, runs: dict, comparisons: list, files: list[Path], manifest: Path) -> str | None:
    from medseg_diff.tracking import source_tags, start_tracker

    uri = args.tracking_uri or f"sqlite:///{args.out.resolve() / 'mlflow.db'}"
    parent = start_tracker(True, uri, EXPERIMENT, run_name=f"study-{time.strftime('%Y%m%d-%H%M%S')}",
                           tags={"stage": "study", **source_tags()})
    parent.log_params({"variants": " ".join(args.variants), "seeds": " ".join(map(str, args.seeds)),
                       "train_cases": args.train_cases, "held_out": args.held_out, "spacing": args.spacing,
                       "data_seed": args.data_seed, "n_boot": args.n_boot, "bootstrap_seed": 0, "quick": args.quick,
                       "config": str(DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[1])),
                       "overrides": " ".join(args.overrides), "manifest": str(manifest)})
    metrics = {}
    for c in comparisons:
        key = _metric_name(f"{c.spec.name}.{c.spec.a[1]}_{c.region}")
        metrics |= {f"{key}.mean_diff": c.result.mean_diff, f"{key}.ci_low": c.result.ci_low,
                    f"{key}.ci_high": c.result.ci_high, f"{key}.wilcoxon_p": c.result.wilcoxon_p}
    parent.log_metrics(metrics)
    for (name, seed), run in runs.items():
        child = parent.child(f"{name}_seed{seed}", tags={"variant": name, "seed": str(seed)})
        child.log_params({"variant": name, "seed": seed, "parameters": run["parameters"], "kind": run["kind"],
                          "checkpoint": run["checkpoint"], "overrides": " ".join(run["overrides"])})
        child.log_metrics({"train_seconds": run["train_seconds"], **run["metrics"]})
        child.end()
    for path in files:
        parent.log_artifact(path)
    parent.end()
    return parent.run_id


def run_metrics(rows: list[dict], name: str, seed: int) -> dict[str, float]:
    """Means over cases of one (variant, seed): per label suffix (``K1N1.``, ``outline.``), Dice per region and
    the per-case metrics."""
    table = build_table([r for r in rows if r["variant"] == name and r["seed"] == seed])
    out = {}
    for (label, metric, region), _ in table.items():
        prefix = label[len(name):].lstrip("@+")
        key = _metric_name((f"{prefix}." if prefix else "") + (f"{metric}_{region}" if region != CASE else metric))
        out[key] = summary(table, (label, metric, region))["mean"]
    return out


# --- main ---------------------------------------------------------------------------------------------


def measured(name, seed, checkpoint: Path, manifest, cases, conv, heads, priors) -> tuple[list[dict], dict]:
    """``measure_run``, kept beside the checkpoint (``study_rows.pkl``) and reused while the checkpoint file and the
    held-out cases are the same: a study over more variants or another --out combines finished runs without
    predicting them again (copy or link run folders under OUT/runs)."""
    cache = checkpoint.parent / "study_rows.pkl"
    key = {"name": name, "seed": seed, "checkpoint_mtime_ns": checkpoint.stat().st_mtime_ns,
           "checkpoint_size": checkpoint.stat().st_size, "cases": [c.id for c in cases], "version": 1}
    if cache.exists():
        with cache.open("rb") as f:
            saved_key, rows, facts = pickle.load(f)
        if saved_key == key:
            return rows, facts
    rows, facts = measure_run(name, seed, checkpoint, manifest, cases, conv, heads, priors)
    with cache.open("wb") as f:
        pickle.dump((key, rows, facts), f)
    return rows, facts


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    # 1. data
    manifest_path = phantom_manifest(args.out / "data", args.train_cases + args.held_out, args.held_out,
                                     args.spacing, args.data_seed, name="synthetic-brats-study")
    manifest = load_manifest(manifest_path)
    conv = get_convention(manifest.convention)
    cases = select_cases(manifest, "test")
    if len(cases) != args.held_out:
        raise SystemExit(f"{manifest_path} holds {len(cases)} test cases, not --held-out {args.held_out}: use another "
                         "--out (or delete its data folder)")
    # 2.-3. configs (all validated first), train, predict and score
    configs, info = study_configs(args, manifest_path)
    for cfg, _ in configs.values():  # a run folder of another config is refused before any work
        try:
            finished_run(cfg)
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
    rows, runs, heads = [], {}, {}
    for (name, seed), (cfg, overrides) in configs.items():
        trained = train_or_reuse(cfg)
        print(f"{name} seed {seed}: {'reused' if trained.reused else 'trained'} ({trained.seconds:.0f} s)", flush=True)
        t0 = time.perf_counter()
        new, facts = measured(name, seed, trained.checkpoint, manifest, cases, conv, heads, args.out / "priors")
        rows += new
        runs[(name, seed)] = {**facts, "train_seconds": trained.seconds, "reused": trained.reused,
                              "checkpoint": str(trained.checkpoint), "overrides": overrides,
                              "metrics": run_metrics(new, name, seed)}
        print(f"{name} seed {seed}: scored {len(cases)} cases in {time.perf_counter() - t0:.0f} s", flush=True)
    write_per_case_csv(rows, args.out / "per_case.csv")
    # 4. statistics
    table = build_table(rows)
    labels = list(dict.fromkeys(str(r["model"]) for r in rows))
    comparisons = [compare(table, spec, region, args.n_boot)
                   for spec, regions in comparison_specs(set(labels)) for region in regions]
    # 5. outputs
    variant_md, variant_json = variants_markdown(table, labels, runs)
    notes = [f"- {n}: {VARIANTS[n][1]}" for n in args.variants]
    if "unet_equal" in info:
        e = info["unet_equal"]
        notes.append(f"- unet_equal widths {e['channels']}: {e['parameters']:,} parameters vs the diffusion model's "
                     f"{e['diffusion_parameters']:,}")
    if runs.get((REFERENCE, args.seeds[0]), {}).get("outline_prior") is False:
        notes.append(f"- outline prior: not measured, the {REFERENCE} model takes no external prior")
    header = (f"# Study{' (quick smoke test: not a result)' if args.quick else ''}\n\n"
              f"{len(cases)} held-out phantoms ({args.train_cases} for training and validation, {args.spacing} mm, "
              f"data seed {args.data_seed}); training seeds {args.seeds}; recipe and budget of configs/demo_cpu.yaml"
              + (f" with {' '.join(args.overrides)}" if args.overrides else "") + ".\n"
              "Values: mean over cases of the per-case mean over seeds ± sd over seeds of the case-mean. "
              "Comparisons: paired over cases on the seed means, BCa bootstrap 95 % CI over cases "
              f"({args.n_boot} resamples, seed 0), Wilcoxon signed-rank p; Δ per seed: the same difference per "
              "training seed, and its sd.\n\n" + "\n".join(notes))
    text = f"{header}\n\n## Variants\n\n{variant_md}\n\n## Comparisons\n\n{comparisons_markdown(comparisons)}\n"
    (args.out / "study.md").write_text(text, encoding="utf-8")
    doc = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "info": info,
           "cases": [c.id for c in cases], "variants": variant_json,
           "runs": {f"{n}_seed{s}": r for (n, s), r in runs.items()},
           "comparisons": [comparison_json(c) for c in comparisons], "seconds": time.perf_counter() - start}
    (args.out / "study.json").write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    print(text)
    if not args.no_tracking:
        files = [args.out / "study.md", args.out / "study.json", args.out / "per_case.csv"]
        run_id = track(args, runs, comparisons, files, manifest_path)
        print(f"MLflow: experiment {EXPERIMENT}, run {run_id}")
    print(f"study: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
