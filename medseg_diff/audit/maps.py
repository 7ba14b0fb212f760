"""Question 7 of the audit: do the attention maps the product exports look at the tumour, and faithfully?

The maps are the product's (``SampleSegmenter`` with attention on = ``DiffusionSegmenter``; stitched by
``infer_volume``'s ``AttentionStitcher``, 1 = the head's average). For ``cross`` and ``self``:

* enrichment: mean of the map in the truth's WT dilated 3 voxels over its mean in the head (``scores.enrichment``);
* pointing game: the map's maximum in the head lies in that region (``scores.pointing_game``);
* faithfulness: the 10 % of head voxels the map ranks highest are occluded (every modality set to its median over
  the head), and, separately, a seeded random 10 % of the head; the drop of the predicted tumour probability mass
  (sum of the WT probability over the head) of the first over that of the second. A faithful map: >= 2.

And the cross-attention weights themselves (``MaskPriorCrossAttention.attention_weights``) on one window centred
on the tumour, at the last sampling step: their normalised entropy over the prior tokens (``scores.normalised_entropy``;
1 = uniform, a global average pool) and the mean largest weight against the uniform ``1 / M``.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F

from medseg_diff.audit.cases import AuditCase
from medseg_diff.audit.probe import NEIGHBOURHOOD, DiffusionProbe
from medseg_diff.audit.scores import dilated, enrichment, normalised_entropy, pointing_game
from medseg_diff.audit.windows import layer_inputs, sampler_variant
from medseg_diff.inference.sliding_window import VolumePrediction
from medseg_diff.models.attention import MaskPriorCrossAttention

MAPS = ("cross", "self")
OCCLUDED_FRACTION = 0.10


def occluded(image: torch.Tensor, head: np.ndarray, voxels: np.ndarray) -> torch.Tensor:
    """``image [1, C, X, Y, Z]`` with every modality set, at the flat indices ``voxels``, to its median over ``head``."""
    out = image.clone()
    flat_head = torch.as_tensor(np.flatnonzero(head), device=image.device)
    index = torch.as_tensor(voxels, device=image.device)
    for c in range(image.shape[1]):
        channel = out[0, c].reshape(-1)  # a view: writes go to ``out``
        channel[index] = channel[flat_head].median()
    return out


def most_attended(attention: np.ndarray, head: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the ``count`` head voxels with the largest ``attention`` (ties: the lower index first)."""
    inside = np.flatnonzero(head)
    order = np.argsort(-attention.reshape(-1)[inside], kind="stable")
    return inside[order[:count]]


def random_head_voxels(head: np.ndarray, count: int, seed: int, case_id: str) -> np.ndarray:
    """``count`` flat indices of head voxels drawn without replacement, seeded by ``seed`` and the case id."""
    rng = np.random.default_rng([seed, zlib.crc32(case_id.encode())])
    return np.sort(rng.choice(np.flatnonzero(head), size=count, replace=False))


def tumour_mass(prediction: VolumePrediction, head: np.ndarray) -> float:
    """Sum of the WT probability over the head."""
    return float(prediction.probs[1].float().cpu().numpy()[head].sum())


def attention_maps(probe: DiffusionProbe, case: AuditCase, default: VolumePrediction) -> dict:
    """Question 7 for one case; ``default`` is the product's run with attention maps (``probe.default_run``)."""
    maps = {k: default.attention[k][0].float().cpu().numpy() for k in MAPS if k in default.attention}
    out = map_scores(default, case, MAPS)
    out["faithfulness"] = faithfulness(probe, case, default, maps)
    out["cross_weights"] = cross_weights(probe, case)
    return out


def map_scores(prediction: VolumePrediction, case: AuditCase, names: tuple[str, ...] | None = None) -> dict:
    """``{name: {"present", "enrichment", "pointing_game"}}`` of the stitched maps ``names`` (default: all the
    prediction has) in the truth's WT dilated 3 voxels over the head."""
    region = dilated(case.regions[1], NEIGHBOURHOOD)
    out: dict = {}
    for name in names or tuple(prediction.attention):
        out[name] = {"present": name in prediction.attention}
        if name in prediction.attention:
            attention = prediction.attention[name][0].float().cpu().numpy()
            out[name].update(enrichment=enrichment(attention, region, case.head),
                             pointing_game=pointing_game(attention, region, case.head))
    return out


def faithfulness(probe: DiffusionProbe, case: AuditCase, default: VolumePrediction, maps: dict) -> dict:
    """``{"mass", "random_drop", kind: {"drop", "ratio"}}``: drops of the tumour mass when the most-attended vs a
    random 10 % of the head is occluded (the same sampler, seed and prior as ``default``)."""
    if not maps:
        return {}
    count = max(1, int(round(OCCLUDED_FRACTION * int(case.head.sum()))))
    prior = probe.own_prior(case)
    mass = tumour_mass(default, case.head)

    def drop(voxels: np.ndarray) -> float:
        run = probe.sample(case, image=occluded(case.image, case.head, voxels), prior=prior, attention=True)
        return mass - tumour_mass(run, case.head)

    random_drop = drop(random_head_voxels(case.head, count, probe.seed, case.case_id))
    out: dict = {"mass": mass, "occluded_voxels": count, "random_drop": random_drop}
    for kind, attention in maps.items():
        top = drop(most_attended(attention, case.head, count))
        out[kind] = {"drop": top, "ratio": top / random_drop if random_drop > 0 else float("nan")}
    return out


def tumour_window(case: AuditCase, roi: tuple[int, int, int]) -> tuple[slice, ...]:
    """The ``roi`` window (clipped to the volume) centred on the truth's WT (on the head without a tumour)."""
    where = np.argwhere(case.regions[1]) if case.regions[1].any() else np.argwhere(case.head)
    centre = where.mean(axis=0) if where.size else np.array(case.shape) / 2
    starts = [int(np.clip(round(c - r / 2), 0, max(s - r, 0))) for c, r, s in zip(centre, roi, case.shape)]
    return tuple(slice(a, min(a + r, s)) for a, r, s in zip(starts, roi, case.shape))


def cross_weights(probe: DiffusionProbe, case: AuditCase) -> dict:
    """Normalised entropy and mean largest weight of every cross-attention layer's weights over the prior tokens, at
    the last step of sampling the tumour's window (zero-padded to the roi where the volume is smaller)."""
    if not any(isinstance(m, MaskPriorCrossAttention) for m in probe.net.modules()):
        return {}
    roi = probe.windowing.roi
    window = tumour_window(case, roi)
    image = case.image[(slice(None), slice(None), *window)]
    prior = probe.own_prior(case)
    prior = None if prior is None else torch.as_tensor(prior[(slice(None), *window)], device=image.device)[None]
    pad = [p for size, r in zip(reversed(image.shape[2:]), reversed(roi)) for p in (0, max(r - size, 0))]
    image = F.pad(image, pad)
    prior = None if prior is None else F.pad(prior, pad)
    sampler = sampler_variant(probe.base, probe.adapter.scheduler())
    with torch.no_grad(), layer_inputs(probe.net, MaskPriorCrossAttention) as seen:
        sampler.sample(probe.net, image, external_prior=prior, attention=False)
        entropies, largest, tokens = [], [], 0
        for layer, args in seen.items():
            weights = layer.attention_weights(args[0], args[1]).float().cpu().numpy()  # [B, h, N, M]
            entropies.append(normalised_entropy(weights, axis=-1))
            largest.append(float(weights.max(axis=-1).mean()))
            tokens = weights.shape[-1]
    if not entropies:
        return {}
    return {"normalised_entropy": float(np.mean(entropies)), "largest_weight": float(np.mean(largest)),
            "uniform_weight": 1.0 / tokens, "layers": len(entropies)}
