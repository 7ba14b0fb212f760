"""The train stage: a config file (with ``--set`` overrides) validated before any work, then ``training.run.train``."""

from __future__ import annotations

from pathlib import Path

from medseg_diff.config import Config, load_config
from medseg_diff.training.run import train
from medseg_diff.training.trainer import TrainState


def train_config(config: str | Path, overrides: list[str] = (), resume: bool = True, check_data: bool = True,
                 verify_checksums: bool = True) -> tuple[Config, TrainState]:
    """Load and check ``config`` (``ConfigError`` naming the key and file before any work), then train it."""
    cfg = load_config(config, list(overrides))
    return cfg, train(cfg, resume=resume, check_data=check_data, verify_checksums=verify_checksums)


__all__ = ["train", "train_config", "load_config"]
