"""The clinician export of one case, :func:`export_case`: the prediction's volumes and colour tables
(``predictions.volumes``: on the reference grid, all-or-nothing), the montage PNG and ``report.html``, written
together."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_diff.data.conventions import REGIONS
from medseg_diff.errors import DataError
from medseg_diff.export.montage import render_montage
from medseg_diff.export.report import REPORT_NAME, ReportContext, case_of_report, map_definitions, render_report
from medseg_diff.export.types import ExportResult, OutputFile
from medseg_diff.data.vocabulary import label_entries
from medseg_diff.predictions.types import CaseOverlay
from medseg_diff.predictions.volumes import AtomicBatch, stage_volumes, validated


def export_case(overlay: CaseOverlay, out_dir: Path, prefix: str | None = None) -> ExportResult:
    """Write the NIfTI overlays, colour tables, montage PNG and ``report.html`` of one case.

    Files are named ``{prefix}_seg.nii.gz`` etc. (``prefix`` defaults to the case id); the report is
    ``out_dir/report.html``, so use one ``out_dir`` per case. Raises DataError before writing anything
    when the input is unusable (see :func:`check_overlay`), when ``out_dir`` is the folder of the
    reference (outputs could overwrite input files such as ``CASE_seg.nii.gz``), or when
    ``out_dir/report.html`` belongs to another case.
    """
    # 1. validate everything before the first byte is written
    grid, prefix, out_dir = validated(overlay, out_dir, prefix, _check_report)
    # 2. stage every file under a temporary name, then rename them all
    with AtomicBatch(out_dir) as batch:
        paths = stage_volumes(batch, overlay, grid, prefix)
        files = _listed(paths, overlay)
        montage = render_montage(overlay, grid.affine)
        paths["montage"] = batch.add(f"{prefix}_montage.png", montage.png)
        files.append(OutputFile(paths["montage"], "PNG montage: axial, coronal and sagittal slices through the "
                                                  "largest predicted lesion (the picture in this report)"))
        context = ReportContext(
            montage_png=montage.png,
            files=files,
            voxel_volume_mm3=grid.voxel_volume_mm3,
            voxel_size_mm=grid.zooms,
            axcodes="".join(nib.aff2axcodes(grid.affine)),
            shape=grid.shape,
            montage_rows=montage.rows,
            out_dir=out_dir,
            viewer_html=viewer_html(overlay, grid.affine),
        )
        paths["report"] = batch.add(REPORT_NAME, render_report(overlay, context).encode("utf-8"))
        batch.commit()
    return ExportResult(out_dir=out_dir, **paths)


def viewer_html(overlay: CaseOverlay, affine: np.ndarray) -> str:
    """The report's interactive NiiVue viewer (``export.viewer``; a note saying why when NiiVue is not installed):
    every modality as underlay, the labels in their table colours, and the maps on the montage's scales: attention
    only inside the brain and above the brain mean; entropy and variance on their fixed, absolute scales (values
    above the top are drawn in the top colour)."""
    from medseg_diff.export.scales import heat_scale
    from medseg_diff.export.viewer import HeatMap, viewer_section

    definitions = map_definitions(overlay)
    brain = overlay.brain_mask
    maps = []
    for name in overlay.attention:
        scale = heat_scale(overlay, "attention", name)
        values = np.where(brain, overlay.relative_attention(name), 0.0).astype(np.float32)
        maps.append(HeatMap(f"attention: {name}", values, scale.low, scale.top, "\u00d7 the brain's average",
                            f"{definitions[f'attention_{name}']}; coloured only inside the brain where above the "
                            f"brain's average (1\u00d7), fixed scale 1\u00d7 to {scale.top:g}\u00d7 for every model "
                            f"and case, values \u2265 {scale.top:g}\u00d7 in the top colour", "inferno"))
    for kind, values in (("uncertainty", overlay.uncertainty), ("variance", overlay.variance)):
        if values is not None:
            scale = heat_scale(overlay, kind)
            units = overlay.uncertainty_units if kind == "uncertainty" else "probability\u00b2"
            maps.append(HeatMap(kind, np.asarray(values, dtype=np.float32), scale.low, scale.top, units,
                                f"{definitions[kind]}; fixed scale 0 to {scale.top:.3g} for every model and case, "
                                f"values \u2265 {scale.top:.3g} in the top colour", "viridis"))
    colours = [(e.value, e.description, e.rgb) for e in label_entries(overlay.convention)]
    return viewer_section(overlay.images, overlay.labels, colours, maps, affine, grey=overlay.grey_modality)


def _check_report(out_dir: Path, overlay: CaseOverlay) -> None:
    """Refuse an output folder whose ``report.html`` is not this package's, or another case's."""
    report = out_dir / REPORT_NAME
    if report.exists():
        previous = case_of_report(report)
        if previous is None:
            raise DataError(report, "exists and was not written by medseg-diff; not overwriting it",
                            case=overlay.case_id)
        if previous != overlay.case_id:
            raise DataError(report, f"belongs to case {previous!r}; use one output folder per case",
                            case=overlay.case_id)


def _listed(paths: dict, overlay: CaseOverlay) -> list[OutputFile]:
    """The staged volumes and tables as the report lists them, in the order staged."""
    definitions = map_definitions(overlay)
    files = [
        OutputFile(paths["seg"], f"segmentation: {overlay.convention.name} label values (uint8), coloured by the "
                                 "label tables below"),
        OutputFile(paths["slicer_colour_table"], "label colour table for 3D Slicer"),
        OutputFile(paths["itksnap_labels"], "label descriptions for ITK-SNAP"),
    ]
    if "uncertainty" in paths:
        files.append(OutputFile(paths["uncertainty"], f"{definitions['uncertainty']} (float32)"))
    if "variance" in paths:
        files.append(OutputFile(paths["variance"], f"{definitions['variance']} (float32)"))
    for name, path in paths["attention"].items():
        files.append(OutputFile(path, f"'{name}' attention map: {definitions['attention_' + name]} (float32)"))
    if "probabilities" in paths:
        order = "/".join(REGIONS)
        files.append(OutputFile(paths["probabilities"], f"region probabilities, 4D, volumes {order} in this "
                                                        "order (float32)"))
    return files
