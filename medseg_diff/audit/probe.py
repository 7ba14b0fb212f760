"""The audit's measurements of one case: does each part of the diffusion model do its job?

Every Dice here is the mean over TC, WT and ET (``evaluation.metrics.dice``) of the probabilities thresholded at the
checkpoint's ``infer.threshold``, with nothing predicted outside the head (as ``predict`` writes it), on the model's
grid (``audit.cases``). Every sampling run uses the product's sampler (``adapter.segmenter(net).sampler``: its
K, N, seed and options) through the product's sliding windows (``audit.windows``), unless a question varies it.

1. x_t use (:func:`xt_use`): one x0 prediction at the timesteps where ᾱ_t is closest to 0.9, 0.5 and 0.1 and at
   T-1, given ``x_t = add_noise(x0)`` of the true mask (``x0 = 2 regions - 1``), the inverted mask, the empty mask
   (``x0 = -1``), and pure noise (``x_t = ε``); one seeded ε for all of them. With a scheduler whose x0 logits
   include a skip from x_t (``x_skip``), also the Dice of that skip alone (the true mask noised, network output 0):
   what the network adds to it.
2. sampling refines: the sampler's Dice for each K x N of the grid, and the default's.
3. members differ: member variance in the truth's WT dilated 3 voxels, voxels where the members' masks disagree,
   AUROC of the variance for the errors of the mean (``evaluation.run.uncertainty_quality``, as evaluation does).
4. uncertainty: the same AUROC for the predictive entropy.
5. prior knock-outs: no prior, the next case's rough outline, the case's own rough outline, the true regions; at the
   network's input (prior_source external / optional) or inside the conditioning (head: ``conditioning_prior``).
6. attention knock-outs: cross- and linear self-attention residuals zeroed (``residual_zeroed``).
The attention maps (question 7) are measured in ``audit.maps``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from medseg_diff.audit.cases import AuditCase, resampled
from medseg_diff.audit.scores import dilated
from medseg_diff.audit.windows import SampleSegmenter, Windowing, X0Segmenter, residual_zeroed, sampler_variant
from medseg_diff.data.conventions import REGIONS
from medseg_diff.diffusion.schedules import x0_logits
from medseg_diff.evaluation.metrics import dice
from medseg_diff.inference.sliding_window import VolumePrediction
from medseg_diff.models.attention import LinearAttention3d, MaskPriorCrossAttention

log = logging.getLogger(__name__)

#: ᾱ_t targets of the x_t question (plus T-1).
XT_ALPHAS = (0.9, 0.5, 0.1)
XT_VERSIONS = ("true", "inverted", "empty", "noise")
STEPS_GRID = (1, 2, 4, 10)
ENSEMBLE_GRID = (1, 4)
PRIOR_VARIANTS = ("none", "other", "outline", "truth")
#: How the prior is knocked out, per prior_source.
PRIOR_MODE = {"head": "conditioning", "external": "input", "optional": "input"}
KNOCKOUTS = {"cross": MaskPriorCrossAttention, "self": LinearAttention3d}
NEIGHBOURHOOD = 3  # voxels of dilation of the truth's WT where member variance is averaged


def region_dice(probs: np.ndarray, regions: np.ndarray, threshold: float) -> dict[str, float]:
    """Dice of each region and their mean: ``probs [3, X, Y, Z]`` (already 0 outside the head) > ``threshold``
    vs the truth ``regions [3, X, Y, Z]``."""
    out = {name: dice(probs[i] > threshold, regions[i]) for i, name in enumerate(REGIONS)}
    out["mean"] = float(np.mean([out[r] for r in REGIONS]))
    return out


def outside_head_zeroed(volume: np.ndarray, head: np.ndarray) -> np.ndarray:
    """``volume [C, X, Y, Z]`` with every channel 0 where ``head`` is False (what ``predict`` writes)."""
    return np.where(head[None], volume, 0.0).astype(np.float32)


def timesteps_of(scheduler) -> dict[str, int]:
    """``{"abar0.9": t, "abar0.5": t, "abar0.1": t, "T-1": T-1}``: the timesteps whose ᾱ_t is closest to each."""
    alpha_bar = scheduler.alphas_cumprod.detach().cpu().double()
    out = {f"abar{a}": int((alpha_bar - a).abs().argmin()) for a in XT_ALPHAS}
    out["T-1"] = len(alpha_bar) - 1
    return out


def xt_use(net, scheduler, case: AuditCase, windowing: Windowing, seed: int, threshold: float,
           prior: np.ndarray | None = None) -> dict:
    """Question 1 for one case: ``{"timesteps", "alpha_bar", "dice": {version: {t label: mean Dice}}}``.
    ``prior`` (``[3, X, Y, Z]``) goes to the network as its external prior."""
    steps = timesteps_of(scheduler)
    shape = case.shape
    x0 = torch.as_tensor(case.regions, dtype=torch.float32) * 2.0 - 1.0
    noise = torch.randn((3, *shape), generator=torch.Generator().manual_seed(seed))
    versions = [x0, -x0, -torch.ones_like(x0)]
    alpha_bar = scheduler.alphas_cumprod.detach().cpu().double()
    out = {"timesteps": steps, "alpha_bar": {k: float(alpha_bar[t]) for k, t in steps.items()},
           "dice": {v: {} for v in XT_VERSIONS}}
    extra = [] if prior is None else [torch.as_tensor(prior, dtype=torch.float32)]
    for label, t in steps.items():
        tt = torch.tensor([t], dtype=torch.long)
        noisy = [scheduler.add_noise(v[None], noise[None], tt)[0] for v in versions] + [noise]
        inputs = torch.cat([case.image.cpu()[0], *extra, *noisy], dim=0)[None].to(case.image.device)
        segmenter = X0Segmenter(net, scheduler, t, len(XT_VERSIONS), with_prior=prior is not None)
        probs = windowing.run(segmenter, inputs).probs.float().cpu().numpy()
        for i, version in enumerate(XT_VERSIONS):
            part = outside_head_zeroed(probs[3 * i:3 * i + 3], case.head)
            out["dice"][version][label] = region_dice(part, case.regions, threshold)["mean"]
        if getattr(scheduler, "x_skip", False):  # what the parametrisation's skip from x_t alone would give
            skip = torch.sigmoid(x0_logits(scheduler, torch.zeros_like(noisy[0])[None], noisy[0][None], tt))[0]
            part = outside_head_zeroed(skip.numpy(), case.head)
            out.setdefault("skip_only", {})[label] = region_dice(part, case.regions, threshold)["mean"]
    return out


def member_summary(prediction: VolumePrediction, case: AuditCase, threshold: float, ensemble: int) -> dict:
    """Questions 3 and 4 from a run with ``keep_members``: variance near the tumour, disagreeing voxels, and the
    AUROC of variance and entropy for the errors of the mean prediction."""
    from medseg_diff.evaluation.scoring import uncertainty_quality

    probs = outside_head_zeroed(prediction.probs.float().cpu().numpy(), case.head)
    mean, members = probs[:3], probs[3:].reshape(ensemble, 3, *case.shape)
    entropy = outside_head_zeroed(prediction.entropy.float().cpu().numpy(), case.head)[0]
    variance = outside_head_zeroed(prediction.variance.float().cpu().numpy(), case.head)[0]
    masks = members > threshold
    disagree = (masks.any(axis=0) != masks.all(axis=0)).any(axis=0)
    near = dilated(case.regions[1], NEIGHBOURHOOD)
    predicted = mean > threshold
    return {
        "dice": region_dice(mean, case.regions, threshold),
        "variance_near_tumour": float(variance[near].mean()) if near.any() else float("nan"),
        "variance_max": float(variance.max()),
        "disagreeing_voxels": int(disagree.sum()),
        "variance_auroc": uncertainty_quality(mean, variance, predicted, case.regions)[0]["uncertainty_auroc"],
        "entropy_auroc": uncertainty_quality(mean, entropy, predicted, case.regions)[0]["uncertainty_auroc"],
    }


class DiffusionProbe:
    """Questions 1-6 of one case for a loaded diffusion model (``inference.loading.LoadedModel``)."""

    def __init__(self, model, windowing: Windowing, seed: int, steps_grid: Sequence[int] = STEPS_GRID,
                 ensemble_grid: Sequence[int] = ENSEMBLE_GRID):
        self.net, self.adapter, self.windowing, self.seed = model.net, model.adapter, windowing, seed
        self.threshold = float(model.cfg.infer.threshold)
        self.base = model.adapter.segmenter(model.net, validation=False, seed=seed).sampler
        self.prior_source = str(getattr(model.net, "prior_source", "none"))
        self.steps_grid, self.ensemble_grid = tuple(steps_grid), tuple(ensemble_grid)

    @property
    def default(self) -> tuple[int, int]:
        """The product's (K, N)."""
        return int(self.base.steps), int(self.base.ensemble)

    def own_prior(self, case: AuditCase) -> np.ndarray | None:
        """The prior the product's runs get here: the rough outline for a model that needs one (external)."""
        return case.outline() if self.prior_source == "external" else None

    def sample(self, case: AuditCase, image: torch.Tensor | None = None, prior: np.ndarray | None = None,
               prior_mode: str = "input", steps: int | None = None, ensemble: int | None = None,
               members: bool = False, attention: bool = False, token_changes: list | None = None
               ) -> VolumePrediction:
        """One whole-volume sampling run (the product's sampler unless ``steps`` / ``ensemble`` say otherwise)."""
        sampler = sampler_variant(self.base, self.adapter.scheduler(), steps, ensemble)
        segmenter = SampleSegmenter(self.net, sampler, prior=None if prior is None else prior_mode,
                                    attention=attention, keep_members=members, token_changes=token_changes)
        inputs = case.image if image is None else image
        if prior is not None:
            inputs = torch.cat([inputs, torch.as_tensor(prior, dtype=inputs.dtype, device=inputs.device)[None]], 1)
        return self.windowing.run(segmenter, inputs)

    def dice_of(self, prediction: VolumePrediction, case: AuditCase) -> float:
        probs = outside_head_zeroed(prediction.probs[:3].float().cpu().numpy(), case.head)
        return region_dice(probs, case.regions, self.threshold)["mean"]

    def default_run(self, case: AuditCase) -> VolumePrediction:
        """The product's prediction of the case with its members and attention maps kept."""
        return self.sample(case, prior=self.own_prior(case), members=True, attention=True)

    # -- the questions ---------------------------------------------------------------------------------------
    def xt_use(self, case: AuditCase) -> dict:
        return xt_use(self.net, self.adapter.scheduler(), case, self.windowing, self.seed, self.threshold,
                      prior=self.own_prior(case))

    def refinement(self, case: AuditCase, default_dice: float) -> dict:
        """Question 2: ``{"K{k}xN{n}": Dice}`` over the grid and ``default``."""
        out = {}
        for k in self.steps_grid:
            for n in self.ensemble_grid:
                if (k, n) == self.default:
                    out[f"K{k}xN{n}"] = default_dice
                else:
                    run = self.sample(case, prior=self.own_prior(case), steps=k, ensemble=n)
                    out[f"K{k}xN{n}"] = self.dice_of(run, case)
        out["default"] = default_dice
        return out

    def prior_knockouts(self, case: AuditCase, other: AuditCase | None) -> dict:
        """Question 5: Dice with no prior, another case's, the rough outline and the truth, and how they were given."""
        mode = PRIOR_MODE.get(self.prior_source)
        if mode is None:
            return {"applicable": False, "how": f"no prior (prior_source {self.prior_source})"}
        zeros = np.zeros((3, *case.shape), dtype=np.float32)
        priors = {
            "none": None if self.prior_source == "optional" else zeros,
            "other": None if other is None else resampled(other.outline(), case.shape),
            "outline": case.outline(),
            "truth": case.regions.astype(np.float32),
        }
        out = {"applicable": True, "how": mode, "dice": {}, "token_change_no_prior": float("nan")}
        for name, prior in priors.items():
            if name == "other" and prior is None:
                out["dice"][name] = float("nan")  # one case: no other case to take a prior from
                continue
            changes: list[float] = []
            if name == "none" and self.prior_source == "optional":
                run = self.sample(case)
            else:
                run = self.sample(case, prior=prior, prior_mode=mode, token_changes=changes)
            out["dice"][name] = self.dice_of(run, case)
            if name == "none" and changes:
                out["token_change_no_prior"] = float(np.mean(changes))
        out["delta"] = {k: v - out["dice"]["none"] for k, v in out["dice"].items() if k != "none"}
        return out

    def attention_knockouts(self, case: AuditCase, default_dice: float) -> dict:
        """Question 6: ``{kind: {"layers", "dice", "delta"}}`` with the residual of that attention zeroed."""
        out = {}
        for kind, layer_type in KNOCKOUTS.items():
            with residual_zeroed(self.net, layer_type) as layers:
                if not layers:
                    out[kind] = {"layers": 0}
                    continue
                value = self.dice_of(self.sample(case, prior=self.own_prior(case), attention=True), case)
            out[kind] = {"layers": layers, "dice": value, "delta": value - default_dice}
        return out
