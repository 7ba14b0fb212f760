"""One trainer for every model kind (template method): the loop is here; the model-specific network, predictor and
prior come from a ``ModelKind`` (``kinds``), the loss from its ``Objective``, side effects (MLflow, logging) from
``TrainerHook``s.

Exact resume: every epoch starts by reseeding the data order, the MONAI random transforms, the
diffusion noise generator and torch's global RNG from (seed, epoch), and a checkpoint holds model,
optimiser, LR schedule, EMA, RNG states, epoch, step, best metric and the MLflow run id. So a run
killed at any point and resumed from its last checkpoint gives the same losses and weights as one
that never stopped.

Under DDP (``torchrun``) each process gets only its share of the data (``distributed.partition`` of the training
cases, ``distributed.shard`` of the validation cases): it samples its training part in an order reseeded per epoch,
validates its validation cases, and the per-case Dice of all processes are gathered in case order, so validation
takes 1/world_size of the time and gives a single process's numbers for the same weights. Process 0 writes the
checkpoints; its hooks log.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from monai.data import DataLoader
from monai.optimizers import WarmupCosineSchedule
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from medseg_diff.config import Config
from medseg_diff.data.conventions import REGIONS
from medseg_diff.data.dataset import CASE_ID
from medseg_diff.data.transforms import IMAGE, LABEL
from medseg_diff.checkpoint import FORMAT, load_checkpoint, rng_state, save_checkpoint, set_rng_state, upgrade_config
from medseg_diff.errors import TrainingError
from medseg_diff.evaluation.metrics import dice
from medseg_diff.kinds.base import ModelKind, Objective
from medseg_diff.inference.sliding_window import infer_volume
from medseg_diff.runtime import compile_deterministically, show_progress
from medseg_diff.training.distributed import DistInfo, barrier, gather, mean_across, unshard

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"


class TrainerHook(Protocol):
    def on_start(self, trainer: "Trainer") -> None: ...

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict[str, float]) -> None: ...

    def on_end(self, trainer: "Trainer", status: str) -> None: ...


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def ema_multi_avg_fn(decay: float) -> Callable:
    """EMA with warm-up for ``AveragedModel(multi_avg_fn=...)``: the decay ramps as min(decay, (1+n)/(10+n)).

    Called once per update with all parameters, so the step count is read once (one host sync on CUDA,
    not one per parameter) and the update is a single fused ``_foreach_lerp_``.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


def _differences(saved: dict, current: dict, prefix: str) -> list[str]:
    """``key: saved -> current`` for every leaf that differs between two nested config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key}: {a} -> {b}")
    return out


def _list(values) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


class Trainer:
    """``train_data`` / ``val_data``: this process's share under DDP (``distributed.partition`` /
    ``distributed.shard``; every case for one process)."""

    def __init__(self, cfg: Config, adapter: ModelKind, train_data, val_data, device: torch.device,
                 dist_info: DistInfo = DistInfo(), hooks: list[TrainerHook] | None = None,
                 train_transform=None, objective: Objective | None = None, training_data: dict | None = None):
        self.cfg, self.adapter, self.device, self.dist = cfg, adapter, device, dist_info
        self.training_data = training_data  # data.profile.training_record: stored in every checkpoint
        self.objective = objective or adapter.objective()
        self.hooks = hooks or []
        self.train_data, self.val_data, self.train_transform = train_data, val_data, train_transform
        self.val_cases = sum(gather(len(val_data), dist_info))  # of all processes: a share may be empty
        self.out_dir = Path(cfg.experiment.output_dir)
        self.state = TrainState()
        self.net = adapter.net.to(device)
        self.module = self._wrap(self.objective.train_module().to(device))
        if cfg.train.compile:  # shares its parameters with self.net; checkpoints keep the plain state_dict
            self.module = compile_deterministically(self.module)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.loader_generator = torch.Generator()
        self.loader = self._loader()
        self.steps_per_epoch = cfg.train.steps_per_epoch or len(self.loader)
        total = self.steps_per_epoch * cfg.train.epochs
        warmup = cfg.train.warmup_epochs * self.steps_per_epoch  # the first step already gets lr / warmup
        self.lr_schedule = WarmupCosineSchedule(self.optimizer, warmup_steps=warmup, t_total=total,
                                                warmup_multiplier=1.0 / warmup if warmup > 0 else 0.0)
        use_ema = adapter.uses_ema and cfg.train.ema_decay > 0
        self.ema = (AveragedModel(self.net, multi_avg_fn=ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
                    if use_ema else None)
        self.noise_generator = torch.Generator(device=device)
        self.amp = cfg.train.amp and device.type == "cuda"

    # --- set-up ------------------------------------------------------------------------------------

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def _loader(self) -> DataLoader:
        """Shuffles this process's training cases (all of them for one process, its fixed part under DDP)."""
        return DataLoader(self.train_data, batch_size=self.cfg.data.batch_size, shuffle=True,
                          num_workers=self.cfg.data.num_workers, generator=self.loader_generator,
                          drop_last=False, pin_memory=self.device.type == "cuda")

    @property
    def eval_net(self) -> nn.Module:
        """The weights used for validation and saved for inference: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.net

    # --- the loop ----------------------------------------------------------------------------------

    def fit(self, resume: bool = True) -> TrainState:
        """Train to ``train.epochs``, resuming from ``output_dir/last.pt`` when it exists and ``resume``."""
        if self.dist.is_main and self.out_dir.is_dir():  # a checkpoint being written when a run was killed
            for leftover in self.out_dir.glob(".*.pt.tmp"):
                leftover.unlink(missing_ok=True)
        if resume and (self.out_dir / LAST).exists():
            self.load(self.out_dir / LAST)
        status = "FAILED"
        try:
            for hook in self.hooks:  # inside: a hook that fails to start still gets on_end (the run is closed)
                hook.on_start(self)
            for epoch in range(self.state.epoch, self.cfg.train.epochs):
                metrics = self._train_epoch(epoch)
                if self._should_validate(epoch):
                    metrics.update(self.validate())
                self._end_epoch(epoch, metrics)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            for hook in self.hooks:
                hook.on_end(self, status)
        return self.state

    def _should_validate(self, epoch: int) -> bool:
        every = self.cfg.train.val_every
        return self.val_cases > 0 and ((epoch + 1) % every == 0 or epoch + 1 == self.cfg.train.epochs)

    def _seed_epoch(self, epoch: int) -> None:
        """1. reseed everything random from (seed, epoch, rank): resuming at an epoch boundary is exact. Under DDP
        each rank gets its own stream (its crops, augmentation and diffusion noise differ from the other ranks');
        one process is rank 0, whose seeds are those of before."""
        seed = self.cfg.experiment.seed * 1_000_003 + epoch + self.dist.rank * 7_919_000_011
        self.loader_generator.manual_seed(seed)
        self.noise_generator.manual_seed(seed + 1)
        torch.manual_seed(seed + 2)
        np.random.seed(seed % 2**32)
        if self.train_transform is not None:
            self.train_transform.set_random_state(seed=seed % 2**32)

    def _batches(self) -> Iterator[dict]:
        """``steps_per_epoch`` batches, cycling over the loader when it is shorter."""
        n = 0
        while True:
            for batch in self.loader:
                yield batch
                n += 1
                if n >= self.steps_per_epoch:
                    return

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self._seed_epoch(epoch)
        self.module.train()
        sums: dict[str, float] = {}
        bar = tqdm(self._batches(), total=self.steps_per_epoch, desc=f"{self.adapter.kind} epoch {epoch + 1}",
                   disable=not (show_progress(self.cfg.train.progress) and self.dist.is_main), leave=False)
        start = time.perf_counter()
        for i, batch in enumerate(bar):
            parts = self._train_step(batch, epoch, i)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
        metrics = {f"train_{k}": mean_across(v / self.steps_per_epoch, self.dist, self.device) for k, v in sums.items()}
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["epoch_seconds"] = time.perf_counter() - start
        return metrics

    def _train_step(self, batch: dict, epoch: int, index: int) -> dict[str, float]:
        image = batch[IMAGE].to(self.device, non_blocking=True)
        regions = batch[LABEL].to(self.device, non_blocking=True)

        def where() -> str:  # the batch, named in the error of a non-finite loss
            cases = sorted(set(batch.get(CASE_ID, []))) if isinstance(batch.get(CASE_ID), (list, tuple)) else []
            named = f" on a batch of case(s) {', '.join(cases)}" if cases else ""
            return f" at epoch {epoch + 1}, step {index + 1}{named}; check those cases (medseg-diff check MANIFEST)"

        return self.train_step(image, regions, where)

    def train_step(self, image: torch.Tensor, regions: torch.Tensor,
                   where: Callable[[], str] | None = None) -> dict[str, float]:
        """One optimisation step on a batch already on ``self.device`` (image ``[B, 4, ...]``, regions
        ``[B, 3, ...]``): forward + loss (bf16 autocast on CUDA), the non-finite check, backward, gradient clipping,
        AdamW, the LR schedule and the EMA. Returns the loss parts. The training loop runs it for every batch
        (``where()`` then names the batch in the error of a non-finite loss); the benchmarks time it."""
        # 2. forward + loss (bf16 autocast on CUDA)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            out = self.objective.loss(self.module, image, regions, self.noise_generator)
        loss_value = mean_across(float(out.total.detach()), self.dist, self.device)
        if not math.isfinite(loss_value):
            last = self.out_dir / LAST
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TrainingError(
                f"non-finite loss ({loss_value}){where() if where is not None else ''}; training stopped, {kept}")
        # 3. backward, clip, step, schedule, EMA
        self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        self.state.step += 1
        return out.parts

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Cheap whole-volume validation: Dice per region on the transformed grid, the mean over every validation
        case. Under DDP every process must call it: each scores its own cases, then the per-case Dice of all
        processes are gathered (``distributed.unshard``: case order, so the means are a single process's)."""
        net = self.eval_net.eval()
        segmenter = self.adapter.segmenter(net, validation=True, seed=self.cfg.experiment.seed)
        rows = unshard(gather([self._case_dice(segmenter, item) for item in self.val_data], self.dist))
        out = {f"val_dice_{name}": float(np.mean([row[r] for row in rows])) for r, name in enumerate(REGIONS)}
        out["val_dice_mean"] = float(np.mean([out[f"val_dice_{r}"] for r in REGIONS]))
        return out

    def _case_dice(self, segmenter, item: dict) -> list[float]:
        """One validation case's Dice per region (``REGIONS`` order); depends on nothing but the case and the
        weights (the prior generator is reseeded per case, the sampler per call)."""
        image = torch.as_tensor(item[IMAGE]).unsqueeze(0).to(self.device)
        # prior_source=external: validate with the simulated outline; optional: without; None otherwise
        regions = torch.as_tensor(item[LABEL]).unsqueeze(0).to(self.device)
        prior_generator = torch.Generator(device=self.device).manual_seed(self.cfg.experiment.seed)
        prior = self.adapter.training_prior(regions, prior_generator, validation=True)
        roi = self.cfg.infer.roi_size or self.cfg.data.roi_size
        pred = infer_volume(segmenter, image, roi, overlap=self.cfg.infer.overlap, prior=prior,
                            sw_batch_size=self.cfg.infer.sw_batch_size, mode=self.cfg.infer.mode,
                            amp=self.cfg.train.amp)
        # as predict does: no tumour where every (preprocessed) modality is background
        head = (torch.as_tensor(item[IMAGE]) != 0).any(dim=0).numpy()
        mask = (pred.probs > self.cfg.infer.threshold).cpu().numpy() & head
        gt = np.asarray(item[LABEL]) > 0.5
        return [float(dice(mask[r], gt[r])) for r in range(len(REGIONS))]

    def _end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """4. bookkeeping, best/last checkpoints (rank 0), hooks."""
        self.state.epoch = epoch + 1
        self.state.history.append({"epoch": epoch + 1, **metrics})
        if self.dist.is_main:
            if "val_dice_mean" in metrics and metrics["val_dice_mean"] > self.state.best_metric:
                self.state.best_metric, self.state.best_epoch = metrics["val_dice_mean"], epoch + 1
                save_checkpoint(self.checkpoint(), self.out_dir / BEST)
            save_checkpoint(self.checkpoint(), self.out_dir / LAST)
            if not self.val_cases:  # no validation set: the last epoch is the best we know
                save_checkpoint(self.checkpoint(), self.out_dir / BEST)
        barrier(self.dist)
        for hook in self.hooks:
            hook.on_epoch_end(self, epoch + 1, metrics)

    # --- checkpoints -------------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        s = self.state
        return {
            "format": FORMAT,
            "model_kind": self.adapter.kind,
            "network": self.adapter.spec,
            "config": self.cfg.to_dict(),
            "model": self.net.state_dict(),
            "inference_model": self.eval_net.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "epoch": s.epoch, "step": s.step, "best_metric": s.best_metric, "best_epoch": s.best_epoch,
            "run_id": s.run_id, "history": s.history,
            "rng": rng_state(),
            "training_data": self.training_data,
            "spacing_mm": (self.training_data or {}).get("spacing_mm") or _list(self.cfg.data.spacing),
        }

    def load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt.get("inference_only"):
            raise TrainingError(f"{path}: an inference checkpoint (the MLflow model's weights only: no optimizer or "
                                "run state) cannot be resumed from; resume from the run's last.pt, or --no-resume")
        kind = self.adapter.kind
        if ckpt.get("model_kind") != kind:
            raise TrainingError(f"{path}: checkpoint is of a '{ckpt.get('model_kind')}' model, not '{kind}'")
        section = self.adapter.info.section  # the network's own settings: model.SECTION
        saved = upgrade_config(ckpt.get("config", {}), ckpt.get("format", 1)).get("model", {}).get(section, {})
        differ = _differences(saved, self.cfg.to_dict()["model"][section], f"model.{section}")
        if differ:
            raise TrainingError(
                f"{path}: cannot resume: the checkpoint's network differs from this config ({'; '.join(differ[:4])}). "
                f"Use another experiment.output_dir, or --no-resume to start over")
        self.net.load_state_dict(ckpt["model"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_schedule.load_state_dict(ckpt["lr_schedule"])
        self.state = TrainState(epoch=ckpt["epoch"], step=ckpt["step"], best_metric=ckpt["best_metric"],
                                best_epoch=ckpt["best_epoch"], run_id=ckpt.get("run_id"),
                                history=list(ckpt.get("history", [])))
        set_rng_state(ckpt["rng"])
