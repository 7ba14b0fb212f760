"""Side effects of a training run, as ``TrainerHook``s: MLflow (rank 0) and one log line per epoch."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from medseg_diff.config import Config
from medseg_diff.data.manifest import Manifest
from medseg_diff.kinds import KINDS, info
from medseg_diff.tracking import source_tags, start_tracker
from medseg_diff.training.trainer import BEST, LAST, Trainer

log = logging.getLogger(__name__)

#: Config sections that belong to one model kind only: a run logs its own and not the others'.


def own_params(cfg: Config) -> dict[str, object]:
    """The flattened config without the other model kinds' settings."""
    skip = tuple(p for kind in KINDS if kind != cfg.model.kind for p in info(kind).params)
    return {k: v for k, v in cfg.flat().items() if not k.startswith(skip)}


def manifest_profile(manifest: Manifest, fold: int) -> dict[str, object]:
    """What the MLflow dataset entry shows of a manifest: its size and this run's split."""
    train, val, test = manifest.split(fold)
    return {"convention": manifest.convention, "cases": len(manifest.cases), "fold": fold,
            "train_cases": len(train), "val_cases": len(val), "test_cases": len(test)}


class MlflowHook:
    """Logs the training run: params, provenance tags, the manifest as a dataset input and artifact, per-epoch
    metrics, checkpoints, and the trained model (registered). The same run on resume."""

    def __init__(self, cfg: Config, manifest: Manifest):
        self.cfg, self.manifest = cfg, manifest
        self.tracker = None

    def on_start(self, trainer: Trainer) -> None:
        t, m = self.cfg.tracking, self.manifest
        kind = trainer.adapter.kind
        name = t.run_name or f"train: {kind}, fold {self.cfg.data.fold}"  # evaluation runs read "evaluate: a vs b, …"
        tags = {
            "model": kind, "dataset": m.name, "manifest_hash": m.content_hash(),
            "device": device_description(trainer.device), "world_size": str(trainer.dist.world_size),
            "stage": "train", "fold": str(self.cfg.data.fold), **source_tags(),
        }
        self.tracker = start_tracker(t.enabled, t.uri, t.experiment or m.name, run_name=name,
                                     run_id=trainer.state.run_id, tags=tags)
        if self.tracker.run_id != trainer.state.run_id:  # a new run (also when the saved one is gone)
            self.tracker.log_params(own_params(self.cfg) | {"parameters": sum(p.numel() for p in trainer.net.parameters())})
            self.tracker.log_dataset(m.name, m.content_hash(), str(m.source or m.root), "training",
                                     manifest_profile(m, self.cfg.data.fold))
            if m.source is not None and Path(m.source).exists():
                self.tracker.log_artifact(m.source, "manifest")
        if trainer.state.epoch:
            self.tracker.set_tags({"resumed_at_epoch": str(trainer.state.epoch)})
        if self.tracker.run_id is not None:  # tracking off: keep the run a tracked resume will continue
            trainer.state.run_id = self.tracker.run_id

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=epoch)

    def on_end(self, trainer: Trainer, status: str) -> None:
        if self.tracker is None:
            return
        try:
            if self.cfg.tracking.log_checkpoints:
                for name in (BEST, LAST):
                    path = trainer.out_dir / name
                    if path.exists():
                        self.tracker.log_artifact(path, "checkpoints")
            if trainer.state.best_epoch > 0:
                self.tracker.log_metrics({"best_val_dice_mean": trainer.state.best_metric},
                                         step=trainer.state.best_epoch)
            best = trainer.out_dir / BEST
            if status == "FINISHED" and self.cfg.tracking.register_model and best.exists() and self.tracker.run_id:
                from medseg_diff.tracking.registry import log_model

                name = self.cfg.tracking.register_model.format(kind=trainer.adapter.kind, dataset=self.manifest.name)
                uri = log_model(self.tracker, best, registered_name=name)
                if uri:
                    log.info("[%s] registered %s", trainer.adapter.kind, uri)
        finally:
            self.tracker.end(status)


class LogHook:
    """One log line per epoch."""

    def on_start(self, trainer: Trainer) -> None:
        if trainer.state.epoch:
            log.info("[%s] resuming after epoch %d", trainer.adapter.kind, trainer.state.epoch)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        keys = ["train_loss"] + [k for k in metrics if k.startswith("val_dice")]
        text = "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)
        log.info("[%s] epoch %d/%d  %s  (%.1fs)", trainer.adapter.kind, epoch, trainer.cfg.train.epochs, text,
                 metrics.get("epoch_seconds", 0))

    def on_end(self, trainer: Trainer, status: str) -> None:
        pass


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} (torch {torch.__version__})"
