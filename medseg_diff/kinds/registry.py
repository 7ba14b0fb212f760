"""The registry of model kinds: one row per kind (what the rest of the package may know without loading it) and
the lookup of its class. Imports nothing heavy."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class KindInfo:
    """What the rest of the package may know of a kind without loading it."""

    name: str  # model.kind
    module: str  # the module that defines the kind's class ``KIND``
    section: str  # the config section of its network: model.SECTION
    params: tuple[str, ...]  # prefixes of the flattened config keys that are this kind's alone (MLflow params)
    samples: bool  # predictions are drawn by a sampler (steps x ensemble members), not one forward pass


REGISTRY: dict[str, KindInfo] = {k.name: k for k in (
    KindInfo("diffusion", "medseg_diff.kinds.diffusion", "denoiser", ("model.denoiser.", "diffusion."), True),
    KindInfo("unet", "medseg_diff.kinds.unet", "unet", ("model.unet.",), False),
    KindInfo("attention_unet", "medseg_diff.kinds.attention_unet", "attention_unet", ("model.attention_unet.",),
             False),
)}
#: model.kind values, in the order the config documents them
KINDS: tuple[str, ...] = tuple(REGISTRY)


def info(name: str) -> KindInfo:
    """The registry row of ``name``; ``KeyError`` naming the known kinds."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model kind {name!r} (known: {', '.join(KINDS)})") from None


def kind_class(name: str):
    """The :class:`~.base.ModelKind` subclass of ``name`` (its module imported on first use)."""
    return importlib.import_module(info(name).module).KIND


def build_kind(cfg, net=None):
    """The kind of ``cfg.model.kind``, with a new network from the config unless ``net`` is given."""
    return kind_class(cfg.model.kind)(cfg, net)
