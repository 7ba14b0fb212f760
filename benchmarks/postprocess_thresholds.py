"""Issue 19, item 3: choosing the BraTS post-processing defaults (``inference.postprocess``) from measurements.

For every predicted label map of a demo run (``DEMO_OUT/evaluation/predictions/{diffusion,unet}/CASE``, the 6
held-out phantoms at 3 mm) and, when ``../shared`` is present, the demo models' predictions of the one real case
with a reference (BraTS-GLI-99999-000 at 1 mm, predicted at the models' trained grid; its reference is a model's
output, not expert labels), the label map is post-processed with each pair of thresholds and scored: global Dice
(mean of TC/WT/ET), the penalised lesion-wise Dice (BraTS 2023 ranking: a missed or invented lesion scores 0) and
the lesion detection F1, both means of TC/WT/ET (GLI settings).

    .venv/bin/python -m benchmarks.postprocess_thresholds [DEMO_OUT]    # default demo_out (after make demo)
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

from medseg_diff.data.conventions import get_convention
from medseg_diff.data.io import read_array, read_image
from medseg_diff.data.manifest import load_manifest
from medseg_diff.evaluation.lesionwise import lesionwise_metrics
from medseg_diff.evaluation.metrics import dice
from medseg_diff.inference.postprocess import postprocess

MIN_LESION_MM3 = (0, 50, 100, 250, 500, 1000)
MIN_ENHANCING_MM3 = (0, 100, 250, 500)
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
REAL_CASE = "BraTS-GLI-99999-000"


def scores(labels: np.ndarray, truth: np.ndarray, conv, spacing) -> tuple[float, float, float]:
    """(global Dice, penalised lesion-wise Dice, lesion F1), each the mean of TC/WT/ET."""
    pred, ref = conv.to_regions(labels), conv.to_regions(truth)
    lesions = lesionwise_metrics(pred, ref, spacing, task="GLI")
    return (float(np.mean([dice(pred[i], ref[i]) for i in range(3)])),
            float(np.mean([m.dice_penalized for m in lesions.values()])),
            float(np.mean([m.f1 for m in lesions.values()])))


def phantom_cases(demo_out: Path):
    """``(set, model, labels, truth, convention, spacing)`` of the demo's held-out predictions."""
    manifest = load_manifest(demo_out / "data" / "manifest.json")
    conv = get_convention(manifest.convention)
    for case in (c for c in manifest.cases if c.subset == "test"):
        truth, _ = read_array(manifest.path_of(case.label))
        spacing = tuple(float(z) for z in read_image(manifest.path_of(case.label)).header.get_zooms()[:3])
        for model in ("diffusion", "unet"):
            seg = demo_out / "evaluation" / "predictions" / model / case.id / f"{case.id}_seg.nii.gz"
            yield "phantoms", model, read_array(seg)[0].astype(np.uint8), truth.astype(np.uint8), conv, spacing


def real_cases(demo_out: Path):
    """The demo models' predictions of the real case with a reference (at their trained grid)."""
    if not (REAL / REAL_CASE).is_dir():
        return
    from medseg_diff.data.dataset import files_record
    from medseg_diff.data.discovery import discover
    from medseg_diff.inference.case import predict_case
    from medseg_diff.inference.loading import load_model

    conv, found = discover(REAL, None)
    record = files_record(next(c for c in found if c.case_id == REAL_CASE))
    for model in ("diffusion", "unet"):
        pred = predict_case(load_model(demo_out / "runs" / model / "best.pt", "cpu"), record, conv, None)
        yield "real", model, pred.labels, pred.ground_truth, conv, tuple(float(s) for s in pred.spacing)


def main() -> None:
    demo_out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out")
    table: dict[tuple, list[tuple[float, float, float]]] = {}
    for group, model, labels, truth, conv, spacing in itertools.chain(phantom_cases(demo_out), real_cases(demo_out)):
        voxel = float(np.prod(spacing))
        for lesion, enhancing in itertools.product(MIN_LESION_MM3, MIN_ENHANCING_MM3):
            out, _ = postprocess(labels, conv, voxel, lesion, enhancing)
            table.setdefault((group, model, lesion, enhancing), []).append(scores(out, truth, conv, spacing))
    print("| cases | model | min lesion mm³ | min ET mm³ | n | Dice | lesion Dice (penalised) | lesion F1 |")
    print("|---|---|---|---|---|---|---|---|")
    for (group, model, lesion, enhancing), values in table.items():
        d, p, f = np.mean(values, axis=0)
        print(f"| {group} | {model} | {lesion} | {enhancing} | {len(values)} | {d:.3f} | {p:.3f} | {f:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
