"""The audit's cases: each labelled case of a manifest subset on the model's own grid.

A case is preprocessed exactly as ``predict`` preprocesses it (``data.transforms.eval_transforms`` with the
checkpoint's ``data.spacing``: air to 0, RAS, spacing, crop to the head, per-modality normalisation), and its label
goes through the same transforms (nearest neighbour) to the truth regions ``[TC, WT, ET]``. Everything the audit
measures is scored on that grid.

The head is what the product treats as head on that grid: the voxels where any modality is non-zero after
preprocessing (air is exactly 0 there; ``AttentionStitcher`` normalises the attention maps over the same voxels),
with the cavities it encloses filled, as ``data.transforms.head_mask`` does on the input grid.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from medseg_diff.audit.scores import dilated
from medseg_diff.data.conventions import LabelConvention
from medseg_diff.data.dataset import CASE_ID, case_record
from medseg_diff.data.transforms import IMAGE, LABEL, eval_transforms
from medseg_diff.errors import DataError

#: The rough outline prior of the issue's targets: the truth's WT dilated by this many voxels ...
OUTLINE_DILATION = 2
#: ... and blurred with a Gaussian of this σ (voxels).
OUTLINE_SIGMA = 1.0


@dataclass
class AuditCase:
    """One case on the model's grid."""

    case_id: str
    image: Tensor  # [1, 4, X, Y, Z] preprocessed modalities (float32, on the audit's device)
    regions: np.ndarray  # [3, X, Y, Z] bool truth TC, WT, ET
    head: np.ndarray  # [X, Y, Z] bool

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.regions.shape[1:])

    def outline(self) -> np.ndarray:
        """The rough outline prior ``[3, X, Y, Z]`` float32 in [0, 1] (:func:`rough_outline` of the truth)."""
        return rough_outline(self.regions)


def head_of(image: np.ndarray | Tensor) -> np.ndarray:
    """``[X, Y, Z]`` bool: any modality of ``image [C, X, Y, Z]`` non-zero, enclosed cavities filled."""
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    head = (array != 0).any(axis=0)
    return ndimage.binary_fill_holes(head) if head.any() else head


def rough_outline(regions: np.ndarray, dilation: int = OUTLINE_DILATION, sigma: float = OUTLINE_SIGMA) -> np.ndarray:
    """A clinician's rough outline from the truth ``regions [3, X, Y, Z]``: WT dilated by ``dilation`` voxels
    (``scores.dilated``), blurred with a Gaussian of ``sigma`` voxels, copied into all 3 channels; float32 in
    [0, 1] ``[3, X, Y, Z]``."""
    wt = dilated(np.asarray(regions[1], dtype=bool), dilation).astype(np.float32)
    blurred = np.clip(ndimage.gaussian_filter(wt, sigma=sigma), 0.0, 1.0)
    return np.repeat(blurred[None], 3, axis=0).astype(np.float32)


def resampled(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``volume [C, X, Y, Z]`` (probabilities) trilinearly resampled to ``shape``; float32."""
    if tuple(volume.shape[1:]) == tuple(shape):
        return volume.astype(np.float32)
    t = torch.as_tensor(volume, dtype=torch.float32)[None]
    out = torch.nn.functional.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0].clamp(0.0, 1.0).numpy()


def load_case(record: dict, convention: LabelConvention, spacing: Sequence[float] | None,
              device: torch.device | str = "cpu") -> AuditCase:
    """Preprocess one case (a ``data.dataset.case_record`` with a label) onto the model's grid.

    Bad input is refused like ``predict`` refuses it: grids that disagree, a label with values the convention
    does not have, NaN/Inf or an empty modality, an unreadable file -- each a ``DataError`` naming file and case.
    """
    from medseg_diff.inference.case import check_grid, check_values

    case_id = record.get(CASE_ID, "case")
    if LABEL not in record:
        raise DataError(record[IMAGE][0] if isinstance(record[IMAGE], list) else record[IMAGE],
                        "the audit needs a label for every case", case=case_id)
    check_grid(record, case_id)
    _check_label(record[LABEL], convention, case_id)
    transform = eval_transforms(convention, spacing, with_label=True)
    try:
        data = transform(record)
    except Exception as err:  # MONAI wraps reader errors in RuntimeError
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, DataError):
            raise DataError(root.path, root.problem, case=case_id) from err
        first = record[IMAGE][0] if isinstance(record[IMAGE], list) else record[IMAGE]
        raise DataError(first, f"could not load the case ({type(root).__name__}: {root})", case=case_id) from err
    check_values(data, record, case_id)
    image = torch.as_tensor(data[IMAGE]).as_subclass(Tensor).float()
    regions = np.asarray(torch.as_tensor(data[LABEL]).as_subclass(Tensor)) > 0.5
    return AuditCase(case_id=case_id, image=image[None].to(device), regions=regions, head=head_of(image))


def _check_label(path: str | Path, convention: LabelConvention, case_id: str) -> None:
    from medseg_diff.data.check import label_value_problems
    from medseg_diff.data.io import read_array

    try:
        label, _ = read_array(path, dtype=np.float64)  # float32 would round 1.0000001 to 1
    except DataError as err:
        raise DataError(err.path, err.problem, case=case_id) from err
    problems = label_value_problems(label, convention)
    if problems:
        raise DataError(path, "; ".join(problems), case=case_id)


def case_records(manifest_path: str | Path, subset: str = "test", fold: int = 0, root: str | Path | None = None,
                 max_cases: int | None = None):
    """``(manifest, convention, records)``: the labelled cases of ``subset`` (``evaluation.run.select_cases``),
    the first ``max_cases`` of them, as records for :func:`load_case`."""
    from medseg_diff.data.conventions import get_convention
    from medseg_diff.data.manifest import load_manifest
    from medseg_diff.evaluation.run import select_cases

    manifest = load_manifest(manifest_path, root=root)
    chosen = select_cases(manifest, subset, fold)
    if max_cases is not None:
        chosen = chosen[:max_cases]
    return manifest, get_convention(manifest.convention), [case_record(manifest, c) for c in chosen]


def with_next(records: list[dict], load) -> Iterator[tuple[AuditCase, AuditCase | None]]:
    """``(case, next case)`` for each record, the last paired with the first (None when there is one case);
    ``load(record) -> AuditCase``. At most two cases are held at a time (the first is loaded again at the end)."""
    if not records:
        return
    current = load(records[0])
    for i in range(len(records)):
        following = load(records[(i + 1) % len(records)]) if len(records) > 1 else None
        yield current, following
        current = following
