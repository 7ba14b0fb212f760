"""Prediction of one whole case on its original grid (the model from ``inference.loading.load_model``).

1. load the case through the invertible eval pipeline (RAS, spacing, foreground crop, normalise)
2. sliding-window inference (``infer_volume``) on the transformed grid
3. invert every map (probabilities, uncertainty, attention) back onto the input file's grid
4. outside the head (``data.transforms.head_mask`` on the input's grid: where every modality is background,
   i.e. 0 once a constant background offset is removed), probabilities, entropy and variance are set to 0:
   the prediction there is "no tumour", with certainty. Attention maps are left as the network made them.
5. threshold the regions and write BraTS labels in the input's convention
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medseg_diff.data.conventions import MODALITIES, MSD_CHANNEL_ORDER, LabelConvention
from medseg_diff.data.dataset import CASE_ID
from medseg_diff.data.transforms import HEAD, IMAGE, LABEL, PRED, PRIOR, eval_transforms, invert_prediction
from medseg_diff.inference.postprocess import Postprocessed, postprocess
from medseg_diff.inference.sliding_window import VolumePrediction, infer_volume
from medseg_diff.inference.loading import LoadedModel
from medseg_diff.errors import DataError


@dataclass
class CasePrediction:
    """Everything on the **original** grid of the case's input files."""

    case_id: str
    reference: Path  # an input modality file: its grid is the output grid
    labels: np.ndarray  # [X, Y, Z] uint8, BraTS labels in the input's convention
    probs: np.ndarray  # [3, X, Y, Z] TC, WT, ET
    entropy: np.ndarray  # [X, Y, Z] predictive entropy (nats, summed over regions)
    variance: np.ndarray | None  # [X, Y, Z] ensemble variance (diffusion)
    attention: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [X, Y, Z], times the head's average (stitched)
    ground_truth: np.ndarray | None = None  # [X, Y, Z] labels, when the case has them
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # of the original grid, mm
    seconds: float = 0.0
    peak_memory_mb: float | None = None
    postprocessed: Postprocessed | None = None  # what BraTS post-processing did to ``labels`` (``postprocess``)


def predict_case(model: LoadedModel, record: dict, convention: LabelConvention,
                 device: torch.device | None = None) -> CasePrediction:
    """Predict one case (a record from ``case_record`` / ``files_record``) on its original grid."""
    cfg = model.cfg
    device = device or next(model.net.parameters()).device
    case_id = record.get(CASE_ID, "case")
    has_prior = PRIOR in record
    # a prior the model does not take would reach the network as 3 extra input channels
    model.adapter.check_prior(has_prior, record.get(PRIOR, model.checkpoint), case=case_id)
    # 1. load and transform (label kept only for metrics, on the original grid)
    transform = eval_transforms(convention, cfg.data.spacing, with_label=False, with_prior=has_prior,
                                head_mask_key=HEAD)
    check_grid(record, case_id)
    truth = _read_truth(record, convention, case_id)  # before the inference: a bad label fails at once
    record_in = {k: v for k, v in record.items() if k != LABEL}
    try:
        data = transform(record_in)
    except Exception as err:  # MONAI wraps reader errors in RuntimeError
        root = _root_cause(err)
        if isinstance(root, DataError):
            raise DataError(root.path, root.problem, case=case_id) from err
        raise _unreadable_input(record, root, case_id) from err
    check_values(data, record, case_id)
    head = data.pop(HEAD)  # [X, Y, Z] bool on the input's grid
    image = data[IMAGE].unsqueeze(0).to(device)
    prior = data[PRIOR].unsqueeze(0).to(device) if has_prior else None
    # 2. whole-volume inference on the transformed grid
    segmenter = model.adapter.segmenter(model.net, validation=False, seed=cfg.experiment.seed)
    pred = infer_volume(segmenter, image.as_tensor(), cfg.infer.roi_size or cfg.data.roi_size,
                        overlap=cfg.infer.overlap, sw_batch_size=cfg.infer.sw_batch_size, mode=cfg.infer.mode,
                        prior=None if prior is None else prior.as_tensor(), amp=cfg.train.amp)
    # 3. invert all maps at once onto the input's grid
    maps, names = _stack_maps(pred)
    data[PRED] = MetaTensor(maps.cpu(), meta=dict(data[IMAGE].meta), applied_operations=data[IMAGE].applied_operations)
    original = invert_prediction(data, transform, nearest=False)[PRED].numpy()
    split = {name: original[i] for i, name in enumerate(names)}
    probs = np.stack([split.pop(f"prob_{r}") for r in range(3)]).clip(0.0, 1.0)
    # 4. nothing outside the head
    suppress_outside_head(head, probs, split)
    # 5. labels in the input's convention, post-processed (small lesions, small enhancement); probabilities untouched
    reference = Path(_first_path(record))
    spacing = _spacing(reference)
    labels, done = postprocess(convention.from_regions(probs > cfg.infer.threshold), convention,
                               float(np.prod(spacing)), cfg.infer.min_lesion_mm3, cfg.infer.min_enhancing_mm3)
    return CasePrediction(
        case_id=case_id, reference=reference, labels=labels, probs=probs.astype(np.float32),
        entropy=split.pop("entropy").astype(np.float32),
        variance=split.pop("variance").astype(np.float32) if "variance" in split else None,
        attention={k[len("attn_"):]: np.clip(v, 0, None).astype(np.float32) for k, v in split.items()},
        ground_truth=truth, spacing=spacing, seconds=pred.seconds, peak_memory_mb=pred.peak_memory_mb,
        postprocessed=done,
    )


def suppress_outside_head(head: np.ndarray, probs: np.ndarray, maps: dict[str, np.ndarray]) -> None:
    """In place: ``probs [3, X, Y, Z]`` and the ``entropy`` / ``variance`` of ``maps`` become 0 where ``head``
    ``[X, Y, Z]`` is False (every modality background). Attention maps are left alone."""
    if head.shape != probs.shape[1:]:
        raise RuntimeError(f"head mask {head.shape} and inverted prediction {probs.shape[1:]} differ in grid")
    outside = ~head
    if not outside.any():
        return
    for r in range(probs.shape[0]):
        probs[r][outside] = 0.0
    for name in ("entropy", "variance"):
        if name in maps:
            maps[name][outside] = 0.0


def _stack_maps(pred: VolumePrediction) -> tuple[torch.Tensor, list[str]]:
    """All maps as one ``[C, X, Y, Z]`` tensor so that a single inverse resamples them together."""
    parts, names = [pred.probs, pred.entropy], ["prob_0", "prob_1", "prob_2", "entropy"]
    if pred.variance is not None:
        parts.append(pred.variance)
        names.append("variance")
    for name, m in pred.attention.items():
        parts.append(m)
        names.append(f"attn_{name}")
    return torch.cat([p.float() for p in parts], dim=0), names


def _first_path(record: dict) -> str:
    image = record[IMAGE]
    return image[0] if isinstance(image, (list, tuple)) else image


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def check_grid(record: dict, case_id: str) -> None:
    """Modalities (and label / prior) of a case must share shape and affine; checked from headers only."""
    from medseg_diff.data.check import grid_mismatch
    from medseg_diff.data.io import read_image

    images = record[IMAGE] if isinstance(record[IMAGE], (list, tuple)) else [record[IMAGE]]
    others = [record[k] for k in (LABEL, PRIOR) if k in record]
    ref = read_image(images[0])
    for path in list(images[1:]) + others:
        img = read_image(path)
        if path == record.get(LABEL) and len(img.shape) != 3:
            raise DataError(path, f"a label map must be 3D, this one has shape {tuple(img.shape)}", case=case_id)
        problems = grid_mismatch(img.shape, img.affine, ref.shape, ref.affine, images[0])
        if problems:
            raise DataError(path, problems[0], case=case_id)


def _input_files(record: dict) -> list[str]:
    images = record[IMAGE] if isinstance(record[IMAGE], (list, tuple)) else [record[IMAGE]]
    return [str(p) for p in images] + ([str(record[PRIOR])] if PRIOR in record else [])


def _unreadable_input(record: dict, root: BaseException, case_id: str) -> DataError:
    """The error for a case MONAI could not load, naming the file at fault (found by decoding each input
    in turn; only on this error path): the loader's own exception does not say which file it was."""
    from medseg_diff.data.io import read_array

    for path in _input_files(record):
        try:
            read_array(path)
        except DataError as err:
            return DataError(err.path, err.problem, case=case_id)
    return DataError(_first_path(record), f"could not load the case ({type(root).__name__}: {root})", case=case_id)


def check_values(data: dict, record: dict, case_id: str) -> None:
    """Reject NaN/Inf in any modality or prior, and an empty (all-zero) modality, before inference.

    Checked on the transformed tensors, so no file is read twice: channel-wise normalisation spreads a
    single NaN/Inf over its whole channel and leaves an empty modality all zero. Only when a channel fails
    is its file decoded again, to name it and say exactly what is wrong.
    """
    image = torch.as_tensor(data[IMAGE]).flatten(1)  # [4, N]
    bad = ~torch.isfinite(image).all(dim=1) | ~image.any(dim=1)
    for c in torch.nonzero(bad).flatten().tolist():
        images = record[IMAGE]
        if isinstance(images, (list, tuple)):
            path, channel, what = images[c], None, f"{MODALITIES[c]} image"
        else:  # MSD: one 4D file
            path, channel = images, MSD_CHANNEL_ORDER.index(MODALITIES[c])
            what = f"{MODALITIES[c]} channel (volume {channel} of the 4D image)"
        raise DataError(path, f"{what} {_value_problem(path, channel)}", case=case_id)
    if PRIOR in data and not bool(torch.isfinite(torch.as_tensor(data[PRIOR])).all()):
        raise DataError(record[PRIOR], f"external prior {_value_problem(record[PRIOR], None)}", case=case_id)


def _value_problem(path: str | Path, channel: int | None) -> str:
    """What is wrong with the values of ``path`` (volume ``channel`` of a 4D file): NaN/Inf counts or empty."""
    from medseg_diff.data.io import read_array

    array, _ = read_array(path)
    if channel is not None:
        array = array[..., channel]
    n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    if n_nan or n_inf:
        return f"contains NaN/Inf ({n_nan} NaN and {n_inf} Inf voxels of {array.size})"
    if not np.any(array):
        return "is empty (all zero)"
    return "is empty inside the head (no non-zero voxel left after preprocessing)"


def _read_truth(record: dict, convention: LabelConvention, case_id: str | None = None) -> np.ndarray | None:
    """The case's label map (uint8), or None without one. Labels that are not integers (e.g. 1.5 from linear
    resampling) or not of ``convention`` (e.g. 7) raise ``DataError`` naming the file: never rounded."""
    if LABEL not in record:
        return None
    from medseg_diff.data.check import label_value_problems
    from medseg_diff.data.io import read_array

    try:
        label, _ = read_array(record[LABEL], dtype=np.float64)  # float32 would round 1.0000001 to 1
    except DataError as err:
        raise DataError(err.path, err.problem, case=case_id) from err
    problems = label_value_problems(label, convention)
    if problems:
        raise DataError(record[LABEL], "; ".join(problems), case=case_id)
    return label.astype(np.uint8)


def _spacing(path: Path) -> tuple[float, float, float]:
    from medseg_diff.data.io import read_image

    zooms = read_image(path).header.get_zooms()[:3]
    return tuple(float(z) for z in zooms)
