"""Batch prediction and export over many cases; a bad case is skipped and reported
(``continue_on_error``) instead of ending the run halfway."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medseg_diff.data.conventions import LabelConvention, get_convention
from medseg_diff.data.dataset import case_record, files_record
from medseg_diff.data.discovery import discover
from medseg_diff.data.manifest import load_manifest
from medseg_diff.engine.distributed import resolve_device
from medseg_diff.engine.predict_api import LoadedModel, load_model, predict_case
from medseg_diff.engine.predictions import prior_file, read_prediction, write_prediction
from medseg_diff.errors import DataError, MedsegError


@dataclass
class BatchReport:
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
                  seed: int | None = None, continue_on_error: bool = False, overlap: float | None = None
                  ) -> BatchReport:
    """Predict every case of ``source`` into ``out_dir/CASE/`` (see ``engine.predictions``)."""
    dev = resolve_device(device)
    model = load_model(checkpoint, dev, sample_steps, ensemble, seed, overlap=overlap)
    _check_prior_use(model, prior_dir)  # a model-wide mistake: fail once, before any case
    conv, records = input_records(source, subset, root, convention)
    report = BatchReport()
    for record in records:
        case = record["case_id"]
        try:
            if "missing" in record:
                raise DataError(record["folder"], f"missing modality {', '.join(record['missing'])}", case=case)
            if prior_dir is not None:
                record = record | {"prior": str(prior_file(Path(prior_dir), case))}
            pred = predict_case(model, record, conv, dev)
            report.written.append(write_prediction(pred, Path(out_dir) / case, model.kind, model, conv, record))
            print(f"ok   {case}  ({pred.seconds:.1f} s)", flush=True)
        except MedsegError as err:
            if not continue_on_error:
                raise
            report.failed[case] = str(err)
            print(f"FAIL {case}: {err}", flush=True)
    return report


def _check_prior_use(model: LoadedModel, prior_dir: str | Path | None) -> None:
    """``--prior-dir`` is required by, and only by, a model trained with ``prior_source=external``."""
    source = model.cfg.model.denoiser.prior_source if model.kind == "diffusion" else "none (a U-Net)"
    if model.needs_prior and prior_dir is None:
        raise DataError(model.checkpoint, "this model was trained with prior_source=external and needs a mask "
                                          "prior per case: pass --prior-dir (e.g. the baseline's prediction folders)")
    if prior_dir is not None and not model.needs_prior:
        raise DataError(prior_dir, f"--prior-dir given, but the model {model.checkpoint} takes no external prior "
                                   f"(prior_source: {source}); predict without --prior-dir")


def export_predictions(pred_dirs: list[Path], out_dir: str | Path, continue_on_error: bool = False) -> BatchReport:
    """Clinician overlays (NIfTI, colour tables, montage, report.html) of prediction folders."""
    from medseg_diff.export import export_case

    report = BatchReport()
    for folder in pred_dirs:
        try:
            overlay, _ = read_prediction(folder)
            result = export_case(overlay, Path(out_dir) / overlay.case_id)
            report.written.append(result.report)
            print(f"ok   {overlay.case_id} -> {result.report}", flush=True)
        except MedsegError as err:
            if not continue_on_error:
                raise
            report.failed[folder.name] = str(err)
            print(f"FAIL {folder.name}: {err}", flush=True)
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
