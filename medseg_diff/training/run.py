"""``train(cfg)``: what ``pipelines/train.py`` and ``medseg-diff train`` call.

1. join the process group (torchrun) and pick the device
2. read the manifest; take the fold's train/val cases
3. build the adapter (network, prior), the cached datasets and the hooks (MLflow on rank 0)
4. run the trainer (resuming from ``output_dir/last.pt``)
"""

from __future__ import annotations

import logging
import sys

import torch

from medseg_diff.config import Config
from medseg_diff.data.conventions import get_convention
from medseg_diff.data.dataset import case_record, make_dataset
from medseg_diff.data.manifest import load_manifest
from medseg_diff.data.transforms import eval_transforms, train_transforms
from medseg_diff.errors import ConfigError, DataError
from medseg_diff.inference.adapters import build_adapter
from medseg_diff.runtime import configure_logging, pin_reproducibility
from medseg_diff.training.distributed import cleanup, init_distributed
from medseg_diff.training.hooks import LogHook, MlflowHook
from medseg_diff.training.trainer import Trainer, TrainState


def train(cfg: Config, resume: bool = True) -> TrainState:
    """Train ``cfg.model.kind`` on ``cfg.data.manifest``; returns the final state (best metric, run id)."""
    # 1. processes and device
    dist_info, device = init_distributed(cfg.train.device)
    pin_reproducibility(cfg.train.deterministic)
    torch.manual_seed(cfg.experiment.seed)
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
        adapter = build_adapter(cfg)
        _check_roi(cfg, adapter.stride)
        t_train = train_transforms(conv, cfg.data.spacing, cfg.data.roi_size, cfg.data.samples_per_volume,
                                   cfg.data.pos_neg)
        train_ds = make_dataset([case_record(manifest, c) for c in train_cases], t_train, cfg.data.cache,
                                cfg.data.cache_dir, progress=False)
        val_ds = make_dataset([case_record(manifest, c) for c in val_cases], eval_transforms(conv, cfg.data.spacing),
                              cfg.data.cache, cfg.data.cache_dir, progress=False) if val_cases else []
        hooks = []
        if dist_info.is_main:
            hooks = [MlflowHook(cfg, manifest)]
            if cfg.train.progress:
                hooks.append(LogHook())
        trainer = Trainer(cfg, adapter, train_ds, val_ds, device, dist_info, hooks, train_transform=t_train)
        # 4. train
        return trainer.fit(resume=resume)
    finally:
        cleanup(dist_info)


def _check_roi(cfg: Config, stride: int) -> None:
    sizes = [("data.roi_size", cfg.data.roi_size)] + ([("infer.roi_size", cfg.infer.roi_size)] if cfg.infer.roi_size else [])
    for key, roi in sizes:
        if any(s % stride for s in roi):
            raise ConfigError(key, f"{list(roi)} must be a multiple of the network stride {stride}")


if __name__ == "__main__":  # pragma: no cover - torchrun entry for tests: python -m medseg_diff.training.run CFG
    from medseg_diff.config import load_config

    configure_logging()
    state = train(load_config(sys.argv[1], sys.argv[2:]))
    logging.getLogger("medseg_diff.training.run").info("done epoch=%d best=%.4f", state.epoch, state.best_metric)
