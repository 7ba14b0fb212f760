"""``train(cfg)``: what ``pipelines/train.py`` and ``medseg-diff train`` call.

1. join the process group (torchrun) and pick the device
2. read the manifest; take the fold's train/val cases
3. build the task (model + loss), the cached datasets and the hooks (MLflow on rank 0)
4. run the trainer (resuming from ``output_dir/last.pt``)
"""

from __future__ import annotations

import platform
import sys

import torch

from medseg_diff.config import Config
from medseg_diff.data.conventions import get_convention
from medseg_diff.data.dataset import case_record, make_dataset
from medseg_diff.data.manifest import load_manifest
from medseg_diff.data.transforms import eval_transforms, train_transforms
from medseg_diff.engine.distributed import cleanup, init_distributed
from medseg_diff.engine.tasks import build_task
from medseg_diff.engine.trainer import BEST, LAST, Trainer, TrainState
from medseg_diff.errors import ConfigError, DataError
from medseg_diff.tracking import git_commit, start_tracker


class MlflowHook:
    """Logs the training run: params, tags, per-epoch metrics, checkpoints. The same run on resume."""

    def __init__(self, cfg: Config, dataset: str, manifest_hash: str):
        self.cfg, self.dataset, self.manifest_hash = cfg, dataset, manifest_hash
        self.tracker = None

    def on_start(self, trainer: Trainer) -> None:
        t = self.cfg.tracking
        name = t.run_name or f"{trainer.task.kind}-fold{self.cfg.data.fold}"
        tags = {
            "model": trainer.task.kind, "dataset": self.dataset, "git_commit": git_commit(),
            "manifest_hash": self.manifest_hash, "device": device_description(trainer.device),
            "world_size": str(trainer.dist.world_size), "stage": "train", "fold": str(self.cfg.data.fold),
        }
        self.tracker = start_tracker(t.enabled, t.uri, t.experiment or self.dataset, run_name=name,
                                     run_id=trainer.state.run_id, tags=tags)
        if self.tracker.run_id != trainer.state.run_id:  # a new run (also when the saved one is gone)
            self.tracker.log_params(self.cfg.flat() | {"parameters": sum(p.numel() for p in trainer.net.parameters())})
        if trainer.state.epoch:
            self.tracker.set_tags({"resumed_at_epoch": str(trainer.state.epoch)})
        trainer.state.run_id = self.tracker.run_id

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=epoch)

    def on_end(self, trainer: Trainer, status: str) -> None:
        if self.tracker is None:
            return
        if self.cfg.tracking.log_checkpoints:
            for name in (BEST, LAST):
                path = trainer.out_dir / name
                if path.exists():
                    self.tracker.log_artifact(path, "checkpoints")
        if trainer.state.best_epoch > 0:
            self.tracker.log_metrics({"best_val_dice_mean": trainer.state.best_metric}, step=trainer.state.best_epoch)
        self.tracker.end(status)


class ConsoleHook:
    """One line per epoch."""

    def on_start(self, trainer: Trainer) -> None:
        if trainer.state.epoch:
            print(f"[{trainer.task.kind}] resuming after epoch {trainer.state.epoch}", flush=True)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        keys = ["train_loss"] + [k for k in metrics if k.startswith("val_dice")]
        text = "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)
        print(f"[{trainer.task.kind}] epoch {epoch}/{trainer.cfg.train.epochs}  {text}  "
              f"({metrics.get('epoch_seconds', 0):.1f}s)", flush=True)

    def on_end(self, trainer: Trainer, status: str) -> None:
        pass


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} (torch {torch.__version__})"


def train(cfg: Config, resume: bool = True) -> TrainState:
    """Train ``cfg.model.kind`` on ``cfg.data.manifest``; returns the final state (best metric, run id)."""
    # 1. processes and device
    dist_info, device = init_distributed(cfg.train.device)
    torch.manual_seed(cfg.experiment.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        # 2. data
        if cfg.data.manifest is None:
            raise ConfigError("data.manifest", "training needs a manifest (medseg-diff manifest ROOT --out ...)")
        manifest = load_manifest(cfg.data.manifest, root=cfg.data.root)
        conv = get_convention(manifest.convention)
        train_cases, val_cases, _ = manifest.split(cfg.data.fold)
        if not train_cases:
            raise DataError(manifest.source, f"no labelled training cases in fold {cfg.data.fold}")
        if cfg.data.max_val_cases is not None:
            val_cases = val_cases[: cfg.data.max_val_cases]
        # 3. task, datasets, hooks
        task = build_task(cfg)
        _check_roi(cfg, task.stride)
        t_train = train_transforms(conv, cfg.data.spacing, cfg.data.roi_size, cfg.data.samples_per_volume,
                                   cfg.data.pos_neg)
        train_ds = make_dataset([case_record(manifest, c) for c in train_cases], t_train, cfg.data.cache,
                                cfg.data.cache_dir, progress=False)
        val_ds = make_dataset([case_record(manifest, c) for c in val_cases], eval_transforms(conv, cfg.data.spacing),
                              cfg.data.cache, cfg.data.cache_dir, progress=False) if val_cases else []
        hooks = []
        if dist_info.is_main:
            hooks = [MlflowHook(cfg, manifest.name, manifest.content_hash())]
            if cfg.train.progress:
                hooks.append(ConsoleHook())
        trainer = Trainer(cfg, task, train_ds, val_ds, device, dist_info, hooks, train_transform=t_train)
        # 4. train
        return trainer.fit(resume=resume)
    finally:
        cleanup(dist_info)


def _check_roi(cfg: Config, stride: int) -> None:
    sizes = [("data.roi_size", cfg.data.roi_size)] + ([("infer.roi_size", cfg.infer.roi_size)] if cfg.infer.roi_size else [])
    for key, roi in sizes:
        if any(s % stride for s in roi):
            raise ConfigError(key, f"{list(roi)} must be a multiple of the network stride {stride}")


if __name__ == "__main__":  # pragma: no cover - torchrun entry for tests: python -m medseg_diff.engine.train_api CFG
    from medseg_diff.config import load_config

    state = train(load_config(sys.argv[1], sys.argv[2:]))
    print(f"done epoch={state.epoch} best={state.best_metric:.4f}")
