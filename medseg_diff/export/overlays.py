"""NIfTI overlays on the reference grid, label colour tables, and :func:`export_case`.

Every NIfTI written here has exactly the reference's shape, voxel order, affine and s/q-form codes:
its header is a copy of the reference header with only the data type, the display range
(``cal_min/cal_max``), the intent and the description changed. A viewer therefore lays the outputs
over the input images without any resampling.

Files are written all-or-nothing: each output first goes to a hidden temporary file in ``out_dir``
and only when every output has been written are they renamed (``os.replace``, atomic on POSIX) onto
their final names. A failure leaves the previous outputs and every other file in ``out_dir`` as they were.
"""

from __future__ import annotations

import gzip
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_diff.data.conventions import REGIONS, LabelConvention
from medseg_diff.data.io import read_image
from medseg_diff.errors import DataError
from medseg_diff.export.montage import render_montage
from medseg_diff.export.report import REPORT_NAME, ReportContext, case_of_report, map_definitions, render_report
from medseg_diff.export.types import (
    CaseOverlay,
    ExportResult,
    OutputFile,
    check_name,
    check_overlay,
    label_entries,
)

_GZIP_LEVEL = 1  # a smooth float32 map at 240x240x155: level 1 0.65 s, level 4 1.23 s, size within 1%


@dataclass(frozen=True)
class ReferenceGrid:
    """Geometry of the reference file: what every output copies."""

    path: Path
    shape: tuple[int, int, int]  # [X, Y, Z]
    affine: np.ndarray  # [4, 4] voxel -> world (RAS mm), the header's best affine
    header: nib.Nifti1Header  # template header (NIfTI-1 or NIfTI-2)
    image_class: type

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size in mm along X, Y, Z."""
        return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))


def load_reference_grid(path: Path, case: str | None = None) -> ReferenceGrid:
    """Geometry of the reference: a NIfTI file (its own header), or an MHA/NRRD file or DICOM folder
    (read by :func:`medseg_diff.data.io.read_image`: RAS affine, ``sform``/``qform`` code "scanner")."""
    path = Path(path)
    try:
        image = read_image(path)
    except DataError as err:
        raise DataError(err.path, err.problem, case=case) from err
    klass = nib.Nifti2Image if isinstance(image, nib.Nifti2Image) else nib.Nifti1Image
    header = klass.header_class.from_header(image.header)
    affine = header.get_best_affine()
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(path, f"reference affine is singular or non-finite:\n{affine}", case=case)
    return ReferenceGrid(path, tuple(int(n) for n in image.shape[:3]), affine, header, klass)


def nifti_bytes(grid: ReferenceGrid, data: np.ndarray, description: str, intent: str = "none") -> bytes:
    """gzip-compressed NIfTI of ``data`` ([X, Y, Z] or [X, Y, Z, C]) on the reference grid."""
    header = grid.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    header.set_zooms(grid.header.get_zooms()[:3] + (1.0,) * (data.ndim - 3))
    sform, qform = grid.header.get_sform(), grid.header.get_qform()
    header.set_sform(sform, code=int(grid.header["sform_code"]))
    header.set_qform(qform, code=int(grid.header["qform_code"]))
    header.set_slope_inter(1.0, 0.0)
    header.set_intent(intent)
    header["cal_min"], header["cal_max"] = float(data.min()), float(data.max())
    header["descrip"] = f"medseg-diff {description}".encode("ascii", "replace")[:79]
    image = grid.image_class(data, header.get_best_affine(), header)
    return gzip.compress(image.to_bytes(), compresslevel=_GZIP_LEVEL, mtime=0)


def slicer_colour_table(convention: LabelConvention) -> str:
    """3D Slicer colour table (``.ctbl``): ``index name R G B A`` per line, background included."""
    entries = label_entries(convention)
    lines = [
        f"# Color table file for medseg-diff segmentations, {convention.name} labels",
        f"# {len(entries) + 1} values",
        "# label colours; the montage outlines the nested regions WT/TC/ET in their own colours (ET shares its colour)",
        "0 Background 0 0 0 0",
    ]
    lines += [f"{e.value} {e.short} {e.rgb[0]} {e.rgb[1]} {e.rgb[2]} 255" for e in entries]
    return "\n".join(lines) + "\n"


def itksnap_label_file(convention: LabelConvention) -> str:
    """ITK-SNAP label description file (Segmentation > Import Label Descriptions)."""
    header = [
        "################################################",
        "# ITK-SnAP Label Description File",
        f"# medseg-diff, {convention.name} labels",
        "# File format: ",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields: ",
        "#    IDX:   Zero-based index ",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description ",
        "################################################",
        f"{0:5d} {0:5d} {0:4d} {0:4d} {0:8.2f} {0:2d} {0:2d}    \"Clear Label\"",
    ]
    rows = [
        f"{e.value:5d} {e.rgb[0]:5d} {e.rgb[1]:4d} {e.rgb[2]:4d} {1:8.2f} {1:2d} {1:2d}    \"{e.description}\""
        for e in label_entries(convention)
    ]
    return "\n".join(header + rows) + "\n"


class AtomicBatch:
    """Files staged under hidden temporary names in one folder, renamed into place together.

    ``with AtomicBatch(d) as batch: batch.add(name, data) ...; batch.commit()``; leaving the block
    without ``commit`` (an exception) removes the temporary files and touches nothing else.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)

    def add(self, name: str, data: bytes) -> Path:
        final = self.folder / name
        if final.is_dir():
            raise DataError(final, "an output name is taken by a folder")
        temporary = self.folder / f".{name}.{secrets.token_hex(6)}.partial"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode honours umask
        self._staged.append((temporary, final))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return final

    def commit(self) -> None:
        for temporary, final in self._staged:
            os.replace(temporary, final)
        self._staged.clear()

    def discard(self) -> None:
        for temporary, _ in self._staged:
            temporary.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> "AtomicBatch":
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()


def export_case(overlay: CaseOverlay, out_dir: Path, prefix: str | None = None) -> ExportResult:
    """Write the NIfTI overlays, colour tables, montage PNG and ``report.html`` of one case.

    Files are named ``{prefix}_seg.nii.gz`` etc. (``prefix`` defaults to the case id); the report is
    ``out_dir/report.html``, so use one ``out_dir`` per case. Raises DataError before writing anything
    when the input is unusable (see :func:`check_overlay`), when ``out_dir`` is the folder of the
    reference (outputs could overwrite input files such as ``CASE_seg.nii.gz``), or when
    ``out_dir/report.html`` belongs to another case.
    """
    # 1. validate everything before the first byte is written
    grid, prefix, out_dir = _validated(overlay, out_dir, prefix)
    # 2. stage every file under a temporary name, then rename them all
    with AtomicBatch(out_dir) as batch:
        paths, files = _stage_volumes(batch, overlay, grid, prefix)
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
    from medseg_diff.export.montage import heat_scale
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


def export_volumes(overlay: CaseOverlay, out_dir: Path, prefix: str | None = None) -> dict:
    """Only the NIfTI volumes and colour tables of :func:`export_case` (no montage, no report): what
    ``predict`` writes. Same checks, same all-or-nothing writing; returns the written paths by kind."""
    grid, prefix, out_dir = _validated(overlay, out_dir, prefix)
    with AtomicBatch(out_dir) as batch:
        paths, _ = _stage_volumes(batch, overlay, grid, prefix)
        batch.commit()
    return paths


def _validated(overlay: CaseOverlay, out_dir: Path, prefix: str | None) -> tuple[ReferenceGrid, str, Path]:
    """``(reference grid, file prefix, output folder)`` after every check on the input (nothing written yet)."""
    grid = load_reference_grid(overlay.reference, overlay.case_id)
    check_overlay(overlay, grid.shape)
    prefix = overlay.case_id if prefix is None else prefix
    check_name(prefix, "file prefix (the case id unless `prefix` is given)", overlay.case_id)
    return grid, prefix, _prepare_out_dir(Path(out_dir), overlay)


def _prepare_out_dir(out_dir: Path, overlay: CaseOverlay) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "output folder is a file", case=overlay.case_id)
    reference = Path(overlay.reference).resolve()
    if out_dir.resolve() in (reference, reference.parent):  # a DICOM folder, or the folder of the file
        raise DataError(
            out_dir,
            "output folder is the folder of the input images; outputs such as CASE_seg.nii.gz could "
            "overwrite input files there. Choose another output folder.",
            case=overlay.case_id,
        )
    report = out_dir / REPORT_NAME
    if report.exists():
        previous = case_of_report(report)
        if previous is None:
            raise DataError(report, "exists and was not written by medseg-diff; not overwriting it",
                            case=overlay.case_id)
        if previous != overlay.case_id:
            raise DataError(report, f"belongs to case {previous!r}; use one output folder per case",
                            case=overlay.case_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _stage_volumes(
    batch: AtomicBatch, overlay: CaseOverlay, grid: ReferenceGrid, prefix: str
) -> tuple[dict, list[OutputFile]]:
    """Stage the NIfTI files and colour tables: (ExportResult keyword arguments, files for the report)."""
    model = f"model {overlay.model_name}"
    labels = np.asarray(overlay.labels).astype(np.uint8)
    seg = batch.add(f"{prefix}_seg.nii.gz", nifti_bytes(grid, labels, f"labels {model}", "label"))
    ctbl = batch.add(f"{prefix}_labels.ctbl", slicer_colour_table(overlay.convention).encode("ascii"))
    snap = batch.add(f"{prefix}_labels_itksnap.txt", itksnap_label_file(overlay.convention).encode("ascii"))
    files = [
        OutputFile(seg, f"segmentation: {overlay.convention.name} label values (uint8), coloured by the label "
                        "tables below"),
        OutputFile(ctbl, "label colour table for 3D Slicer"),
        OutputFile(snap, "label descriptions for ITK-SNAP"),
    ]
    paths: dict = {"seg": seg, "slicer_colour_table": ctbl, "itksnap_labels": snap, "attention": {}}
    definitions = map_definitions(overlay)
    if overlay.uncertainty is not None:
        unc = np.asarray(overlay.uncertainty, dtype=np.float32)
        units = overlay.uncertainty_units
        paths["uncertainty"] = batch.add(
            f"{prefix}_uncertainty.nii.gz", nifti_bytes(grid, unc, f"predictive entropy ({units}) {model}")
        )
        files.append(OutputFile(paths["uncertainty"], f"{definitions['uncertainty']} (float32)"))
    if overlay.variance is not None:
        var = np.asarray(overlay.variance, dtype=np.float32)
        paths["variance"] = batch.add(
            f"{prefix}_variance.nii.gz", nifti_bytes(grid, var, f"ensemble member variance {model}")
        )
        files.append(OutputFile(paths["variance"], f"{definitions['variance']} (float32)"))
    for name in overlay.attention:
        att = overlay.normalised_attention(name)
        path = batch.add(f"{prefix}_attention_{name}.nii.gz", nifti_bytes(grid, att, f"attention {name} 0-1 {model}"))
        paths["attention"][name] = path
        files.append(OutputFile(path, f"'{name}' attention map: {definitions['attention_' + name]} (float32)"))
    if overlay.probabilities is not None:
        probs = np.moveaxis(np.asarray(overlay.probabilities, dtype=np.float32), 0, -1)
        order = "/".join(REGIONS)
        paths["probabilities"] = batch.add(
            f"{prefix}_probabilities.nii.gz", nifti_bytes(grid, probs, f"region probabilities {order} {model}")
        )
        files.append(OutputFile(paths["probabilities"], f"region probabilities, 4D, volumes {order} in this "
                                                        "order (float32)"))
    return paths, files
