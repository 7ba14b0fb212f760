"""Clinician overlays of one case: NIfTI on the original grid, colour tables, PNG montage, HTML report.
This package's public face; the prediction in memory and its volumes are ``predictions``', Dice is ``evaluation``'s.

``export_case(CaseOverlay(...), out_dir)`` writes ``{case}_seg.nii.gz``, ``{case}_uncertainty.nii.gz``,
``{case}_variance.nii.gz`` (diffusion ensembles), ``{case}_attention_{name}.nii.gz``,
``{case}_probabilities.nii.gz``, ``{case}_labels.ctbl`` (3D Slicer), ``{case}_labels_itksnap.txt`` (ITK-SNAP),
``{case}_montage.png`` and ``report.html``.
"""

from medseg_diff.export.montage import MontageRow, RenderedMontage, montage_rows, render_montage
from medseg_diff.export.scales import HeatScale, heat_rgba, heat_scale
from medseg_diff.export.slices import Panel, display_slice, largest_lesion, montage_panels, montage_slices
from medseg_diff.data.vocabulary import label_entries
from medseg_diff.evaluation.metrics import dice_scores
from medseg_diff.export.overlays import export_case
from medseg_diff.export.report import map_definitions, region_volumes_cm3, render_report
from medseg_diff.export.types import ExportResult
from medseg_diff.predictions.types import CaseOverlay, Provenance
from medseg_diff.predictions.volumes import (
    ReferenceGrid,
    itksnap_label_file,
    load_reference_grid,
    slicer_colour_table,
)

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
