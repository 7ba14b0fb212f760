"""Trainer: exact resume, non-finite loss, checkpoints, DDP with gloo."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from factories import tiny_config
from medseg_diff.checkpoint import load_checkpoint
from medseg_diff.training.run import train
from medseg_diff.errors import TrainingError


def _write_yaml(cfg, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.mark.parametrize("kind", ["diffusion", "unet"])
def test_killed_run_resumes_exactly(phantoms, tmp_path, kind):
    """SIGKILL a training process once its first checkpoint exists; resuming gives the same losses and
    weights as a run that was never interrupted."""
    whole = train(tiny_config(phantoms, tmp_path / "whole", kind, train={"epochs": 3}))
    cfg = tiny_config(phantoms, tmp_path / "killed", kind, train={"epochs": 3})
    proc = subprocess.Popen([sys.executable, "-m", "medseg_diff.training.run",
                             str(_write_yaml(cfg, tmp_path / "cfg.yaml"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"]
    resumed = train(cfg)
    assert killed_at >= 1 and resumed.epoch == 3 and len(resumed.history) == 3
    for a, b in zip(whole.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6, abs=1e-7), (a, b)
    w1 = load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    w2 = load_checkpoint(tmp_path / "killed" / "last.pt")["model"]
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_contents_load_weights_only(phantoms, tmp_path):
    train(tiny_config(phantoms, tmp_path / "r", "diffusion", train={"epochs": 1}))
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(tmp_path / "r" / name, weights_only=True)
        assert {"model", "inference_model", "ema", "optimizer", "lr_schedule", "rng", "epoch", "config"} <= set(ckpt)
        assert ckpt["epoch"] == 1 and ckpt["model_kind"] == "diffusion"
    assert not list((tmp_path / "r").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_non_finite_loss_stops_and_keeps_last_checkpoint(phantoms, tmp_path):
    out = tmp_path / "nan"
    train(tiny_config(phantoms, out, "unet", train={"epochs": 1}))
    before = (out / "last.pt").read_bytes()
    # a finite weight (config refuses inf) that overflows float32: the weighted loss is inf
    cfg = tiny_config(phantoms, out, "unet", train={"epochs": 2}, loss={"bce": 1e308})
    with pytest.raises(TrainingError, match=r"non-finite loss .* epoch 2, step 1 on a batch of case\(s\) "
                                             r"BraTS2021_Synth_\d+.*last good checkpoint is .*last\.pt"):
        train(cfg)
    assert (out / "last.pt").read_bytes() == before


@pytest.fixture
def nan_phantoms(phantoms, tmp_path):
    """A copy of the phantoms whose first training case has NaN voxels in its T2 (manifest rebuilt, so the
    checksums match: only the values are bad)."""
    import shutil

    import nibabel as nib
    import numpy as np

    from medseg_diff.data.manifest import build_manifest, load_manifest, write_manifest

    root = tmp_path / "data"
    shutil.copytree(phantoms.parent, root)
    case = next(c for c in load_manifest(phantoms).cases if c.subset == "train")
    t2 = root / case.images["t2"]
    img = nib.load(str(t2))
    data = np.asarray(img.dataobj, dtype=np.float32)
    x, y, z = (s // 2 for s in data.shape)
    data[x - 2:x + 2, y - 2:y + 2, z - 2:z + 2] = np.nan  # inside the head, so preprocessing keeps it
    nib.save(nib.Nifti1Image(data, img.affine), str(t2))  # float32 (the phantom's header stores integers)
    manifest = write_manifest(build_manifest(root, name="tiny-phantoms", folds=2, test_fraction=0.34, seed=0),
                              root / "manifest.json")
    return manifest, case.id, t2


def test_the_pre_flight_check_names_the_bad_case_and_file_before_any_work(nan_phantoms, tmp_path, caplog):
    from medseg_diff.errors import DataError

    manifest, case, t2 = nan_phantoms
    out = tmp_path / "run"
    with pytest.raises(DataError, match=rf"1 problem\(s\) in 1 training/validation case\(s\) \({case}"):
        train(tiny_config(manifest, out, "unet", train={"epochs": 1}))
    assert any(case in r.getMessage() and str(t2) in r.getMessage() and "NaN" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not (out / "last.pt").exists() and not (out / ".data_check").exists()


def test_a_passed_check_is_remembered_and_a_changed_file_is_checked_again(phantoms, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="medseg_diff")
    out = tmp_path / "run"
    train(tiny_config(phantoms, out, "unet", train={"epochs": 1}))
    assert len(list((out / ".data_check").glob("*.ok"))) == 1
    caplog.clear()
    train(tiny_config(phantoms, out, "unet", train={"epochs": 2}))  # resumes; the check is not repeated
    assert any("passed before" in r.getMessage() for r in caplog.records)


def test_with_the_check_skipped_a_nan_case_stops_training_naming_the_batch_cases(nan_phantoms, tmp_path):
    manifest, case, _ = nan_phantoms
    cfg = tiny_config(manifest, tmp_path / "run", "unet", train={"epochs": 3}, data={"max_val_cases": 0})
    with pytest.raises(TrainingError, match=r"non-finite loss .* on a batch of case\(s\) .*BraTS2021_Synth_"):
        train(cfg, check_data=False)


def test_a_checkpoint_temporary_left_by_a_killed_run_is_removed(phantoms, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".last.pt.tmp").write_bytes(b"half a checkpoint")
    (out / "notes.txt").write_text("kept")
    train(tiny_config(phantoms, out, "unet", train={"epochs": 1, "steps_per_epoch": 1}))
    assert sorted(p.name for p in out.iterdir() if p.name != ".data_check") == ["best.pt", "last.pt", "notes.txt"]


def test_roi_not_multiple_of_stride_is_rejected_before_work(phantoms, tmp_path):
    from medseg_diff.errors import ConfigError

    with pytest.raises(ConfigError, match="data.roi_size.*multiple of the network stride"):
        train(tiny_config(phantoms, tmp_path / "x", "diffusion", data={"roi_size": [14, 16, 16]}))
    assert not (tmp_path / "x" / "last.pt").exists()


def test_ddp_two_cpu_processes_gloo(phantoms, tmp_path):
    """torchrun with 2 processes (gloo): one process writes checkpoints, both train, and both validate their
    share of the validation cases (sharded: gathered into the epoch's metrics, which rank 0 records)."""
    cfg = tiny_config(phantoms, tmp_path / "ddp", "unet", train={"epochs": 1})
    path = _write_yaml(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "medseg_diff.training.run", str(path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done epoch=1") == 2  # both ranks finished (logged on stderr)
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])
    assert 0.0 <= ckpt["history"][0]["val_dice_mean"] <= 1.0 and ckpt["best_epoch"] == 1


def test_train_compile_wraps_the_training_module_and_keeps_plain_checkpoints(tmp_path):
    """``train.compile: true`` hands the trainer a torch.compile-d module (compiled lazily, on its first call, so
    nothing is compiled here) that shares its parameters with the network the checkpoints are written from."""
    from medseg_diff.kinds import build_kind as build_adapter
    from medseg_diff.training.trainer import Trainer

    cfg = tiny_config(tmp_path / "m.json", tmp_path / "out", "diffusion", train={"compile": True})
    trainer = Trainer(cfg, build_adapter(cfg), train_data=[{}], val_data=[], device=torch.device("cpu"))
    assert isinstance(trainer.module, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.module._orig_mod.net is trainer.net
    assert not any(k.startswith("_orig_mod") for k in trainer.checkpoint()["model"])
