"""What every model kind provides (:class:`ModelKind`), and what the generic stages may ask of it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import Tensor, nn

from medseg_diff.diffusion.loss import LossOutput, LossWeights
from medseg_diff.errors import DataError
from medseg_diff.kinds.registry import KindInfo, info
from medseg_diff.kinds.priors import simulated_prior, simulated_priors
from medseg_diff.kinds.segmenters import Segmenter

if TYPE_CHECKING:  # annotations only: the config imports the kinds, not the other way round
    from medseg_diff.config import Config


def build_network(spec: dict[str, Any], networks: dict[str, Callable[..., nn.Module]],
                  source: str | Path | None = None) -> nn.Module:
    """``networks[spec["name"]](**spec["kwargs"])``; a spec this version cannot build is refused by name."""
    name = spec.get("name") if isinstance(spec, dict) else spec
    try:
        factory = networks[name]
        return factory(**spec["kwargs"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(source, f"cannot build the network {name!r} from the checkpoint's "
                                f"arguments ({type(err).__name__}: {err})") from err


class Objective(Protocol):
    """The training loss of a batch, and the module that DDP wraps."""

    def train_module(self) -> nn.Module: ...

    def loss(self, module: nn.Module, image: Tensor, regions: Tensor,
             generator: torch.Generator | None = None) -> LossOutput: ...


def loss_weights(cfg: Config) -> LossWeights:
    w = cfg.loss
    return LossWeights(dice=w.dice, bce=w.bce, mse=w.mse, prior=w.prior, attention=w.attention)


class ModelKind(ABC):
    """One model kind. Subclasses set ``kind`` (a :data:`~medseg_diff.kinds.REGISTRY` name), ``network_name`` and
    ``network_factory``, and define ``network_spec``, ``config_stride``, ``segmenter`` and ``objective``."""

    kind: str = ""
    network_name: str = ""  # the name a checkpoint's ``network`` entry gives
    network_factory: Callable[..., nn.Module]
    uses_ema: bool = False  # training keeps an EMA of the weights for inference
    external_prior: bool = False  # the network needs an external prior
    optional_prior: bool = False  # the network works without one and takes one when given

    def __init__(self, cfg: Config, net: nn.Module | None = None):
        self.cfg = cfg
        self.spec = self.network_spec(cfg)
        self.net = net if net is not None else build_network(self.spec, {self.network_name: self.network_factory})

    @property
    def info(self) -> KindInfo:
        return info(self.kind)

    @staticmethod
    @abstractmethod
    def network_spec(cfg: Config) -> dict[str, Any]:
        """The network's constructor arguments ``{"name", "kwargs"}`` (stored in checkpoints)."""

    @classmethod
    @abstractmethod
    def config_stride(cls, cfg: Config) -> tuple[int, str]:
        """``(stride, how it follows from the config)``: every crop and sliding-window size must be a multiple of
        it. The network's own ``stride`` is the same number (tests/config check both)."""

    @classmethod
    def loss_terms(cls, cfg: Config) -> list[str]:
        """The ``loss.*`` weights this kind trains with (at least one must be > 0)."""
        return ["dice", "bce"]

    @property
    def stride(self) -> int:
        """Every spatial size the network sees must be a multiple of this."""
        return int(self.net.stride)

    @abstractmethod
    def segmenter(self, net: nn.Module, validation: bool = False, seed: int = 0) -> Segmenter:
        """Windows → probabilities, uncertainty (and attention) for whole-volume inference."""

    @abstractmethod
    def objective(self) -> Objective:
        """The training objective."""

    def sampler_settings(self) -> dict[str, int] | None:
        """``{"sample_steps", "ensemble"}`` of a sampled kind, None for one forward pass."""
        return None

    def training_prior(self, regions: Tensor, generator: torch.Generator | None = None,
                       validation: bool = False) -> Tensor | None:
        """The prior input during training and validation: None unless the network takes an external prior;
        for an optional prior, a mix of none and priors of varying quality in training, none in validation."""
        if self.optional_prior:
            return None if validation else simulated_priors(regions, generator, self.cfg.diffusion.prior_none)
        return simulated_prior(regions, generator) if self.external_prior else None

    def check_prior(self, has_prior: bool, where: str | Path | None, case: str | None = None) -> None:
        """Refuse a prior the network does not take, or a missing one it needs (``where``: the file or model)."""
        if self.external_prior and not has_prior:
            raise DataError(where, f"this {self.kind} model was trained with prior_source=external and needs a mask "
                                   "prior per case: pass --prior-dir (e.g. the baseline's prediction folders)",
                            case=case)
        if has_prior and not (self.external_prior or self.optional_prior):
            raise DataError(where, f"a prior was given, but this {self.kind} model takes no external prior; "
                                   "predict without --prior-dir", case=case)
