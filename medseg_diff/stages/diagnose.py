"""The diagnose stage: the mechanism audit of a checkpoint or a registered model (``audit.run_audit``)."""

from __future__ import annotations

import functools
from pathlib import Path

from medseg_diff.audit.run import AuditReport, run_audit
from medseg_diff.stages.models import load_model


def diagnose(checkpoint: str | Path, manifest: str | Path, out_dir: str | Path, tracking_uri: str | None = None,
             **options) -> AuditReport:
    """``run_audit`` of ``checkpoint`` (a file or an MLflow model URI, fetched from ``tracking_uri``); ``options``
    are ``run_audit``'s (subset, fold, root, max_cases, reference, device, seed, tracking, grids)."""
    return run_audit(checkpoint, manifest, out_dir, tracking_uri=tracking_uri,
                     loader=functools.partial(load_model, tracking_uri=tracking_uri), **options)
