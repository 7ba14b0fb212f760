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
        wt = dilate_cube(wt, dilate)
    for _ in range(blur):
        wt = F.avg_pool3d(wt, 3, stride=1, padding=1, count_include_pad=False)
    return wt.expand(-1, 3, -1, -1, -1).clamp(0, 1)


def dilate_cube(mask: Tensor, voxels: int) -> Tensor:
    """``F.max_pool3d(mask, 2 * voxels + 1, stride=1, padding=voxels)`` (dilation by a cube) as three 1-D passes:
    a maximum over a box is the maximum of per-axis maxima, so the result is the same to the bit, with 3·(2v+1)
    taps instead of (2v+1)³ (5.2 ms -> well under 1 ms for a 32³ crop at v = 3). ``mask [B, C, X, Y, Z]``."""
    k = 2 * voxels + 1
    for axis in range(3):
        size = [1, 1, 1]
        size[axis], pad = k, [0, 0, 0]
        pad[axis] = voxels
        mask = F.max_pool3d(mask, tuple(size), stride=1, padding=tuple(pad))
    return mask


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
    scale = _confidence(b, generator, device)  # drawn for every case, so the draws do not depend on the kinds
    out = regions.new_zeros(b, 4, *regions.shape[2:])
    for i in range(b):
        if float(draw[i]) < none:
            continue
        kind = (float(draw[i]) - none) / max(1.0 - none, 1e-9)  # uniform in [0, 1) among the cases given a prior
        if kind < 2 / 3:
            prior = rough_outline(regions[i : i + 1], int(dilation[i]))[0]
            if kind >= 1 / 3:
                prior = torch.roll(prior, tuple(int(s) for s in shifts[i]), dims=(1, 2, 3))
        else:  # blurred only for the cases that use it (the 5³ box was 5 % of a demo training step for all)
            prior = _blurred(regions[i : i + 1])[0] * scale[i]
        out[i, :3], out[i, 3] = prior, 1.0
    return out


def _blurred(regions: Tensor) -> Tensor:
    return F.avg_pool3d(regions, kernel_size=5, stride=1, padding=2, count_include_pad=False)


def _confidence(b: int, generator: torch.Generator | None, device) -> Tensor:
    return 0.5 + 0.5 * torch.rand((b, 1, 1, 1, 1), generator=generator, device=device)


def simulated_prior(regions: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A rough outline standing in for an external prior while training ``prior_source="external"``.

    The ground-truth regions ``[B, 3, X, Y, Z]`` are blurred (box filter, 5 voxels) and scaled by a
    random confidence in [0.5, 1] per case, as a coarse prior from another model or a clinician would be.
    """
    return _blurred(regions) * _confidence(regions.shape[0], generator, regions.device)
