"""A case's prediction in memory: :class:`CaseOverlay` (what a prediction folder holds, with the input images),
:class:`Provenance` (where it came from), and the checks every prediction passes before a byte is written.

Everything in a :class:`CaseOverlay` is on the **original grid** of the case: the shape, voxel order and affine of
``reference`` (one input modality file). Axis order is NIfTI's ``[X, Y, Z]`` = the file's voxel index order
``(i, j, k)`` (for MHA/NRRD read through SimpleITK, the transpose of ``GetArrayFromImage``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path

import numpy as np

from medseg_diff.data.conventions import REGIONS, LabelConvention
from medseg_diff.data.vocabulary import CONTRAST_MODALITIES, DISPLAY_MODALITIES, MODALITY_NAMES
from medseg_diff.data.names import MAX_NAME_LENGTH, SAFE_NAME, name_length_problem
from medseg_diff.errors import DataError

#: Robust maximum used to scale attention maps: this percentile of the brain's voxels becomes 1.
ATTENTION_PERCENTILE = 99.5
UNCERTAINTY_UNITS = ("nats", "bits")


@dataclass(frozen=True)
class Provenance:
    """Where a prediction came from, as the report's provenance table shows it; None = not recorded.

    Written into ``prediction.json`` by ``predict`` (``predictions.meta``) from the checkpoint and its
    stored config, read back by ``export``.
    """

    model_kind: str | None = None  # "diffusion" | "unet" | "attention_unet"
    checkpoint: str | None = None  # the checkpoint file the weights came from
    model_uri: str | None = None  # the MLflow model URI, when the checkpoint was fetched through one
    run_id: str | None = None  # the training run
    epoch: int | None = None  # training epoch of the checkpoint
    training_data: str | None = None  # plain words, e.g. "synthetic phantoms (medseg-diff synth), 3 mm voxels"
    training_manifest: str | None = None  # the training manifest's path, from the checkpoint's config
    synthetic_training: bool | None = None  # trained only on synthetic phantoms (the checkpoint's record)
    sample_steps: int | None = None  # DDIM steps K (diffusion)
    ensemble: int | None = None  # ensemble members N (diffusion)
    seed: int | None = None  # sampler seed
    overlap: float | None = None  # sliding-window overlap
    roi_size: tuple[int, ...] | None = None  # sliding-window size, voxels of the model's grid
    spacing_mm: tuple[float, ...] | None = None  # the grid the model predicted on (None: the input's own)
    threshold: float | None = None  # probability threshold of the regions
    predicted_at: str | None = None  # UTC time of the prediction

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict) -> "Provenance":
        """From ``to_dict``'s output; unknown keys are ignored (a newer writer), missing ones are None."""
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
        return cls(**values)


@dataclass
class CaseOverlay:
    """One case's prediction and maps, on the original grid of ``reference``."""

    case_id: str
    reference: Path  # one input modality file; its header, affine and shape define the output grid
    images: dict[str, np.ndarray]  # modality name -> [X, Y, Z] float
    labels: np.ndarray  # [X, Y, Z] BraTS labels in `convention`
    convention: LabelConvention
    probabilities: np.ndarray | None  # [3, X, Y, Z] region probabilities in REGIONS order (TC, WT, ET)
    uncertainty: np.ndarray | None  # [X, Y, Z] predictive entropy of the mean probabilities, summed over regions
    attention: dict[str, np.ndarray]  # name ("self", "cross", ...) -> [X, Y, Z] raw units, >= 0
    model_name: str
    run_id: str | None
    ground_truth: np.ndarray | None  # [X, Y, Z] labels in `convention`
    dice: dict[str, float] | None  # region ("TC", "WT", "ET") -> Dice vs ground truth
    uncertainty_units: str = "nats"  # "nats" (natural log) or "bits" (log2)
    variance: np.ndarray | None = None  # [X, Y, Z] variance across ensemble members, mean over the 3 regions
    provenance: Provenance = field(default_factory=Provenance)
    dice_source: str | None = None  # where `dice` came from, in plain words ("computed at predict time ...")
    image_paths: dict[str, Path] = field(default_factory=dict)  # modality name -> its input file, when known

    @property
    def grey_modality(self) -> str:
        """The modality shown in grey in the montage: FLAIR, else T1ce, else T2, else T1, else the first."""
        for name in DISPLAY_MODALITIES:
            if name in self.images:
                return name
        return next(iter(self.images))

    @property
    def contrast_modality(self) -> str | None:
        """The post-contrast T1 (T1ce / t1c) when the case has one: the second underlay of the prediction."""
        return next((name for name in CONTRAST_MODALITIES if name in self.images), None)

    @cached_property
    def brain_mask(self) -> np.ndarray:
        """``[X, Y, Z]`` bool: the head, as preprocessing sees it (``data.transforms.head_mask`` of the modalities
        without their constant background offset): for skull-stripped BraTS any modality non-zero, but a constant
        background or noisy air does not make the whole frame "brain" for the montage and the attention scale."""
        from medseg_diff.data.transforms import head_mask, remove_background_offset  # torch + MONAI: only when used

        channels = np.stack([remove_background_offset(np.asarray(image, dtype=np.float32))[0]
                             for image in self.images.values()])
        mask = head_mask(channels)
        return mask if mask.any() else np.ones(self.labels.shape, dtype=bool)

    def normalised_attention(self, name: str) -> np.ndarray:
        """Attention map ``name`` divided by its robust maximum, float32 ``[X, Y, Z]``, at least 0.

        The robust maximum is the ``ATTENTION_PERCENTILE`` (99.5th) percentile of the values inside
        :attr:`brain_mask` (the maximum if that percentile is 0), so 1 is that percentile and a few extreme voxels do
        not wash the map out of a 0-1 display window (the exported file stores that window in its header). The
        hottest 0.5 % keep their values above 1, not clipped: clipping made about 300 voxels tie at 1, so the file's
        maximum was no longer the map's, and its hottest voxels could not be told apart. An all-zero map stays zero.
        """
        values = np.asarray(self.attention[name], dtype=np.float32)
        inside = values[self.brain_mask]
        scale = float(np.percentile(inside, ATTENTION_PERCENTILE))
        if scale <= 0:
            scale = float(values.max())
        if scale <= 0:
            return np.zeros(values.shape, dtype=np.float32)
        return np.maximum(values / scale, 0.0).astype(np.float32)

    def relative_attention(self, name: str) -> np.ndarray:
        """Attention map ``name`` as a multiple of its mean inside :attr:`brain_mask` (1 = the brain's average),
        float32 ``[X, Y, Z]``: the montage and the viewer colour it above 1 on the fixed scale 1 to
        ``export.types.ATTENTION_SCALE_TOP``, so a nearly flat map shows nearly nothing instead of its small differences
        stretched over the whole colour map. A ratio, so the raw map is used as it is (no percentile to compute: any
        scaling cancels). An all-zero map stays zero."""
        values = np.maximum(np.asarray(self.attention[name], dtype=np.float32), 0.0)
        mean = float(values[self.brain_mask].mean(dtype=np.float64))  # float64: the same for any voxel order
        return (values / mean).astype(np.float32) if mean > 0 else values

    def modality_name(self, name: str) -> str:
        """Plain name of a modality key ("t2f" -> "FLAIR")."""
        return MODALITY_NAMES.get(name, name.upper())


def check_name(value: str, what: str, case: str | None) -> None:
    """Raise DataError unless ``value`` is usable in a file name (no path separators, no '..', at most
    ``MAX_NAME_LENGTH`` characters): the rule of ``data.discovery.case_id_problem``."""
    if not isinstance(value, str) or not SAFE_NAME.match(value) or ".." in value:
        raise DataError(
            None, f"{what} {value!r} cannot be used in a file name (letters, digits, . _ + - only)", case
        )
    problem = name_length_problem(value, what)
    if problem:
        raise DataError(None, problem, case[:24] + "..." if case and len(case) > MAX_NAME_LENGTH else case)


def check_overlay(overlay: CaseOverlay, grid_shape: tuple[int, int, int]) -> None:
    """Raise DataError (naming the case and the reference file) for anything unusable in ``overlay``."""
    if not isinstance(overlay.case_id, str) or not overlay.case_id.strip():
        raise DataError(overlay.reference, "case id is empty")
    ref = overlay.reference
    fail = _failer(ref, overlay.case_id)
    if overlay.uncertainty_units not in UNCERTAINTY_UNITS:
        fail(f"uncertainty_units must be one of {UNCERTAINTY_UNITS}, got {overlay.uncertainty_units!r}")
    if not overlay.images:
        fail("no modality image given (need at least one for the montage)")
    for name, image in overlay.images.items():
        _check_map(f"image '{name}'", image, grid_shape, fail)
        if not np.any(np.asarray(image)):
            fail(f"image '{name}' is empty (all zero)")
    _check_labels("labels", overlay.labels, overlay.convention, grid_shape, fail)
    if overlay.ground_truth is not None:
        _check_labels("ground_truth", overlay.ground_truth, overlay.convention, grid_shape, fail)
    if overlay.probabilities is not None:
        probs = _check_map("probabilities", overlay.probabilities, (len(REGIONS), *grid_shape), fail)
        if probs.min() < 0 or probs.max() > 1:
            fail(f"probabilities outside [0, 1] (min {probs.min():.4g}, max {probs.max():.4g})")
    if overlay.uncertainty is not None:
        unc = _check_map("uncertainty", overlay.uncertainty, grid_shape, fail)
        if unc.min() < 0:
            fail(f"uncertainty has negative values (min {unc.min():.4g}); entropy is >= 0")
    if overlay.variance is not None:
        var = _check_map("variance", overlay.variance, grid_shape, fail)
        if var.min() < 0:
            fail(f"variance has negative values (min {var.min():.4g}); a variance is >= 0")
    for name, att in overlay.attention.items():
        check_name(name, "attention map name", overlay.case_id)
        values = _check_map(f"attention '{name}'", att, grid_shape, fail)
        if values.min() < 0:
            fail(f"attention '{name}' has negative values (min {values.min():.4g}); expected >= 0")
    _check_dice(overlay.dice, fail)


def _failer(path: Path, case: str):
    def fail(problem: str) -> None:
        raise DataError(path, problem, case=case)

    return fail


def _check_map(what: str, array: np.ndarray, shape: tuple[int, ...], fail) -> np.ndarray:
    """The array as a numpy array, after checking its shape, numeric dtype and finiteness."""
    array = np.asarray(array)
    if array.shape != tuple(shape):
        fail(f"{what} has shape {array.shape}, but the reference grid is {tuple(shape)}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        fail(f"{what} has non-numeric dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            kind = "NaN" if np.isnan(array).any() else "Inf"
            fail(f"{what} contains {kind} ({int(bad.sum())} non-finite voxels)")
    return array


def _check_labels(what: str, labels: np.ndarray, convention: LabelConvention, shape, fail) -> None:
    _check_map(what, labels, shape, fail)
    unknown = convention.unknown_labels(labels)
    if unknown:
        fail(
            f"{what} has values {unknown} that the {convention.name} convention does not define "
            f"(allowed: {list(convention.labels)})"
        )


def _check_dice(dice: dict[str, float] | None, fail) -> None:
    for region, value in (dice or {}).items():
        if region not in REGIONS:
            fail(f"dice has unknown region {region!r} (expected {', '.join(REGIONS)})")
        if not (np.isfinite(value) and 0.0 <= value <= 1.0):
            fail(f"dice[{region!r}] = {value!r} is not within [0, 1]")
