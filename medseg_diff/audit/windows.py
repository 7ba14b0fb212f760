"""What the audit runs through the product's sliding windows, and the knock-outs it applies to a network.

Every whole-volume prediction of the audit goes through ``inference.sliding_window.infer_volume`` with the
checkpoint's windows (roi, overlap, blending), like ``predict``. What must be windowed together with the image --
an external prior, the noisy masks ``x_t`` of the x_t question -- travels as extra input channels after the 4
modalities (as an external prior already does in the product), and a ``Segmenter`` of this module splits them off:

* :class:`X0Segmenter`: one x0 prediction (``diffusion.sampler.predict_x0``) at a fixed timestep for V versions
  of ``x_t`` at once (the image encoded once per window);
* :class:`SampleSegmenter`: the full DDIM sampler, as ``DiffusionSegmenter`` runs it, optionally keeping the
  members (as extra probability channels, blended like the mean) and optionally with a prior put into the
  conditioning instead of the input (``conditioning_prior``).

Knock-outs are context managers that patch network *instances* for their duration and restore them after:
``residual_zeroed`` (an attention layer returns its input: both ``__call__``/``forward`` and
``forward_with_attention``, which the sampler's last step calls), ``conditioning_prior`` (``encode`` returns the
network's conditioning with ``cond.prior`` replaced and ``cond.tokens`` rebuilt from it).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import Tensor, nn

from medseg_diff.diffusion import sampler as sampler_module
from medseg_diff.diffusion.schedules import x0_from_output
from medseg_diff.inference.sliding_window import VolumePrediction, infer_volume
from medseg_diff.kinds.segmenters import ATTENTION_PREFIX, ENTROPY, PROBS, VARIANCE, Segmenter
from medseg_diff.models.attention import AttentionOutput
from medseg_diff.models.encoder import resample_to_grid

PRIOR_CHANNELS = 3


@dataclass(frozen=True)
class Windowing:
    """The checkpoint's sliding windows (``infer.*``; roi ``infer.roi_size`` or ``data.roi_size``)."""

    roi: tuple[int, int, int]
    overlap: float = 0.5
    sw_batch_size: int = 4
    mode: str = "gaussian"
    amp: bool = True

    @classmethod
    def of(cls, cfg) -> "Windowing":
        roi = tuple(int(r) for r in (cfg.infer.roi_size or cfg.data.roi_size))
        return cls(roi, cfg.infer.overlap, cfg.infer.sw_batch_size, cfg.infer.mode, cfg.train.amp)

    def run(self, segmenter: Segmenter, inputs: Tensor) -> VolumePrediction:
        """``infer_volume`` over ``inputs [1, 4 + extra, X, Y, Z]`` (the extra channels ride along)."""
        return infer_volume(segmenter, inputs, self.roi, overlap=self.overlap, sw_batch_size=self.sw_batch_size,
                            mode=self.mode, amp=self.amp)


def predict_x0(net: nn.Module, scheduler, x_t: Tensor, t: Tensor, cond) -> Tensor:
    """One network call's estimate of x0 in [-1, 1] (``diffusion.sampler.predict_x0`` without self-conditioning;
    before that function existed: the scheduler's parametrisation of the plain network output)."""
    package_predict = getattr(sampler_module, "predict_x0", None)
    if package_predict is not None:
        return package_predict(net, scheduler, x_t, t, cond, self_cond=None)
    return x0_from_output(scheduler, net(x_t, t, cond).float(), x_t, t)


class X0Segmenter:
    """``windows [b, 4 (+3 prior) + 3 V, x, y, z]`` -> ``probs [b, 3 V, x, y, z]``: for each of the V versions of
    ``x_t`` (channels ``3 v .. 3 v + 2`` after the image and prior), ``(x0 + 1) / 2`` of one x0 prediction at
    timestep ``t``. The image is encoded once per window and its conditioning repeated for the V versions."""

    has_prior_input = False

    def __init__(self, net: nn.Module, scheduler, t: int, versions: int, with_prior: bool = False, name: str = "x0"):
        self.net, self.scheduler, self.t, self.versions = net, scheduler, int(t), versions
        self.with_prior, self.name = with_prior, name

    @torch.no_grad()
    def __call__(self, windows: Tensor) -> dict[str, Tensor]:
        image, rest = windows[:, :4], windows[:, 4:]
        prior = None
        if self.with_prior:
            prior, rest = rest[:, :PRIOR_CHANNELS], rest[:, PRIOR_CHANNELS:]
        cond = self.net.encode(image, prior).repeat(self.versions)
        x_t = rearrange(rest, "b (v c) ... -> (b v) c ...", v=self.versions).float()
        t = torch.full((x_t.shape[0],), self.t, dtype=torch.long, device=x_t.device)
        x0 = predict_x0(self.net, self.scheduler, x_t, t, cond).float()
        probs = rearrange((x0 + 1.0) / 2.0, "(b v) c ... -> b (v c) ...", v=self.versions).clamp(0.0, 1.0)
        return {PROBS: probs, ENTROPY: torch.zeros_like(probs[:, :1])}


class SampleSegmenter:
    """The product's DDIM sampling of a window (what ``DiffusionSegmenter`` does), for the audit.

    ``windows [b, 4 (+3 prior), x, y, z]``; ``prior``: ``None`` (no prior channels), ``"input"`` (the 3 channels
    are the network's external prior) or ``"conditioning"`` (they replace ``cond.prior`` inside the network:
    :func:`conditioning_prior`). ``keep_members``: ``probs`` holds the mean's 3 channels followed by every
    member's 3 (``[b, 3 + 3 N, ...]``). Attention maps as the product exports them (the aggregates only).
    """

    has_prior_input = False

    def __init__(self, net: nn.Module, sampler, prior: str | None = None, attention: bool = False,
                 keep_members: bool = False, name: str = "diffusion", token_changes: list[float] | None = None):
        if prior not in (None, "input", "conditioning"):
            raise ValueError(f"prior must be None, 'input' or 'conditioning', got {prior!r}")
        self.net, self.sampler, self.prior, self.name = net, sampler, prior, name
        self.attention, self.keep_members = attention, keep_members
        self.token_changes = token_changes

    @torch.no_grad()
    def __call__(self, windows: Tensor) -> dict[str, Tensor]:
        image = windows[:, :4]
        extra = windows[:, 4:4 + PRIOR_CHANNELS] if self.prior is not None else None
        patch = (conditioning_prior(self.net, extra, self.token_changes) if self.prior == "conditioning"
                 else contextlib.nullcontext())
        with patch:
            out = self.sampler.sample(self.net, image, external_prior=extra if self.prior == "input" else None,
                                      attention=self.attention, keep_members=self.keep_members)
        probs = out.probs
        if self.keep_members:
            probs = torch.cat([probs, rearrange(out.members, "b n c ... -> b (n c) ...")], dim=1)
        maps = {PROBS: probs, ENTROPY: out.entropy, VARIANCE: out.variance}
        maps.update({ATTENTION_PREFIX + k: v for k, v in out.attention.items() if "_l" not in k})
        return maps


def sampler_variant(base, scheduler, steps: int | None = None, ensemble: int | None = None):
    """A copy of the product's sampler ``base`` (every setting kept: seed, weighting, η, ...) with a fresh
    ``scheduler`` (``set_timesteps`` mutates it) and, where given, other K (``steps``) and N (``ensemble``)."""
    variant = copy.copy(base)
    variant.scheduler = scheduler
    if steps is not None:
        variant.steps = int(steps)
    if ensemble is not None:
        variant.ensemble = int(ensemble)
    return variant


# -- knock-outs ---------------------------------------------------------------------------------------------------


def _patch(module: nn.Module, name: str, value) -> Callable[[], None]:
    """Set instance attribute ``name``; returns the undo (which also restores an instance attribute it hid)."""
    had, old = name in vars(module), vars(module).get(name)
    setattr(module, name, value)

    def undo() -> None:
        if had:
            setattr(module, name, old)
        else:
            delattr(module, name)

    return undo


@contextlib.contextmanager
def residual_zeroed(net: nn.Module, layer_type: type) -> Iterator[int]:
    """Inside the block, every ``layer_type`` layer of ``net`` returns its input ``x`` instead of ``x + out``, on
    both paths (``forward``, reached through ``__call__``, and ``forward_with_attention``, whose map is kept).
    Yields the number of layers knocked out."""
    undo = []
    layers = [m for m in net.modules() if isinstance(m, layer_type)]
    for layer in layers:
        with_attention = layer.forward_with_attention

        def identity(x: Tensor, *args, **kwargs) -> Tensor:
            return x

        def identity_with_attention(x: Tensor, *args, _inner=with_attention, **kwargs) -> AttentionOutput:
            return AttentionOutput(x, _inner(x, *args, **kwargs).attention)

        undo.append(_patch(layer, "forward", identity))
        undo.append(_patch(layer, "forward_with_attention", identity_with_attention))
    try:
        yield len(layers)
    finally:
        for step in reversed(undo):
            step()


@contextlib.contextmanager
def conditioning_prior(net: nn.Module, prior: Tensor, token_changes: list[float] | None = None) -> Iterator[None]:
    """Inside the block, ``net.encode(image, ...)`` returns the network's own conditioning with ``cond.prior``
    replaced by ``prior [B or 1, 3, x, y, z]`` (probabilities, resampled to the token grid like an external prior)
    and ``cond.tokens`` rebuilt from it with ``net.encoder.tokens(prior, coarse)`` (coarse: the encoder's features
    of the token level at the token grid, as ``DiffusionSegUNet.encode`` computes them). For a network whose
    encoder sees only the image (prior_source head or none). ``token_changes`` collects
    ``|tokens' - tokens| / |tokens|`` of each call (how much the prior moves the tokens)."""
    own = net.encode

    def encode(image: Tensor, external_prior: Tensor | None = None, *args, **kwargs):
        cond = own(image, external_prior, *args, **kwargs)
        grid = cond.token_grid
        features, _ = net.encoder(image)
        coarse = resample_to_grid(features[getattr(net, "token_level", -1)], grid)
        p = resample_to_grid(prior.to(coarse.dtype), grid).expand(coarse.shape[0], -1, -1, -1, -1)
        if cond.tokens is None:
            return replace(cond, prior=p)
        tokens = net.encoder.tokens(p, coarse)
        if token_changes is not None:
            token_changes.append(float((tokens - cond.tokens).norm() / cond.tokens.norm().clamp_min(1e-12)))
        return replace(cond, prior=p, tokens=tokens)

    undo = _patch(net, "encode", encode)
    try:
        yield
    finally:
        undo()


@contextlib.contextmanager
def layer_inputs(net: nn.Module, layer_type: type) -> Iterator[dict[nn.Module, tuple]]:
    """Inside the block, the positional inputs of the last ``__call__`` of each ``layer_type`` layer are kept in
    the yielded dict (layer -> args). ``forward_with_attention`` does not go through ``__call__``: sample with
    ``attention=False`` so that every step does."""
    seen: dict[nn.Module, tuple] = {}
    handles = [m.register_forward_pre_hook(lambda m, args: seen.__setitem__(m, tuple(args)))
               for m in net.modules() if isinstance(m, layer_type)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
