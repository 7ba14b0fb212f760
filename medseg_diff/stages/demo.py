"""``make demo``: the whole pipeline on synthetic phantoms, on a laptop CPU, in minutes.

1. synthesise BraTS-like phantoms (MNI152 anatomy + grown tumours) and their manifest
2. train the plain 3D U-Net and the diffusion model with the same data, loss, optimiser and budget
3. evaluate both on held-out phantoms (BraTS metrics, paired statistics, uncertainty, timing)
4. everything is logged to MLflow (sqlite:///mlflow.db here); overlays for two cases
5. DICOM: a held-out phantom written as an MR study (one series per modality, as a scanner exports it) is
   segmented by the diffusion model into a DICOM Segmentation and Parametric Maps, ready for a PACS
6. print the summary table, the report paths, the DICOM files and the ``mlflow ui`` command
"""

from __future__ import annotations

import time
from pathlib import Path

from medseg_diff.config import load_config
from medseg_diff.data.io import read_image
from medseg_diff.data.manifest import build_manifest, load_manifest, write_manifest
from medseg_diff.data.synth import synthesize
from medseg_diff.predictions import layout
from medseg_diff.stages.evaluate import evaluate
from medseg_diff.stages.options import Scoring, Tracking
from medseg_diff.training.run import train
from medseg_diff.tracking import compare_runs_url, resolve_uri, runs_table_url

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"


def run_demo(out: str | Path = "demo_out", cases: int = 20, spacing: float = 3.0, seed: int = 0,
             config: str | Path = DEMO_CONFIG, overrides: list[str] | None = None, export_cases: int = 2,
             tracking_uri: str | None = None) -> dict:
    """Run the demo into ``out``; returns paths and figures for the caller to print."""
    out = Path(out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # 1. data
    data = out / "data"
    if not (data / "manifest.json").exists():
        # one process: 20 phantoms at 3 mm take 7.6 s here, against 10.7 s in 2 spawned workers that import the
        # package again (2 CPU cores, warm; cold, after a fresh set-up, more); the phantoms are the same either way
        synthesize(data, cases=cases, spacing=spacing, seed=seed, layout="brats2021", workers=1, progress=True)
        manifest = build_manifest(data, name="synthetic-brats", convention="brats2021", folds=5,
                                  test_fraction=0.3, seed=seed)
        write_manifest(manifest, data / "manifest.json")
    timings["synthesis_s"] = time.perf_counter() - start
    # 2. train both models with the same budget
    checkpoints = {}
    uri = tracking_uri or resolve_uri(None)
    for kind in ("diffusion", "unet"):
        t0 = time.perf_counter()
        cfg = load_config(config, [f"model.kind={kind}", f"data.manifest={data / 'manifest.json'}",
                                   f"experiment.output_dir={out / 'runs' / kind}", f"tracking.uri={uri}",
                                   *(overrides or [])])
        train(cfg)
        checkpoints[kind] = out / "runs" / kind / "best.pt"
        timings[f"train_{kind}_s"] = time.perf_counter() - t0
    # 3.-4. evaluate on held-out phantoms, MLflow, overlays
    t0 = time.perf_counter()
    report = evaluate(data / "manifest.json", out / "evaluation", models=checkpoints,
                      scoring=Scoring(subset="test", export_cases=export_cases), tracking=Tracking(uri=uri))
    timings["evaluate_s"] = time.perf_counter() - t0
    # 5. DICOM in, DICOM out
    t0 = time.perf_counter()
    dicom_files = dicom_round_trip(data / "manifest.json", out / "dicom", checkpoints["diffusion"])
    timings["dicom_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    return {"report": report, "timings": timings, "tracking_uri": uri, "experiment_id": report.experiment_id or "0",
            "dicom_files": dicom_files}


def dicom_round_trip(manifest_path: Path, out: Path, checkpoint: Path) -> list[Path]:
    """The first held-out phantom as a DICOM MR study (``out/study``), predicted into ``out/predictions``: returns
    the DICOM Segmentation and Parametric Maps written for it (``CASE/dicom/*.dcm``)."""
    from medseg_diff.dicom import write_phantom_study
    from medseg_diff.stages.predict import predict_cases

    manifest = load_manifest(manifest_path)
    case = next(c for c in manifest.cases if c.subset == "test")
    study = out / "study"
    if not study.exists():  # the study never changes for a given manifest; a rerun reuses it
        images = {m: read_image(manifest.root / path) for m, path in case.images.items()}
        write_phantom_study(images, study, patient_id=case.id.replace("_", "-"))
    report = predict_cases(checkpoint, study, out / "predictions")
    return sorted(p for folder in report.written for p in (folder / layout.DICOM_FOLDER).glob("*.dcm"))


def print_summary(result: dict) -> None:
    report, timings, uri = result["report"], result["timings"], result["tracking_uri"]
    print("\n" + report.summary_markdown)
    print("Timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"\nPer-case metrics: {report.out_dir / 'per_case.csv'}")
    for path in report.overlays:
        print(f"Clinician report: {path}")
    for path in result.get("dicom_files", []):
        print(f"DICOM for a PACS: {path}")
    ui, experiment = "http://127.0.0.1:5000", result["experiment_id"]
    print(f"MLflow evaluation run: {report.run_id}\nReview it:  mlflow ui --backend-store-uri {uri}   then open\n"
          f"  the two models side by side:  {compare_runs_url(ui, list(report.model_run_ids.values()), [experiment])}\n"
          f"  the paired comparison, tables and plots:  {ui}/#/experiments/{experiment}/runs/{report.run_id}\n"
          f"  every run of the data set:  {runs_table_url(ui, experiment)}")
