"""Clinician overlays of prediction folders (``medseg-diff export``); a bad folder is skipped and reported
(``continue_on_error``) instead of ending the run halfway."""

from __future__ import annotations

import logging
from pathlib import Path

from medseg_diff.errors import DataError, MedsegError
from medseg_diff.export import export_case
from medseg_diff.inference.prediction_folder import read_prediction
from medseg_diff.inference.run import RunReport

log = logging.getLogger(__name__)


def export_predictions(pred_dirs: list[Path], out_dir: str | Path, continue_on_error: bool = False) -> RunReport:
    """Clinician overlays (NIfTI, colour tables, montage, report.html) of prediction folders."""
    report = RunReport()
    for folder in pred_dirs:
        try:
            overlay, _ = read_prediction(folder)
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
    path = Path(path)
    if (path / "prediction.json").exists():
        return [path]
    found = sorted(p.parent for p in path.glob("*/prediction.json"))
    if not found:
        raise DataError(path, "no prediction folders (CASE/prediction.json) here; run predict first")
    return found
