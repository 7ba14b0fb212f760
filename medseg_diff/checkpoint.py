"""Checkpoints: written atomically (temp file + rename), loaded with ``torch.load(weights_only=True)``.

Shared by training (which writes them) and inference (which reads them); neither imports the other for it.
Everything in a checkpoint is a tensor or a plain Python value, so the safe unpickler can read it:
RNG states of Python, NumPy and torch are converted to tensors/lists.

Keys: ``format``, ``model_kind``, ``network`` (``{"name", "kwargs"}``: the network is ``Net(**kwargs)``, built by
``kinds.build_network``), ``config`` (the whole run config: data, inference and sampler settings),
``inference_model`` (weights used for prediction: the EMA when there is one), and for resuming ``model``, ``ema``,
``optimizer``, ``lr_schedule``, ``rng``, ``epoch``, ``step``, ``best_metric``, ``best_epoch``, ``run_id``, ``history``;
``spacing_mm`` (the grid, in mm, the network was trained at: every input is resampled to it) and ``training_data``
(the data set, synthetic or not, case count, voxel size, manifest hash).

An *inference checkpoint* (``inference_checkpoint``: what the MLflow model carries) keeps only ``INFERENCE_KEYS``,
the weights prediction uses and what rebuilds the network and describes it, and says so with ``inference_only``: a
fraction of the size, the same predictions, and nothing to resume a training from.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg_diff.errors import DataError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a crash leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:  # full disk, kill: the previous checkpoint stays, no temporary is left
        tmp.unlink(missing_ok=True)
        raise
    return path


#: Version of the checkpoint layout. 2: the compact diffusion model (``model.denoiser.patch_size``); the
#: configs inside format-1 checkpoints describe the full-resolution model and lack the compact keys.
#: 3: the network's own constructor arguments (``network``) next to its weights.
#: 4: the voxel size the network was trained at (``spacing_mm``) and what it was trained on (``training_data``,
#: ``data.profile.training_record``); older checkpoints get them from their training manifest when it is readable.
FORMAT = 4


def upgrade_config(raw: dict[str, Any], fmt: int) -> dict[str, Any]:
    """The config dict of a format-``fmt`` checkpoint in today's keys: a format-1 (full-resolution) diffusion
    model gets ``patch_size: 1`` and ``encoder_factor: 1``, which rebuild exactly the network it was."""
    if fmt >= 2 or "model" not in raw or "denoiser" not in raw["model"]:
        return raw
    denoiser = {"patch_size": 1, "encoder_factor": 1, **raw["model"]["denoiser"]}
    return {**raw, "model": {**raw["model"], "denoiser": denoiser}}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with the safe (weights-only) unpickler."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        # torch's own text suggests weights_only=False, which could run code from an untrusted file: not repeated
        raise DataError(path, f"not a medseg-diff checkpoint, or a damaged one ({type(err).__name__} while reading "
                              "it with the safe, weights-only loader)") from None


#: What ``inference.loading.load_model`` and the provenance of a prediction read of a checkpoint: the network spec,
#: the run config (preprocessing, sliding window, sampler), the inference weights (EMA when there is one), the voxel
#: size and data it was trained at, and where it comes from (run, epoch, its validation score).
INFERENCE_KEYS = ("format", "model_kind", "network", "config", "inference_model", "spacing_mm", "training_data",
                  "run_id", "epoch", "best_metric", "best_epoch")


def inference_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Write to ``target`` the inference part of the checkpoint ``source`` (``INFERENCE_KEYS``, marked
    ``inference_only``): no optimizer, LR schedule, RNG states, history, nor the raw and EMA copies of the weights
    beside ``inference_model``. ``load_model`` reads it as it reads ``source``, with the same predictions. A
    ``DataError`` when ``source`` holds no config and inference weights."""
    ckpt = load_checkpoint(source)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "inference_model" not in ckpt:
        raise DataError(source, "not a medseg-diff checkpoint (no config / weights inside)")
    slim = {k: ckpt[k] for k in INFERENCE_KEYS if k in ckpt}  # the weights as they are (their _metadata kept)
    return save_checkpoint({**slim, "inference_only": True}, target)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states in a weights-only-safe form."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_spacing(path: str | Path, spacing: list[float]) -> Path:
    """Record in an older checkpoint (format < 4, trained with ``data.spacing`` null) the voxel size, in mm, its
    training data had: inference then resamples every input to it. Written atomically; nothing else changes."""
    if len(spacing) != 3 or not all(float(v) > 0 for v in spacing):
        raise DataError(path, f"a voxel size is 3 positive numbers in mm, got {spacing}")
    ckpt = load_checkpoint(path)
    return save_checkpoint({**ckpt, "spacing_mm": [float(v) for v in spacing]}, path)


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m medseg_diff.checkpoint",
                                description="record the training voxel size in a checkpoint older than format 4")
    p.add_argument("--set-spacing", nargs=4, metavar=("CHECKPOINT", "X", "Y", "Z"), required=True)
    args = p.parse_args(argv)
    path, *values = args.set_spacing
    try:
        spacing = [float(v) for v in values]
        print(f"{set_spacing(path, spacing)}: spacing_mm = {spacing}")
    except ValueError:
        print(f"error: X Y Z must be numbers, got {values}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
