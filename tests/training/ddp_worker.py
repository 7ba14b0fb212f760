"""One process of ``test_ddp_validation.py``'s two-process run (``torchrun ... ddp_worker.py CFG OUT``): joins the
gloo group, pins its threads, builds its datasets as ``train`` does, validates a seeded, untrained model with the
trainer and writes what it saw to ``OUT/rank{RANK}.json``. Not a test module (no ``test_`` prefix)."""

import json
import sys
from pathlib import Path

import torch

from medseg_diff.config import load_config
from medseg_diff.data.conventions import get_convention
from medseg_diff.data.dataset import CASE_ID
from medseg_diff.data.manifest import load_manifest
from medseg_diff.data.transforms import train_transforms
from medseg_diff.kinds import build_kind
from medseg_diff.runtime import pin_reproducibility
from medseg_diff.training.distributed import barrier, cleanup, init_distributed
from medseg_diff.training.run import rank_datasets
from medseg_diff.training.trainer import Trainer


def main(config: str, out: str) -> None:
    cfg = load_config(config)
    info, device = init_distributed("cpu")
    try:
        threads = pin_reproducibility(cfg.train.deterministic)
        torch.manual_seed(cfg.experiment.seed)  # as train: the same initial weights in every process
        adapter = build_kind(cfg)
        manifest = load_manifest(cfg.data.manifest)
        train_cases, val_cases, _ = manifest.split(cfg.data.fold)
        t_train = train_transforms(get_convention(manifest.convention), cfg.data.spacing, cfg.data.roi_size,
                                   cfg.data.samples_per_volume, cfg.data.pos_neg)
        train_ds, val_ds = rank_datasets(cfg, manifest, train_cases, val_cases, info, t_train)
        trainer = Trainer(cfg, adapter, train_ds, val_ds, device, info)
        metrics = trainer.validate()
        record = {
            "rank": info.rank, "world_size": info.world_size, "threads": threads,
            "torch_threads": torch.get_num_threads(),
            "train_records": [r[CASE_ID] for r in train_ds.data],  # what the CacheDataset was given ...
            "train_cached": len(train_ds._cache),  # ... and holds
            "val_records": [r[CASE_ID] for r in val_ds.data] if val_ds else [],
            "val_cached": len(val_ds._cache) if val_ds else 0,
            "val_cases": trainer.val_cases, "metrics": metrics,
        }
        (Path(out) / f"rank{info.rank}.json").write_text(json.dumps(record))
        barrier(info)  # as train() does: no process tears the group down while another still uses it
    finally:
        cleanup(info)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
