"""The export stage: clinician overlays of prediction folders (``medseg-diff export``); a bad folder is skipped
and reported (``continue_on_error``) instead of ending the run halfway."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from medseg_diff.data.transforms import LABEL
from medseg_diff.errors import DataError, MedsegError
from medseg_diff.evaluation.metrics import dice_scores
from medseg_diff.export import export_case
from medseg_diff.ownership import folder_lock
from medseg_diff.predictions import layout
from medseg_diff.predictions.folder import read_prediction
from medseg_diff.predictions.types import CaseOverlay
from medseg_diff.stages.report import RunReport

log = logging.getLogger(__name__)


def read_for_export(folder: Path) -> CaseOverlay:
    """A prediction folder as the export shows it: with Dice against the case's label file when it names one."""
    overlay, meta = read_prediction(folder)
    if overlay.ground_truth is None:
        return overlay
    label = meta.inputs[LABEL]
    source = (f"computed when this report was made, from {layout.seg(overlay.case_id)} of the prediction folder "
              f"against the case's label file {label} (not taken from an evaluation run)")
    return replace(overlay, dice=dice_scores(overlay.labels, overlay.ground_truth, overlay.convention),
                   dice_source=source)


def export_predictions(pred_dirs: list[Path], out_dir: str | Path, continue_on_error: bool = False) -> RunReport:
    """Clinician overlays (NIfTI, colour tables, montage, report.html) of prediction folders, written under the
    lock of ``out_dir`` (a second export into a live folder is refused, its holder named)."""
    report = RunReport()
    with folder_lock(out_dir):
        for folder in pred_dirs:
            try:
                overlay = read_for_export(folder)
                result = export_case(overlay, Path(out_dir) / overlay.case_id)
                report.written.append(result.report)
                log.info("ok   %s -> %s", overlay.case_id, result.report)
            except MedsegError as err:
                if not continue_on_error:
                    raise
                report.failed[folder.name] = str(err)
                log.warning("FAIL %s: %s", folder.name, err)
    return report


def prediction_folders(path: str | Path) -> list[Path]:
    """``path`` itself when it is a prediction folder, else its sub-folders that are."""
    found = layout.prediction_folders(Path(path))
    if not found:
        raise DataError(path, f"no prediction folders (CASE/{layout.META}) here; run predict first")
    return found
