"""Prediction of many cases into prediction folders; a bad case is skipped and reported
(``continue_on_error``) instead of ending the run halfway."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medseg_diff.data.conventions import LabelConvention, get_convention
from medseg_diff.data.dataset import case_record, files_record
from medseg_diff.data.discovery import discover
from medseg_diff.data.manifest import load_manifest
from medseg_diff.errors import DataError, MedsegError
from medseg_diff.inference.case import predict_case
from medseg_diff.inference.loading import LoadedModel, load_model
from medseg_diff.inference.prediction_folder import prior_file, write_prediction
from medseg_diff.runtime import pin_reproducibility, resolve_device

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # case -> error message

    def summary(self) -> str:
        lines = [f"{len(self.written)} case(s) written, {len(self.failed)} failed"]
        lines += [f"  FAILED {case}: {err}" for case, err in self.failed.items()]
        return "\n".join(lines)


def input_records(source: str | Path, subset: str = "all", root: str | Path | None = None,
                  convention: str | None = None) -> tuple[LabelConvention, list[dict]]:
    """Records of the cases to predict: from a manifest JSON, or a data folder / single case folder."""
    source = Path(source)
    if source.suffix == ".json":
        manifest = load_manifest(source, root=root)
        cases = manifest.cases if subset == "all" else [c for c in manifest.cases if c.subset == subset]
        return get_convention(manifest.convention), [case_record(manifest, c) for c in cases]
    conv, cases = discover(source, convention)
    records = []
    for case in cases:
        if case.missing:  # reported by name when its turn comes (predict_cases), not silently dropped
            folder = next(iter(case.images.values())).parent if case.images else source
            records.append({"case_id": case.case_id, "missing": case.missing, "folder": str(folder)})
        else:
            records.append(files_record(case))
    return conv, records


def predict_cases(checkpoint: str | Path, source: str | Path, out_dir: str | Path, subset: str = "all",
                  root: str | Path | None = None, convention: str | None = None, prior_dir: str | Path | None = None,
                  device: str = "auto", sample_steps: int | None = None, ensemble: int | None = None,
                  seed: int | None = None, continue_on_error: bool = False, overlap: float | None = None,
                  case_ids: Sequence[str] | None = None, tracking_uri: str | None = None,
                  model: LoadedModel | None = None, name: str | None = None) -> RunReport:
    """Predict every case of ``source`` into ``out_dir/CASE/`` (see ``inference.prediction_folder``).
    ``checkpoint``: a checkpoint file or an MLflow model URI (``models:/NAME/VERSION``, ``runs:/...``)."""
    pin_reproducibility()
    dev = resolve_device(device)
    if model is None:
        model = load_model(checkpoint, dev, sample_steps, ensemble, seed, overlap=overlap, tracking_uri=tracking_uri)
    _check_prior_use(model, prior_dir)  # a model-wide mistake: fail once, before any case
    conv, records = input_records(source, subset, root, convention)
    if case_ids is not None:  # only these, in this order
        by_id = {r["case_id"]: r for r in records}
        records = [by_id[c] for c in case_ids]
    report = RunReport()
    for record in records:
        case = record["case_id"]
        try:
            if "missing" in record:
                raise DataError(record["folder"], f"missing modality {', '.join(record['missing'])}", case=case)
            if prior_dir is not None:
                record = record | {"prior": str(prior_file(Path(prior_dir), case))}
            pred = predict_case(model, record, conv, dev)
            report.written.append(write_prediction(pred, Path(out_dir) / case, name or model.kind, model, conv, record))
            log.info("ok   %s  (%.1f s)", case, pred.seconds)
        except MedsegError as err:
            if not continue_on_error:
                raise
            report.failed[case] = str(err)
            log.warning("FAIL %s: %s", case, err)
    return report


def _check_prior_use(model: LoadedModel, prior_dir: str | Path | None) -> None:
    """``--prior-dir`` is required by, and only by, a model trained with ``prior_source=external``."""
    model.adapter.check_prior(prior_dir is not None, prior_dir if prior_dir is not None else model.checkpoint)
