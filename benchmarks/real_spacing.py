"""Issue 19, item 1: a model predicts at the voxel size it was trained at. On the one real case in ../shared with a
reference (BraTS-GLI-99999-000, 1 mm; its reference is a model's output, not expert labels), the demo's two checkpoints
predict at their trained grid (what loading does now) and at the input's own 1 mm (what predict did before):
Dice TC/WT/ET and the number of whole-tumour components.

    .venv/bin/python -m benchmarks.real_spacing [DEMO_OUT]      # default demo_out (after make demo)
"""
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg_diff.data.dataset import files_record
from medseg_diff.data.discovery import discover
from medseg_diff.evaluation.metrics import dice
from medseg_diff.inference.case import predict_case
from medseg_diff.inference.loading import load_model

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
CASE = "BraTS-GLI-99999-000"
CUBE = np.ones((3, 3, 3))


def at_native_grid(model):
    """The model as predict used it before issue 19 when its config said ``data.spacing: null``."""
    return dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, data=dataclasses.replace(model.cfg.data,
                                                                                                 spacing=None)))


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out") / "runs"
    conv, cases = discover(REAL, None)
    record = files_record(next(c for c in cases if c.case_id == CASE))
    for kind in ("diffusion", "unet"):
        trained = load_model(runs / kind / "best.pt", "cpu")
        for label, model in (("trained grid", trained), ("input's 1 mm (before)", at_native_grid(trained))):
            t0 = time.time()
            pred = predict_case(model, record, conv, None)
            regions, truth = conv.to_regions(pred.labels), conv.to_regions(pred.ground_truth)
            d = [dice(regions[i], truth[i]) for i in range(3)]
            parts = ndimage.label(regions[1], structure=CUBE)[1]
            print(f"{kind:9s} {label:22s} spacing {model.cfg.data.spacing}: Dice TC/WT/ET "
                  f"{d[0]:.3f}/{d[1]:.3f}/{d[2]:.3f} (mean {np.mean(d):.3f}); WT components {parts} (reference "
                  f"{ndimage.label(truth[1], structure=CUBE)[1]}); {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
