"""The names of a prediction folder's files: the one module that writes them.

``DIR/CASE/`` holds, on the input's exact grid: ``CASE_seg.nii.gz`` (labels), ``CASE_probabilities.nii.gz`` (4D,
TC/WT/ET), ``CASE_uncertainty.nii.gz``, ``CASE_variance.nii.gz`` (diffusion), ``CASE_attention_NAME.nii.gz``, the
colour tables ``CASE_labels.ctbl`` (3D Slicer) and ``CASE_labels_itksnap.txt`` (ITK-SNAP), ``prediction.json``, and
for a case read from DICOM ``dicom/CASE_seg.dcm`` and ``dicom/CASE_MAP.dcm``. Another tool's folder of label maps
is read as ``DIR/CASE/CASE_seg.nii.gz``, ``DIR/CASE.nii.gz`` or ``DIR/CASE_seg.nii.gz``.
"""

from __future__ import annotations

from pathlib import Path

#: the prediction record of a case folder (``predictions.meta``)
META = "prediction.json"
#: the subfolder of a case folder holding its DICOM objects
DICOM_FOLDER = "dicom"
NIFTI = ".nii.gz"
_ATTENTION = "_attention_"
#: the volume kinds of a prediction folder besides the attention maps, in the order ``evaluate`` and DICOM read them
SEG, PROBABILITIES, UNCERTAINTY, VARIANCE = "seg", "probabilities", "uncertainty", "variance"


def volume(case: str, kind: str) -> str:
    """``CASE_KIND.nii.gz`` for ``kind`` in seg / probabilities / uncertainty / variance."""
    return f"{case}_{kind}{NIFTI}"


def seg(case: str) -> str:
    return volume(case, SEG)


def attention(case: str, name: str) -> str:
    return f"{case}{_ATTENTION}{name}{NIFTI}"


def attention_names(folder: Path, case: str) -> list[str]:
    """The attention maps found in ``folder`` (for folders written before ``prediction.json`` listed them)."""
    prefix = f"{case}{_ATTENTION}"
    return [p.name[len(prefix):-len(NIFTI)] for p in sorted(Path(folder).glob(f"{prefix}*{NIFTI}"))]


def is_map_file(name: str) -> bool:
    """An attention, uncertainty or variance volume (the maps the report lists after the labels)."""
    return _ATTENTION in name or name.endswith((volume("", UNCERTAINTY), volume("", VARIANCE)))


def slicer_table(case: str) -> str:
    return f"{case}_labels.ctbl"


def itksnap_table(case: str) -> str:
    return f"{case}_labels_itksnap.txt"


def dicom_object(case: str, name: str) -> str:
    """``CASE_NAME.dcm`` in the ``dicom/`` subfolder (``seg``, ``uncertainty``, ``attention_cross``, ...)."""
    return f"{case}_{name}.dcm"


def segmentation_candidates(folder: Path, case: str) -> tuple[Path, Path, Path]:
    """Where a folder of label maps may hold ``case``'s, in order: ``CASE/CASE_seg.nii.gz`` (this package),
    ``CASE.nii.gz`` (nnU-Net, BraTS submissions), ``CASE_seg.nii.gz``."""
    folder = Path(folder)
    return folder / case / seg(case), folder / f"{case}{NIFTI}", folder / seg(case)


def candidates_text(case: str) -> str:
    """The candidates of :func:`segmentation_candidates`, as an error message lists them."""
    return f"{case}/{seg(case)}, {case}{NIFTI}, {seg(case)}"


def is_case_folder(seg_path: Path, case: str) -> bool:
    """``seg_path`` is ``CASE/CASE_seg.nii.gz``: a folder of this package, which may hold more maps."""
    return seg_path.name == seg(case) and seg_path.parent.name == case


def prediction_folders(path: Path) -> list[Path] | None:
    """``path`` itself when it is a prediction folder, else its sub-folders that are (None when there are none).
    Hidden sub-folders are not: they are cases a live ``predict`` is staging or replacing (``.CASE.partial-*``)."""
    path = Path(path)
    if (path / META).exists():
        return [path]
    return sorted(p.parent for p in path.glob(f"*/{META}") if not p.parent.name.startswith(".")) or None
