"""Prediction of one whole case on its original grid (the model from ``inference.loading.load_model``).

1. load the case through the invertible eval pipeline (RAS, spacing, foreground crop, normalise)
2. sliding-window inference (``infer_volume``) on the transformed grid
3. invert every map (probabilities, uncertainty, attention) back onto the input file's grid
4. outside the head (``data.transforms.head_mask`` on the input's grid: where every modality is background,
   i.e. 0 once a constant background offset is removed), probabilities, entropy and variance are set to 0:
   the prediction there is "no tumour", with certainty. Attention maps are left as the network made them.
5. threshold the regions and write BraTS labels in the input's convention

Before any of it, from the headers only: the modalities share one grid (``check_grid``; one scalar 3D volume per
modality, a 4D file only in the MSD layout), and that grid is one the model can use (``check_geometry``: enough
slices along every axis, before and after resampling to the model's voxel size, and voxels not so coarse that
resampling would invent most of what the model sees).
"""

from __future__ import annotations

import logging
import math
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

log = logging.getLogger(__name__)

#: The fewest voxels along any axis a case may have, in its file and once resampled to the model's voxel size.
#: Every network here is a 3D convolutional net whose first step halves the grid (the U-Nets' first stride 2, the
#: diffusion denoiser's 2-voxel patches) and whose every level convolves 3x3x3: with fewer than 4 voxels along an
#: axis fewer than 2 cells are left after that first halving, so along that axis no deeper feature has a
#: neighbour holding data -- the rest of every window is zero padding and the output is what the network makes
#: of padding. A 1- or 2-slice "volume" is an image, not a volume. Small but real volumes pass: the tests' 16³
#: phantoms at 2 mm are 6.4 voxels even for a model trained at 5 mm, and windows are padded to the roi.
MIN_VOXELS = 4
#: Two normalised modalities (z-scores within the head) closer than this everywhere are one image: a copy, re-saved
#: or rescaled (x -> a*x + b) -- float rounding moves a z-score by ~1e-6; two real modalities differ by ~1.
SAME_IMAGE_ATOL = 1e-3
#: The coarsest voxel, as a multiple of the model's voxel size along the same axis, a case may have. Resampling
#: a voxel c times the model's spacing makes c - 1 of every c slices the model sees up by interpolation; BraTS
#: itself holds scans acquired with thick (~5-6 mm) slices resampled to its 1 mm grid, which the models learnt
#: from, so up to 8 passes (a 1x1x5 mm clinical scan under a 1 mm model is 5x: accepted, with a warning above
#: ``WARN_COARSER``). Beyond 8 (a 1x1x10 mm scan under a 1 mm model) 7 of 8 slices would be invented: refused.
MAX_COARSER = 8.0
#: Above this many times the model's voxel size along an axis a case is predicted with a warning.
WARN_COARSER = 3.0
#: A scan whose slices are at least this many times thicker than its in-plane voxels (a 2D acquisition, 1x1x10 mm)
#: is refused when its slices are also more than ``WARN_COARSER`` times the model's voxel (a 1x1x10 mm scan under a
#: 3 mm model: 70 % of the slices the model sees would be interpolated between two acquired slices 10 in-plane
#: voxels apart). Its thin axes say what the anatomy looks like; the thick one leaves the model to guess. A
#: 0.45x0.45x6 mm FLAIR (13:1) under a 3 mm model is 2x: accepted.
MAX_ANISOTROPY = 10.0
_AXES = "ijk"


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
    reference_image = check_grid(record, case_id)
    check_geometry(record, cfg.data.spacing, case_id, reference_image)
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


def check_grid(record: dict, case_id: str):
    """Modalities (and label / prior) of a case must share shape and affine; checked from headers only (a DICOM
    series is decoded). Returns the first modality's image (``read_image``)."""
    from medseg_diff.data.check import grid_mismatch
    from medseg_diff.data.io import MULTI_COMPONENT, read_image

    single = not isinstance(record[IMAGE], (list, tuple))  # MSD: one 4D file holds the four modalities
    images = [record[IMAGE]] if single else list(record[IMAGE])
    others = [record[k] for k in (LABEL, PRIOR) if k in record]

    def check_modality(img, path) -> None:
        shape = tuple(int(d) for d in img.shape)
        if single and (len(shape) != 4 or shape[3] != len(MODALITIES)):
            raise DataError(path, f"expected a 4D image of {len(MODALITIES)} volumes ({', '.join(MSD_CHANNEL_ORDER)}),"
                                  f" got shape {shape}", case=case_id)
        if not single and len(shape) == 4 and shape[3] > 1:
            raise DataError(path, f"{MULTI_COMPONENT} (a 4D image of {shape[3]} volumes, shape {shape}, where one 3D "
                                  f"modality is expected)", case=case_id)

    ref = read_image(images[0])
    check_modality(ref, images[0])
    for i, path in enumerate(list(images[1:]) + others):
        img = read_image(path)
        if i < len(images) - 1:
            check_modality(img, path)
        if path == record.get(LABEL) and len(img.shape) != 3:
            raise DataError(path, f"a label map must be 3D, this one has shape {tuple(img.shape)}", case=case_id)
        problems = grid_mismatch(img.shape, img.affine, ref.shape, ref.affine, images[0])
        if problems:
            raise DataError(path, problems[0], case=case_id)
    return ref


def check_geometry(record: dict, spacing, case_id: str, image=None) -> None:
    """Refuse a grid the model cannot use, naming the file (the first modality: ``check_grid`` has made every file
    of the case share its grid), from its header only:

    * fewer than ``MIN_VOXELS`` slices along an axis of the file;
    * fewer than ``MIN_VOXELS`` voxels along an axis once resampled to the model's voxel size ``spacing`` (mm;
      None: the model predicts on the file's own grid);
    * a voxel more than ``MAX_COARSER`` times the model's voxel size along an axis (resampling would invent most of
      the slices the model sees), or more than ``WARN_COARSER`` times in a scan at least ``MAX_ANISOTROPY``:1
      anisotropic (a 2D acquisition); above ``WARN_COARSER`` times, a warning.

    ``image``: that file as ``read_image`` returned it (``check_grid`` does), so a DICOM series is not decoded twice.
    """
    from medseg_diff.data.io import read_image

    path = _first_path(record)
    img = image if image is not None else read_image(path)
    shape = [int(d) for d in img.shape[:3]]
    zooms = [float(z) for z in np.linalg.norm(np.asarray(img.affine, dtype=np.float64)[:3, :3], axis=0)]
    for axis, n in enumerate(shape):
        if n < MIN_VOXELS:
            raise DataError(path, f"{n} slice{'s' if n != 1 else ''} along axis {axis + 1} ({_AXES[axis]}) "
                                  f"(shape {tuple(shape)}); the model needs at least {MIN_VOXELS}: it is a 3D network, "
                                  f"and a slab this thin is an image, not a volume", case=case_id)
    if spacing is None:
        return
    spacing = [float(v) for v in spacing]
    for axis, (n, zoom, target) in enumerate(zip(shape, zooms, spacing)):
        where = f"axis {axis + 1} ({_AXES[axis]})"
        extent = n * zoom
        voxels = extent / target
        if voxels < MIN_VOXELS:
            raise DataError(path, f"{extent:.3g} mm along {where} ({n} slices of {zoom:.3g} mm) is only {voxels:.2g} "
                                  f"voxel{'' if f'{voxels:.2g}' == '1' else 's'} at the model's {target:g} mm voxel "
                                  f"size; the model needs at least {MIN_VOXELS}", case=case_id)
    coarse = [zoom / target for zoom, target in zip(zooms, spacing)]
    worst = int(np.argmax(coarse))
    where = f"axis {worst + 1} ({_AXES[worst]})"
    sizes = "x".join(f"{z:.3g}" for z in zooms)
    model = "x".join(f"{t:g}" for t in spacing)
    if coarse[worst] > MAX_COARSER:
        raise DataError(path, f"voxels of {sizes} mm are {coarse[worst]:.3g} times the model's {model} mm along "
                              f"{where}; resampling would invent {_invented(coarse[worst])} the model sees (at most "
                              f"{MAX_COARSER:g} times is accepted); use a scan with thinner slices", case=case_id)
    anisotropy = max(zooms) / min(zooms)
    if anisotropy >= MAX_ANISOTROPY and coarse[worst] > WARN_COARSER:
        raise DataError(path, f"voxels of {sizes} mm: slices {anisotropy:.3g} times thicker than the in-plane voxels "
                              f"(a 2D acquisition) and {coarse[worst]:.3g} times the model's {model} mm along {where}; "
                              f"resampling would invent {_invented(coarse[worst])} the model sees (refused from "
                              f"{MAX_ANISOTROPY:g}:1 with slices over {WARN_COARSER:g} times the model's); use a 3D "
                              "acquisition or one with thinner slices", case=case_id)
    if coarse[worst] > WARN_COARSER:
        log.warning("case %s: %s: warning: voxels of %s mm are %.3g times the model's %s mm along %s; resampling "
                    "interpolates %s the model sees: expect a coarser segmentation along that axis",
                    case_id, path, sizes, coarse[worst], model, where, _invented(coarse[worst]))


def _invented(factor: float) -> str:
    """'7 of every 8 slices' for a coarsening ``factor`` of 8 (c - 1 of every c slices interpolated)."""
    whole = max(int(math.floor(factor + 1e-9)), 1)
    return (f"{whole - 1} of every {whole} slices" if abs(factor - whole) < 0.05
            else f"{1 - 1 / factor:.0%} of the slices")


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
    """Reject NaN/Inf in any modality or prior, an empty (all-zero) modality, and two modalities that are one image
    (a copy, re-saved or rescaled), before inference.

    Checked on the transformed tensors, so no file is read twice: channel-wise normalisation spreads a
    single NaN/Inf over its whole channel and leaves an empty modality all zero. Only when a channel fails
    is its file decoded again, to name it and say exactly what is wrong.
    """
    image = torch.as_tensor(data[IMAGE]).flatten(1)  # [4, N]
    bad = ~torch.isfinite(image).all(dim=1) | ~image.any(dim=1)
    failing = torch.nonzero(bad).flatten().tolist()
    for c in failing[:1]:
        images = record[IMAGE]
        if isinstance(images, (list, tuple)):
            path, channel, what = images[c], None, f"{MODALITIES[c]} image"
        else:  # MSD: one 4D file
            path, channel = images, MSD_CHANNEL_ORDER.index(MODALITIES[c])
            what = f"{MODALITIES[c]} channel (volume {channel} of the 4D image)"
        others = [MODALITIES[o] for o in failing[1:]]
        noun = ("image" if isinstance(images, (list, tuple)) else "channel") + ("s" if len(others) > 1 else "")
        also = f" (and the {', '.join(others)} {noun} too)" if others else ""
        raise DataError(path, f"{what} {_value_problem(path, channel)}{also}", case=case_id)
    same = [(a, b) for b in range(image.shape[0]) for a in range(b)  # z-scores equal within float rounding
            if bool(((image[a] - image[b]).abs().max() < SAME_IMAGE_ATOL).item())]
    if same:  # a modality copied over another (byte copies are refused with the manifest; this finds re-saved ones)
        a, b = same[0]
        images = record[IMAGE]
        if isinstance(images, (list, tuple)):
            raise DataError(images[b], f"{MODALITIES[b]} holds the same image as {MODALITIES[a]} ({images[a]}) once "
                                       "normalised: a modality copied over another; each modality needs its own image",
                            case=case_id)
        raise DataError(images, f"the {MODALITIES[b]} and {MODALITIES[a]} channels hold the same image once "
                                "normalised: a modality copied into another's channel; each needs its own", case=case_id)
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
    if float(array.max()) == float(array.min()):
        return f"is constant (every voxel is {float(array.max()):g}): it shows no head"
    return ("is empty inside the head (no voxel differs from its background after preprocessing: the background is "
            "the dominant value of the volume's border, of either sign)")


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
