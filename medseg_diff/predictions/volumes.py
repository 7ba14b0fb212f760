"""A prediction's volumes on disk: NIfTI on the reference grid, the label colour tables, written all-or-nothing.

Every NIfTI written here has exactly the reference's shape, voxel order, affine and s/q-form codes: its header is a
copy of the reference header with only the data type, the display range (``cal_min/cal_max``), the intent and the
description changed. A viewer therefore lays the outputs over the input images without any resampling.

Files are written all-or-nothing: each output first goes to a hidden temporary file in the folder and only when every
output has been written are they renamed (``os.replace``, atomic on POSIX) onto their final names. A failure leaves
the previous outputs and every other file in the folder as they were.
"""

from __future__ import annotations

import gzip
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_diff.data.conventions import REGIONS, LabelConvention
from medseg_diff.data.io import read_image
from medseg_diff.data.vocabulary import label_entries
from medseg_diff.errors import DataError
from medseg_diff.predictions import layout
from medseg_diff.predictions.types import CaseOverlay, check_name, check_overlay

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


def nifti_bytes(grid: ReferenceGrid, data: np.ndarray, description: str, intent: str = "none",
                window: tuple[float, float] | None = None) -> bytes:
    """gzip-compressed NIfTI of ``data`` ([X, Y, Z] or [X, Y, Z, C]) on the reference grid; ``window`` is the
    display range stored as ``cal_min``/``cal_max`` (default: the data's minimum and maximum)."""
    header = grid.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    header.set_zooms(grid.header.get_zooms()[:3] + (1.0,) * (data.ndim - 3))
    sform, qform = grid.header.get_sform(), grid.header.get_qform()
    header.set_sform(sform, code=int(grid.header["sform_code"]))
    header.set_qform(qform, code=int(grid.header["qform_code"]))
    header.set_slope_inter(1.0, 0.0)
    header.set_intent(intent)
    header["cal_min"], header["cal_max"] = window if window is not None else (float(data.min()), float(data.max()))
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


def validated(overlay: CaseOverlay, out_dir: Path, prefix: str | None,
              check_out_dir: Callable[[Path, CaseOverlay], None] | None = None) -> tuple[ReferenceGrid, str, Path]:
    """``(reference grid, file prefix, output folder)`` after every check on the input (nothing written yet);
    ``check_out_dir``: a further check of an existing output folder (the export's report), made before it is
    created."""
    grid = load_reference_grid(overlay.reference, overlay.case_id)
    check_overlay(overlay, grid.shape)
    prefix = overlay.case_id if prefix is None else prefix
    check_name(prefix, "file prefix (the case id unless `prefix` is given)", overlay.case_id)
    return grid, prefix, _prepare_out_dir(Path(out_dir), overlay, check_out_dir)


def _prepare_out_dir(out_dir: Path, overlay: CaseOverlay, check_out_dir) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "output folder is a file", case=overlay.case_id)
    reference = Path(overlay.reference).resolve()
    if out_dir.resolve() in (reference, reference.parent):  # a DICOM folder, or the folder of the file
        raise DataError(
            out_dir,
            f"output folder is the folder of the input images; outputs such as {layout.seg('CASE')} could "
            "overwrite input files there. Choose another output folder.",
            case=overlay.case_id,
        )
    if check_out_dir is not None:
        check_out_dir(out_dir, overlay)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_volumes(overlay: CaseOverlay, out_dir: Path, prefix: str | None = None) -> dict:
    """The NIfTI volumes and colour tables of a case (what ``predict`` writes; ``export`` adds a montage and a
    report): every check first, then all-or-nothing writing; returns the written paths by kind (see
    :func:`stage_volumes`)."""
    grid, prefix, out_dir = validated(overlay, out_dir, prefix)
    with AtomicBatch(out_dir) as batch:
        paths = stage_volumes(batch, overlay, grid, prefix)
        batch.commit()
    return paths


def stage_volumes(batch: AtomicBatch, overlay: CaseOverlay, grid: ReferenceGrid, prefix: str) -> dict:
    """Stage the NIfTI files and colour tables; returns the paths by kind, in the order staged: ``seg``,
    ``slicer_colour_table``, ``itksnap_labels``, then when present ``uncertainty``, ``variance``, ``attention``
    (name -> path) and ``probabilities``."""
    model = f"model {overlay.model_name}"
    labels = np.asarray(overlay.labels).astype(np.uint8)
    paths: dict = {
        "seg": batch.add(layout.seg(prefix), nifti_bytes(grid, labels, f"labels {model}", "label")),
        "slicer_colour_table": batch.add(layout.slicer_table(prefix),
                                         slicer_colour_table(overlay.convention).encode("ascii")),
        "itksnap_labels": batch.add(layout.itksnap_table(prefix),
                                    itksnap_label_file(overlay.convention).encode("ascii")),
        "attention": {},
    }
    if overlay.uncertainty is not None:
        unc = np.asarray(overlay.uncertainty, dtype=np.float32)
        units = overlay.uncertainty_units
        paths["uncertainty"] = batch.add(layout.volume(prefix, layout.UNCERTAINTY),
                                         nifti_bytes(grid, unc, f"predictive entropy ({units}) {model}"))
    if overlay.variance is not None:
        var = np.asarray(overlay.variance, dtype=np.float32)
        paths["variance"] = batch.add(layout.volume(prefix, layout.VARIANCE),
                                      nifti_bytes(grid, var, f"ensemble member variance {model}"))
    for name in overlay.attention:
        att = overlay.normalised_attention(name)
        paths["attention"][name] = batch.add(layout.attention(prefix, name),
                                             nifti_bytes(grid, att, f"attention {name} 1=p99.5 {model}",
                                                         window=(0.0, 1.0)))
    if overlay.probabilities is not None:
        probs = np.moveaxis(np.asarray(overlay.probabilities, dtype=np.float32), 0, -1)
        order = "/".join(REGIONS)
        paths["probabilities"] = batch.add(layout.volume(prefix, layout.PROBABILITIES),
                                           nifti_bytes(grid, probs, f"region probabilities {order} {model}"))
    return paths
