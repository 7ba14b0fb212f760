"""Model kinds: one entry per kind in :data:`REGISTRY` and one module that owns everything else of it.

A kind's module (``kinds.unet``, ``kinds.attention_unet``, ``kinds.diffusion``) defines a :class:`~.base.ModelKind`
subclass that owns the network (its constructor arguments, stored in every checkpoint), its config section and
checks (the stride rule, the loss terms it trains), its segmenter (windows -> probabilities, uncertainty, maps),
its mask prior in training, and its training objective. The trainer, inference, evaluation, export and the stages
are generic: adding a kind touches its module and one row here, nothing else.

The registry (``kinds.registry``) imports nothing heavy (the report and the config read the table without loading
torch); the kind classes are imported on first use.
"""

from __future__ import annotations

from medseg_diff.kinds.registry import KINDS, REGISTRY, KindInfo, build_kind, info, kind_class

__all__ = ["KINDS", "REGISTRY", "KindInfo", "build_kind", "build_network", "info", "kind_class"]


def build_network(spec: dict, source=None):
    """The network a checkpoint's ``network`` entry describes (``{"name", "kwargs"}``), whichever kind owns it."""
    from medseg_diff.kinds.base import build_network as build

    return build(spec, {kind_class(k).network_name: kind_class(k).network_factory for k in KINDS}, source)
