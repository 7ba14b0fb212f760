"""``medseg-diff`` console script. Each subcommand parses its arguments and calls one stage (``medseg_diff.stages``);
``pipelines/*.py`` call the same functions. Every expected failure is one line on stderr naming the file, case or
key: bad input (``MedsegError``) exits with status 2, a runtime fault (``OSError``: full disk, permission, read-only,
unreachable server) with 1; ``--debug`` shows the traceback instead.

Over 400 lines on purpose: the whole command-line surface (every subcommand, its flags and their help) in one
file, so that a flag's name, its help text and the stage argument it becomes are read together.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path

from medseg_diff.errors import ConfigError, DataError, ManifestError, MedsegError, ServiceError, missing_extra


# --- checks made before the heavy imports (torch, MONAI, MLflow): a mistyped path is one line within a second --------


def _is_model_uri(source) -> bool:
    """``inference.loading.is_model_uri``'s rule, repeated here because importing inference loads torch."""
    return str(source).startswith(("models:/", "runs:/"))


def _need_checkpoint(path) -> None:
    if path is not None and not _is_model_uri(path) and not Path(path).is_file():
        raise DataError(path, "checkpoint not found")


def _need_manifest(path) -> None:
    if path is not None and not Path(path).is_file():
        raise ManifestError(path, "manifest not found")


def _need_tracking_uri(uri: str | None, tracking: bool) -> None:
    """A ``--tracking-uri`` (or, with tracking on and none given, ``$MLFLOW_TRACKING_URI``) MLflow cannot use is
    refused before any work, not after the predictions: ``store_uris`` has the rules (no MLflow import)."""
    from medseg_diff.store_uris import check_tracking_uri, resolve_uri

    if tracking:
        resolve_uri(uri, "--tracking-uri")
    else:
        check_tracking_uri(uri, "--tracking-uri", key="--tracking-uri")


def add_postprocess_args(p: argparse.ArgumentParser) -> None:
    """``--min-lesion-mm3`` / ``--min-enhancing-mm3``: predict's and evaluate's post-processing overrides."""
    p.add_argument("--min-lesion-mm3", type=float, default=None,
                   help="post-processing: remove whole-tumour components smaller than this (mm³; 0: off; default: the "
                        "training config's infer.min_lesion_mm3)")
    p.add_argument("--min-enhancing-mm3", type=float, default=None,
                   help="post-processing: a case's enhancing tumour smaller than this becomes core (mm³; 0: off; "
                        "default: the training config's infer.min_enhancing_mm3)")


def _need_input(path) -> None:
    """A manifest JSON, a data folder, a case folder or a DICOM study folder (checked in full by discovery)."""
    if path is None:
        return
    if Path(path).suffix == ".json":
        _need_manifest(path)
    elif not Path(path).exists():
        raise DataError(path, "data root is not a folder")

# name -> (help, add_arguments, run)
_COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help: str):
    def register(add_arguments: Callable):
        def attach(run: Callable):
            _COMMANDS[name] = (help, add_arguments, run)
            return run

        return attach

    return register


# --- synth -------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--cases", type=_positive_int, default=20)
    p.add_argument("--spacing", type=_positive_float, default=2.0,
                   help="voxel size in mm (1 for realism, 2-3 for CPU demos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("brats2021", "brats2023"), default="brats2021")
    p.add_argument("--workers", type=_positive_int, default=1, help="processes")
    p.add_argument("--manifest", type=Path, default=None, help="manifest path (default OUT/manifest.json)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--test-fraction", type=_fraction, default=0.2)
    p.add_argument("--timepoints", type=_positive_int, default=1,
                   help="scans per patient (> 1 needs --layout brats2023: CASE-000, CASE-001, ...; --cases counts "
                        "patients); the split keeps a patient's scans together")


@command("synth", "write synthetic BraTS-like phantoms (MNI152 anatomy + grown tumour) and their manifest")(add_synth_args)
def run_synth(args: argparse.Namespace) -> int:
    from medseg_diff.stages.data import synthesize_dataset

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise DataError(args.out, "is a file" if not args.out.is_dir() else
                        "already holds files; synthesise into a new or empty folder (nothing was overwritten)")
    if args.timepoints > 1 and args.layout != "brats2023":
        raise DataError(args.out, f"--timepoints {args.timepoints} needs --layout brats2023 (its case ids carry the "
                                  f"timepoint: BraTS-SYN-00000-000, -001); {args.layout} has one scan per patient")
    folders, path = synthesize_dataset(args.out, args.cases, args.spacing, args.seed, args.layout, args.workers,
                                       args.manifest, args.folds, args.test_fraction, timepoints=args.timepoints)
    per = f" ({args.cases} patients x {args.timepoints} timepoints)" if args.timepoints > 1 else ""
    print(f"wrote {len(folders)} cases{per} to {args.out} and manifest {path}")
    return 0


# --- manifest ----------------------------------------------------------------------------------------


def add_manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", type=Path, help="data set folder (BraTS 2018-2021, BraTS 2023+ or MSD Task01)")
    p.add_argument("--out", type=Path, required=True, help="manifest JSON to write")
    p.add_argument("--name", default=None, help="data set name (default: the folder's name)")
    p.add_argument("--convention", choices=("brats2021", "brats2023", "msd"), default=None,
                   help="force the layout / label convention instead of detecting it")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--test-fraction", type=_fraction, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--follow-symlinks", action="store_true",
                   help="accept symlinks that resolve outside the data folder (refused by default)")
    p.add_argument("--patients", type=Path, default=None, metavar="FILE",
                   help="who each case's patient is, for the per-patient split: a CSV with a case_id,patient_id "
                        "header or a JSON object {case id: patient id}, naming every case (default: the case id; "
                        "BraTS 2023+: the id without its timepoint, BraTS-GLI-00001-001 -> BraTS-GLI-00001)")


@command("manifest", "build a manifest (paths, SHA-256, convention, splits) of a data set folder")(add_manifest_args)
def run_manifest(args: argparse.Namespace) -> int:
    from medseg_diff.stages.data import dataset_manifest

    manifest, path = dataset_manifest(args.root, args.out, args.name, args.convention, args.folds,
                                      args.test_fraction, args.seed, args.follow_symlinks, patients=args.patients)
    subsets = {s: sum(c.subset == s for c in manifest.cases) for s in ("train", "test", "unlabelled")}
    patients = len({c.patient for c in manifest.cases})
    print(f"{manifest.name}: {len(manifest.cases)} cases of {patients} patients, convention {manifest.convention}, "
          f"{manifest.folds} folds; train {subsets['train']}, test {subsets['test']}, "
          f"unlabelled {subsets['unlabelled']} -> {path}")
    return 0


# --- check -------------------------------------------------------------------------------------------


def add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path)
    p.add_argument("--root", type=Path, default=None, help="override the manifest's data root")
    p.add_argument("--continue-on-error", action="store_true", help="check every case and list all problems")
    p.add_argument("--no-checksums", action="store_true", help="skip SHA-256 verification (faster)")


@command("check", "verify a manifest: files readable, grids agree, labels valid, no NaN/Inf, checksums")(add_check_args)
def run_check(args: argparse.Namespace) -> int:
    _need_manifest(args.manifest)
    from medseg_diff.stages.data import check_dataset

    def report(case, problems) -> None:
        print(f"{'ok  ' if not problems else 'FAIL'} {case.id}", flush=True)
        for p in problems:
            print(f"     {p}", file=sys.stderr, flush=True)

    manifest, problems = check_dataset(args.manifest, args.root, args.continue_on_error, not args.no_checksums,
                                       on_case=report)
    if problems:
        print(f"{len(problems)} problem(s) in {args.manifest}", file=sys.stderr)
        return 1
    if not manifest.cases:
        print(f"medseg-diff check: error: {args.manifest}: the manifest lists no cases", file=sys.stderr)
        return 2
    print(f"{len(manifest.cases)} cases ok ({args.manifest})")
    return 0


# --- train -------------------------------------------------------------------------------------------


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="YAML config (may 'extends' another)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="start over even if output_dir/last.pt exists")
    p.add_argument("--skip-data-check", action="store_true",
                   help="skip the pre-flight check of the training data (files, grids, values, labels, checksums)")
    p.add_argument("--no-checksums", action="store_true", help="do not verify the files' SHA-256 against the manifest")


@command("train", "train the diffusion model or the baseline (resumes from output_dir/last.pt; torchrun-ready)")(
    add_train_args)
def run_train(args: argparse.Namespace) -> int:
    if not Path(args.config).is_file():
        raise ConfigError("-", "config file not found", args.config)
    from medseg_diff.stages.train import train_config

    cfg, state = train_config(args.config, args.overrides, resume=not args.no_resume,  # config checked first
                              check_data=not args.skip_data_check, verify_checksums=not args.no_checksums)
    best = f"{state.best_metric:.4f} (epoch {state.best_epoch})" if state.best_epoch > 0 else "n/a"
    print(f"finished {state.epoch} epochs; best val Dice {best}; checkpoints in {cfg.experiment.output_dir}; "
          f"MLflow run {state.run_id}")
    return 0


# --- evaluate ----------------------------------------------------------------------------------------


def _named(what: str):
    def parse(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"expected NAME={what}, got {text!r}")
        return name, value

    return parse


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--model", dest="models", action="append", type=_named("CHECKPOINT"), default=[],
                   metavar="NAME=CHECKPOINT",
                   help="a model to predict and evaluate: a checkpoint file or an MLflow model URI "
                        "(models:/NAME/VERSION, runs:/RUN_ID/model); repeatable")
    p.add_argument("--predictions", action="append", type=_named("DIR"), default=[], metavar="NAME=DIR",
                   help="a folder of label maps from any tool (DIR/CASE/CASE_seg.nii.gz, nnU-Net's or a BraTS "
                        "submission's DIR/CASE.nii.gz) in the manifest's label convention; repeatable. "
                        "Models come first, then folders; the first two are compared")
    p.add_argument("--out", type=Path, required=True, help="folder for CSV, tables, plots, predictions, overlays")
    p.add_argument("--subset", choices=("test", "val", "all"), default="test")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--root", type=Path, default=None, help="override the manifest's data root")
    p.add_argument("--lesion-task", default="GLI", help="BraTS task of the lesion-wise metrics (GLI, MET, PED, MEN, GOAT)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the training config's)")
    p.add_argument("--ensemble", type=int, default=None, help="ensemble members (default: the training config's)")
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap in [0, 1) (default: the training config's infer.overlap)")
    add_postprocess_args(p)
    p.add_argument("--export-cases", type=int, default=2, help="clinician overlays for the first N cases of each model")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="score the cases in N processes (each with one torch thread); per_case.csv and every table "
                        "are the same as with 1. Models still predict one case at a time, in this process")
    p.add_argument("--continue-on-error", action="store_true")
    p.add_argument("--prior-dir", type=Path, default=None,
                   help="external mask priors for models trained with prior_source=external")
    p.add_argument("--no-tracking", action="store_true")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the data set's name)")


@command("evaluate", "score models or prediction folders on held-out cases: BraTS global and lesion-wise metrics, "
                     "paired statistics, MLflow, overlays")(add_evaluate_args)
def run_evaluate(args: argparse.Namespace) -> int:
    if not args.models and not args.predictions:
        print("medseg-diff evaluate: error: give --model NAME=CHECKPOINT and/or --predictions NAME=DIR",
              file=sys.stderr)
        return 2
    names = [n for n, _ in args.models + args.predictions]
    if len(set(names)) != len(names):
        print("medseg-diff evaluate: error: model names must differ", file=sys.stderr)
        return 2
    _need_manifest(args.manifest)
    for _, checkpoint in args.models:
        _need_checkpoint(checkpoint)
    _need_tracking_uri(args.tracking_uri, tracking=not args.no_tracking)
    from medseg_diff.stages.evaluate import evaluate
    from medseg_diff.stages.options import Sampling, Scoring, Tracking

    scoring = Scoring(subset=args.subset, fold=args.fold, root=args.root, prior_dir=args.prior_dir,
                      export_cases=args.export_cases, continue_on_error=args.continue_on_error,
                      lesion_task=args.lesion_task, workers=args.workers)
    sampling = Sampling(device=args.device, sample_steps=args.steps, ensemble=args.ensemble, overlap=args.overlap,
                        min_lesion_mm3=args.min_lesion_mm3, min_enhancing_mm3=args.min_enhancing_mm3)
    tracking = Tracking(enabled=not args.no_tracking, uri=args.tracking_uri, experiment=args.experiment)
    report = evaluate(args.manifest, args.out, models=dict(args.models), predictions=dict(args.predictions),
                      scoring=scoring, sampling=sampling, tracking=tracking)
    print(report.summary_markdown)
    for path in report.overlays:
        print(f"overlay report: {path}")
    if report.run_id:
        print(report.mlflow_hint())
    for case, err in report.failed.items():
        print(f"FAILED {case}: {err}", file=sys.stderr)
    return 1 if report.failed else 0


# --- predict -----------------------------------------------------------------------------------------


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file or an MLflow model URI (models:/NAME/VERSION, runs:/RUN_ID/model)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server or store of a model URI")
    p.add_argument("--input", type=Path, default=None,
                   help="a manifest JSON, a data folder, a case folder, or a DICOM study folder (or a folder of them)")
    p.add_argument("--out", type=Path, required=True, help="one sub-folder per case is written here")
    p.add_argument("--subset", choices=("all", "train", "test", "unlabelled"), default="all",
                   help="manifest subset to predict")
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--convention", choices=("brats2021", "brats2023", "msd"), default=None)
    p.add_argument("--prior-dir", type=Path, default=None,
                   help="external mask priors (e.g. the baseline's prediction folders) for prior_source=external")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--ensemble", type=int, default=None)
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap in [0, 1) (default: the training config's infer.overlap)")
    p.add_argument("--seed", type=int, default=None)
    add_postprocess_args(p)
    p.add_argument("--continue-on-error", action="store_true", help="skip and report bad cases")
    p.add_argument("--overwrite", action="store_true",
                   help="replace case folders that hold another model's or run's prediction (whole folders)")
    p.add_argument("--no-checksums", action="store_true",
                   help="with a manifest input: do not verify the files' SHA-256 against it")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="predict only shard I of N (0-based: 0/N .. N-1/N): the cases whose position in the case ids, "
                        "sorted, is I modulo N. N such processes into one --out write every case once (a Slurm "
                        "array: --array=0-(N-1) and --shard $SLURM_ARRAY_TASK_ID/N). Under torchrun the default is "
                        "RANK/WORLD_SIZE, and --device auto is cuda:LOCAL_RANK")
    dicom = p.add_argument_group("DICOM", "DICOM study inputs get a DICOM Segmentation and Parametric Maps in CASE/dicom/")
    dicom.add_argument("--series-rule", type=Path, default=None, metavar="FILE",
                       help="JSON/YAML: modality -> regexes on SeriesDescription (default: the usual descriptions, "
                            "e.g. 'AX T1', 'T1 POST GD', 'AX T2', 'T2 FLAIR')")
    dicom.add_argument("--dicomweb", default=None, metavar="URL",
                       help="instead of --input: the DICOMweb root of a PACS (e.g. http://pacs:8042/dicom-web); the "
                            "study is fetched (WADO-RS), predicted, and its SEG and maps stored back (STOW-RS). "
                            "Credentials: MEDSEG_DICOMWEB_TOKEN or MEDSEG_DICOMWEB_USER/MEDSEG_DICOMWEB_PASSWORD")
    dicom.add_argument("--study", default=None, metavar="STUDY_UID", help="with --dicomweb: the Study Instance UID")
    dicom.add_argument("--no-store", action="store_true", help="with --dicomweb: do not store the results back")


@command("predict", "segment cases: BraTS labels, probabilities, uncertainty and attention on the input grid")(
    add_predict_args)
def run_predict(args: argparse.Namespace) -> int:
    import os

    from medseg_diff.stages.options import Cases, Launch, Sampling, SeriesRule, Shard, Writing  # light: no torch

    if (args.input is None) == (args.dicomweb is None):
        raise DataError(None, "give either --input (files) or --dicomweb URL --study UID (a PACS)")
    if (args.study is not None or args.no_store) and args.dicomweb is None:
        raise DataError(None, "--study and --no-store go with --dicomweb")
    if args.dicomweb is not None and args.study is None:
        raise DataError(None, "--dicomweb needs --study STUDY_UID")
    try:
        shard = Shard.parse(args.shard) if args.shard is not None else None
        launch = Launch.from_environ(os.environ)  # torchrun: one shard per rank, one GPU per local rank
    except ValueError as err:
        raise DataError(None, str(err)) from None
    if launch is not None and launch.shard.count > 1:
        if shard is not None:
            raise DataError(None, f"--shard {shard} under torchrun (WORLD_SIZE={launch.shard.count}): the ranks "
                                  "already split the cases; leave --shard out")
        if args.dicomweb is not None:
            raise DataError(None, f"--dicomweb predicts one study: run it in one process, not under torchrun "
                                  f"(WORLD_SIZE={launch.shard.count})")
        shard = launch.shard
    if shard is not None and args.dicomweb is not None:
        raise DataError(None, "--shard goes with --input (a PACS study is predicted by one process)")
    rule = SeriesRule.from_file(args.series_rule) if args.series_rule is not None else None
    _need_checkpoint(args.checkpoint)
    _need_input(args.input)
    _need_tracking_uri(args.tracking_uri, tracking=False)  # predict fetches model URIs from it; it logs no run
    sampling = Sampling(device=args.device, sample_steps=args.steps, ensemble=args.ensemble, seed=args.seed,
                        overlap=args.overlap, min_lesion_mm3=args.min_lesion_mm3,
                        min_enhancing_mm3=args.min_enhancing_mm3,
                        local_rank=launch.local_rank if launch is not None else 0)
    writing = Writing(overwrite=args.overwrite, continue_on_error=args.continue_on_error)
    cases = Cases(convention=args.convention, prior_dir=args.prior_dir, series_rule=rule)
    if args.dicomweb is not None:
        from medseg_diff.stages.dicomweb import predict_dicomweb

        result = predict_dicomweb(args.checkpoint, args.dicomweb, args.study, args.out, sampling, cases, writing,
                                  store=not args.no_store, tracking_uri=args.tracking_uri)
        print(result.summary())  # the URL without credentials
        return 1 if result.predictions.failed else 0
    from medseg_diff.stages.predict import predict_cases

    cases = replace(cases, subset=args.subset, root=args.root, verify_checksums=not args.no_checksums, shard=shard)
    report = predict_cases(args.checkpoint, args.input, args.out, sampling, cases, writing,
                           tracking_uri=args.tracking_uri)
    print((f"shard {shard}: " if shard is not None else "") + report.summary())
    return 1 if report.failed else 0


# --- export ------------------------------------------------------------------------------------------


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", type=Path, required=True, help="a prediction folder or a folder of them")
    p.add_argument("--out", type=Path, required=True, help="one sub-folder per case (report.html, montage, NIfTI)")
    p.add_argument("--continue-on-error", action="store_true")


@command("export", "clinician overlays of predictions: NIfTI, Slicer/ITK-SNAP colour tables, montage, report.html")(
    add_export_args)
def run_export(args: argparse.Namespace) -> int:
    from medseg_diff.stages.export import export_predictions, prediction_folders

    report = export_predictions(prediction_folders(args.predictions), args.out, args.continue_on_error)
    print(report.summary())
    return 1 if report.failed else 0


# --- export-nnunet -----------------------------------------------------------------------------------


def add_export_nnunet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="the manifest whose train cases, folds and test cases are exported")
    p.add_argument("--out", type=Path, required=True,
                   help="nnU-Net's raw folder (nnUNet_raw): the data set is written to OUT/Dataset<ID>_<NAME>")
    p.add_argument("--dataset-id", type=int, default=137, help="nnU-Net dataset id, 1..999 (default 137)")
    p.add_argument("--name", default=None, help="data set name, Dataset<ID>_<NAME> (default: the manifest's name)")
    p.add_argument("--root", type=Path, default=None, help="override the manifest's data root")
    p.add_argument("--link", choices=("copy", "hardlink", "symlink"), default="copy",
                   help=".nii.gz images are copied (default) or linked; other formats are always written as NIfTI")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set folder of this id and name")


@command("export-nnunet", "write a manifest as an nnU-Net v2 raw data set (region-based BraTS labels) with its folds "
                          "as splits_final.json")(add_export_nnunet_args)
def run_export_nnunet(args: argparse.Namespace) -> int:
    _need_manifest(args.manifest)
    from medseg_diff.stages.nnunet import export_nnunet_dataset

    result = export_nnunet_dataset(args.manifest, args.out, dataset_id=args.dataset_id, name=args.name,
                                   root=args.root, overwrite=args.overwrite, link=args.link)
    print(result.summary())
    return 0


# --- diagnose ----------------------------------------------------------------------------------------


def add_diagnose_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="the model to audit: a checkpoint file or an MLflow model URI (models:/NAME/VERSION)")
    p.add_argument("--manifest", type=Path, required=True, help="the labelled cases to audit on")
    p.add_argument("--out", type=Path, required=True, help="folder for audit.json and audit.md")
    p.add_argument("--subset", choices=("test", "val", "all"), default="test")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--root", type=Path, default=None, help="override the manifest's data root")
    p.add_argument("--max-cases", type=_positive_int, default=None, help="audit only the first N cases")
    p.add_argument("--reference", default=None,
                   help="a U-Net checkpoint: its entropy AUROC on the same cases is the bar for the uncertainty")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampler, the x_t noise and the random occlusion (default: the checkpoint's)")
    p.add_argument("--steps-grid", type=_int_list, default=(1, 2, 4, 10), metavar="K,K,...",
                   help="DDIM steps of the 'does sampling refine' grid (default 1,2,4,10)")
    p.add_argument("--ensemble-grid", type=_int_list, default=(1, 4), metavar="N,N,...",
                   help="ensemble members of that grid (default 1,4)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (turns tracking on; default: the checkpoint's)")
    p.add_argument("--no-tracking", action="store_true", help="do not log the audit to MLflow")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


@command("diagnose", "mechanism audit of a checkpoint: does the denoiser use x_t, does sampling refine, do members "
                     "differ, does the prior steer, do the attention maps look at the tumour (audit.json, audit.md)")(
    add_diagnose_args)
def run_diagnose(args: argparse.Namespace) -> int:
    _need_checkpoint(args.checkpoint)
    _need_manifest(args.manifest)
    _need_tracking_uri(args.tracking_uri, tracking=False)
    from medseg_diff.stages.diagnose import diagnose

    report = diagnose(args.checkpoint, args.manifest, args.out, subset=args.subset, fold=args.fold, root=args.root,
                       max_cases=args.max_cases, reference=args.reference, device=args.device, seed=args.seed,
                       tracking=False if args.no_tracking else None, tracking_uri=args.tracking_uri,
                       steps_grid=args.steps_grid, ensemble_grid=args.ensemble_grid)
    print(report.markdown.split("\n## Details", 1)[0].rstrip())
    print(f"\nwrote {report.out_dir / 'audit.json'} and {report.out_dir / 'audit.md'}")
    if report.run_id:
        print(f"MLflow audit run {report.run_id}")
    return 0


# --- entry point -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from medseg_diff import __version__

    parser = argparse.ArgumentParser(prog="medseg-diff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medseg-diff {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text, parents=[common]))
    return parser


def main(argv: list[str] | None = None) -> int:
    from medseg_diff.runtime import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()  # progress and per-case lines on stderr; results on stdout
    _, _, run = _COMMANDS[args.command]
    prefix = f"medseg-diff {args.command}"
    try:
        return int(run(args) or 0)
    except MedsegError as err:  # bad input (data, config, manifest, checkpoint): 2; an outside service down: 1
        if args.debug:
            raise
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, ServiceError) else 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a runtime fault: full disk, permission, read-only file system, unreachable server
        if args.debug:
            raise
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"{prefix}: error: {where}{err.strerror or err} (nothing half-written was kept; "
              "--debug shows the traceback)", file=sys.stderr)
        return 1
    except ImportError as err:  # an optional dependency (an extra of pyproject.toml) that is not installed
        if args.debug:
            raise
        message = missing_extra(err)
        if message is None:
            print(f"{prefix}: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback, "
                  "and please report it)", file=sys.stderr)
            return 1
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return 2
    except Exception as err:  # anything unexpected: one line, the traceback on request
        if args.debug:
            raise
        print(f"{prefix}: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback, "
              "and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
