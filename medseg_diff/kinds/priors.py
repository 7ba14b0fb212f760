"""Mask priors that stand in for a clinician's outline or another model's mask while a prior-taking model trains,
and the rough outline the audit and the study give at inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rough_outline(regions: Tensor, dilate: int = 2, blur: int = 1) -> Tensor:
    """A clinician's rough outline: the whole tumour (channel 1 of ``regions [B, 3, X, Y, Z]``) dilated by ``dilate``
    voxels (a cube), blurred ``blur`` times by a 3-voxel box (about a Gaussian of σ = 0.8 voxel per pass), copied
    into all 3 channels (an outline says nothing of the sub-regions). ``-> [B, 3, X, Y, Z]`` in [0, 1]."""
    wt = regions[:, 1:2].float()
    if dilate > 0:
        wt = F.max_pool3d(wt, 2 * dilate + 1, stride=1, padding=dilate)
    for _ in range(blur):
        wt = F.avg_pool3d(wt, 3, stride=1, padding=1, count_include_pad=False)
    return wt.expand(-1, 3, -1, -1, -1).clamp(0, 1)


def simulated_priors(regions: Tensor, generator: torch.Generator | None = None, none: float = 0.4) -> Tensor:
    """Priors of varying quality for training ``prior_source="optional"``, one draw per case,
    ``-> [B, 4, X, Y, Z]`` (3 prior channels and the given/absent flag the network reads):

    * ``none`` (default 40 %): no prior (zeros, flag 0) -- so the model works without one;
    * of the rest, a third each: a rough outline (:func:`rough_outline`, 1-3 voxels dilation); the outline shifted
      by up to 4 voxels per axis (a misplaced or other-visit outline); the regions blurred and scaled by a
      confidence in [0.5, 1] (another model's soft mask).
    """
    b = regions.shape[0]
    device = regions.device
    draw = torch.rand(b, generator=generator, device=device)
    dilation = torch.randint(1, 4, (b,), generator=generator, device=device)
    shifts = torch.randint(-4, 5, (b, 3), generator=generator, device=device)
    soft = simulated_prior(regions, generator)
    out = regions.new_zeros(b, 4, *regions.shape[2:])
    for i in range(b):
        if float(draw[i]) < none:
            continue
        kind = (float(draw[i]) - none) / max(1.0 - none, 1e-9)  # uniform in [0, 1) among the cases given a prior
        if kind < 2 / 3:
            prior = rough_outline(regions[i : i + 1], int(dilation[i]))[0]
            if kind >= 1 / 3:
                prior = torch.roll(prior, tuple(int(s) for s in shifts[i]), dims=(1, 2, 3))
        else:
            prior = soft[i]
        out[i, :3], out[i, 3] = prior, 1.0
    return out


def simulated_prior(regions: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A rough outline standing in for an external prior while training ``prior_source="external"``.

    The ground-truth regions ``[B, 3, X, Y, Z]`` are blurred (box filter, 5 voxels) and scaled by a
    random confidence in [0.5, 1] per case, as a coarse prior from another model or a clinician would be.
    """
    blurred = F.avg_pool3d(regions, kernel_size=5, stride=1, padding=2, count_include_pad=False)
    scale = 0.5 + 0.5 * torch.rand((regions.shape[0], 1, 1, 1, 1), generator=generator, device=regions.device)
    return blurred * scale
