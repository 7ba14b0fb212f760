"""``train(cfg)``: what ``pipelines/train.py`` and ``medseg-diff train`` call.

1. join the process group (torchrun) and pick the device
2. read the manifest; take the fold's train/val cases
3. build the adapter (network, prior), the cached datasets (under DDP: each process's share) and the hooks
   (MLflow on rank 0)
4. run the trainer (resuming from ``output_dir/last.pt``)
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch

from medseg_diff.config import Config, check_environment
from medseg_diff.data.conventions import get_convention
from medseg_diff.data.dataset import case_record, make_dataset
from medseg_diff.data.manifest import Manifest, load_manifest
from medseg_diff.data.profile import native_spacing, training_record
from medseg_diff.data.transforms import eval_transforms, train_transforms
from medseg_diff.errors import ConfigError, DataError
from medseg_diff.kinds import build_kind
from medseg_diff.runtime import configure_logging, pin_reproducibility
from medseg_diff.training.distributed import DistInfo, barrier, cleanup, init_distributed, partition, shard
from medseg_diff.training.hooks import LogHook, MlflowHook
from medseg_diff.training.trainer import Trainer, TrainState

log = logging.getLogger(__name__)


def train(cfg: Config, resume: bool = True, check_data: bool = True, verify_checksums: bool = True) -> TrainState:
    """Train ``cfg.model.kind`` on ``cfg.data.manifest``; returns the final state (best metric, run id).

    ``check_data``: the pre-flight check of every training and validation case (``preflight_check``) before any
    work; a passed check is remembered per manifest and file state, so a rerun does not repeat it.
    ``verify_checksums``: the files' SHA-256 against the manifest (part of the check; also when the rest is
    skipped)."""
    check_environment(cfg)  # device present, output folder usable: before any work
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
        if check_data and dist_info.is_main:
            preflight_check(manifest, train_cases + val_cases, Path(cfg.experiment.output_dir), verify_checksums)
        elif verify_checksums and dist_info.is_main:
            from medseg_diff.data.check import ensure_checksums

            ensure_checksums(manifest, train_cases + val_cases)  # the run's manifest_hash must describe its bytes
        # the grid the network is trained at, and what it is trained on: both go into every checkpoint
        if cfg.data.spacing is None:
            native_spacing(manifest, train_cases + val_cases)  # one voxel size, or refused by name
        record = training_record(manifest, train_cases, val_cases, cfg.data.spacing)
        # 3. adapter, datasets, hooks
        adapter = build_kind(cfg)  # roi sizes against its stride: checked with the config (config.network_stride)
        t_train = train_transforms(conv, cfg.data.spacing, cfg.data.roi_size, cfg.data.samples_per_volume,
                                   cfg.data.pos_neg, augment=cfg.data.augment)
        train_ds, val_ds = rank_datasets(cfg, manifest, train_cases, val_cases, dist_info, t_train)
        hooks = []
        if dist_info.is_main:
            hooks = [MlflowHook(cfg, manifest)]
            if cfg.train.progress:
                hooks.append(LogHook())
        trainer = Trainer(cfg, adapter, train_ds, val_ds, device, dist_info, hooks, train_transform=t_train,
                          training_data=record)
        # 4. train
        state = trainer.fit(resume=resume)
        barrier(dist_info)  # every process done before any tears the group down (gloo aborts on an early teardown)
        return state
    finally:
        cleanup(dist_info)


def rank_datasets(cfg: Config, manifest: Manifest, train_cases: list, val_cases: list, dist_info: DistInfo,
                  train_transform) -> tuple:
    """The training and validation datasets of this process, cached as ``data.cache`` says: every case for one
    process; under DDP its ``partition`` of the training cases and its ``shard`` of the validation cases, so that
    each process caches only the cases it uses."""
    conv = get_convention(manifest.convention)
    train_records = partition([case_record(manifest, c) for c in train_cases], dist_info, cfg.experiment.seed)
    val_records = shard([case_record(manifest, c) for c in val_cases], dist_info)
    train_ds = make_dataset(train_records, train_transform, cfg.data.cache, cfg.data.cache_dir, progress=False)
    val_ds = make_dataset(val_records, eval_transforms(conv, cfg.data.spacing), cfg.data.cache, cfg.data.cache_dir,
                          progress=False) if val_records else []
    return train_ds, val_ds


def preflight_check(manifest: Manifest, cases: list, out_dir: Path, verify_checksums: bool = True) -> None:
    """nnU-Net-style dataset integrity check before training: every case's files readable, on one grid, finite,
    with integral labels of the convention, and their SHA-256 as in the manifest (``data.check``). Every bad case
    and file is logged with its problem, then a ``DataError`` ends the run (status 2 in the CLI).

    A passed check is remembered in ``out_dir/.data_check/KEY.ok``, KEY a hash of the manifest (files, checksums,
    split) and of each file's size and modification time, so an unchanged rerun skips it."""
    from medseg_diff.data.check import check_manifest

    subset = replace(manifest, cases=list(cases))
    key = hashlib.sha256(f"{subset.content_hash()}\tchecksums={verify_checksums}".encode())
    for case in subset.cases:
        for rel in sorted(case.sha256):
            try:
                st = subset.path_of(rel).stat()
                key.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            except OSError:
                key.update(f"{rel}\tmissing\n".encode())
    marker = out_dir / ".data_check" / f"{key.hexdigest()[:32]}.ok"
    if marker.exists():
        log.info("data check: passed before for this manifest and these files (%s)", marker)
        return
    log.info("data check: %d training/validation cases (skip with --skip-data-check)", len(subset.cases))
    problems = check_manifest(subset, continue_on_error=True, verify_checksums=verify_checksums)
    if problems:
        for problem in problems:
            log.error("  %s", problem)
        bad = sorted({p.case for p in problems})
        raise DataError(manifest.source, f"{len(problems)} problem(s) in {len(bad)} training/validation case(s) "
                                         f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; each listed above); "
                                         "fix them, or leave them out of the manifest")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{manifest.source}\n", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover - torchrun entry for tests: python -m medseg_diff.training.run CFG
    from medseg_diff.config import load_config

    configure_logging()
    state = train(load_config(sys.argv[1], sys.argv[2:]))
    logging.getLogger("medseg_diff.training.run").info("done epoch=%d best=%.4f", state.epoch, state.best_metric)
