"""Clinician overlays of one case: NIfTI on the original grid, colour tables, PNG montage, HTML report.

``export_case(CaseOverlay(...), out_dir)`` writes ``{case}_seg.nii.gz``, ``{case}_uncertainty.nii.gz``,
``{case}_variance.nii.gz`` (diffusion ensembles), ``{case}_attention_{name}.nii.gz``,
``{case}_probabilities.nii.gz``, ``{case}_labels.ctbl`` (3D Slicer), ``{case}_labels_itksnap.txt`` (ITK-SNAP),
``{case}_montage.png`` and ``report.html``.
"""

from medseg_diff.export.montage import (
    HeatScale,
    MontageRow,
    Panel,
    RenderedMontage,
    display_slice,
    heat_rgba,
    heat_scale,
    largest_lesion,
    montage_panels,
    montage_rows,
    montage_slices,
    render_montage,
)
from medseg_diff.export.overlays import (
    ReferenceGrid,
    export_case,
    itksnap_label_file,
    load_reference_grid,
    slicer_colour_table,
)
from medseg_diff.export.report import dice_scores, map_definitions, region_volumes_cm3, render_report
from medseg_diff.export.types import CaseOverlay, ExportResult, Provenance, label_entries

__all__ = [
    "CaseOverlay",
    "ExportResult",
    "HeatScale",
    "MontageRow",
    "Panel",
    "Provenance",
    "ReferenceGrid",
    "RenderedMontage",
    "dice_scores",
    "display_slice",
    "export_case",
    "heat_rgba",
    "heat_scale",
    "itksnap_label_file",
    "label_entries",
    "largest_lesion",
    "load_reference_grid",
    "map_definitions",
    "montage_panels",
    "montage_rows",
    "montage_slices",
    "region_volumes_cm3",
    "render_montage",
    "render_report",
    "slicer_colour_table",
]
