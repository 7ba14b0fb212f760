"""``medseg-diff predict --shard I/N`` and under torchrun: N processes into one ``--out`` write every case exactly
once, into a folder that ``evaluate --predictions`` reads like a single process's; a process clears only the
staging of processes that are gone; bad shard values are refused by name."""

import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from factories import dead_pid, run_cli, tiny_config, write_case
from medseg_diff.data.manifest import build_manifest, write_manifest
from medseg_diff.ownership import _host_hash
from medseg_diff.predictions.layout import prediction_folders
from medseg_diff.stages.options import Sampling
from medseg_diff.stages.predict import predict_cases

CASES = ("S0", "S1", "S2", "S3", "S4")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny U-Net trained for one step on five 16³ cases, and their manifest."""
    from medseg_diff.training.run import train

    root = tmp_path_factory.mktemp("shards")
    for i, case in enumerate(CASES):
        write_case(root / "data", case, seed=20 + i)
    manifest = write_manifest(build_manifest(root / "data", folds=2, test_fraction=0.2, seed=0),
                              root / "data" / "manifest.json")
    train(tiny_config(manifest, root / "run", "unet", train={"epochs": 1, "steps_per_epoch": 1},
                      data={"max_val_cases": 0}))
    return root / "run" / "best.pt", manifest


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"MEDSEG_DIFF_THREADS": "1", "OMP_NUM_THREADS": "1"} | extra


def _predict_args(checkpoint: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--checkpoint", str(checkpoint), "--input", str(manifest), "--out", str(out), "--device",
            "cpu", *extra]


def test_two_shards_started_together_write_every_case_once(model, tmp_path, live_pid, capsys):
    checkpoint, manifest = model
    out = tmp_path / "out"
    out.mkdir()
    dead, host = dead_pid(), _host_hash()
    left = out / f".S1.partial-{dead}-{host}-0badcafe"  # a killed run's staging
    theirs = out / f".S2.partial-{live_pid}-{host}-0123abcd"  # a live run's staging
    aside = out / f".Z_earlier.old-{dead}-{host}-4567abcd"  # a killed run's case moved aside, not yet replaced
    for folder in (left, theirs, aside):
        folder.mkdir()
        (folder / "note.txt").write_text(folder.name)
    procs = [subprocess.Popen([sys.executable, "-m", "medseg_diff.cli", *_predict_args(checkpoint, manifest, out,
                                                                                       "--shard", f"{i}/2")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr
    written = [re.findall(r"^ok   (\S+) ", stderr, re.M) for _, stderr in results]
    assert sorted(written[0]) == ["S0", "S2", "S4"] and sorted(written[1]) == ["S1", "S3"]  # i-th of sorted ids % 2
    assert results[0][0].strip() == "shard 0/2: 3 case(s) written, 0 failed"
    assert results[1][0].strip() == "shard 1/2: 2 case(s) written, 0 failed"
    # the killed run's staging is gone, the live run's kept, the case moved aside put back; no lock or staging left
    assert not left.exists() and (theirs / "note.txt").read_text() == theirs.name
    assert (out / "Z_earlier" / "note.txt").read_text() == aside.name and not aside.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([*CASES, "Z_earlier", theirs.name])
    assert prediction_folders(out) == [out / case for case in CASES]
    # the same labels as one process predicting every case
    single = tmp_path / "single"
    predict_cases(checkpoint, manifest, single, Sampling(device="cpu"))
    for case in CASES:
        np.testing.assert_array_equal(np.asanyarray(nib.load(out / case / f"{case}_seg.nii.gz").dataobj),
                                      np.asanyarray(nib.load(single / case / f"{case}_seg.nii.gz").dataobj))
    rc, printed = run_cli(capsys, "evaluate", "--manifest", manifest, "--predictions", f"shards={out}", "--out",
                          tmp_path / "eval", "--subset", "all", "--no-tracking", "--export-cases", "0")
    assert rc == 0, printed
    rows = (tmp_path / "eval" / "per_case.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert sorted({row.split(",")[0] for row in rows}) == list(CASES)


def test_under_torchrun_each_rank_predicts_its_shard(model, tmp_path, capsys, monkeypatch):
    """RANK / WORLD_SIZE (no --shard) pick the shard; LOCAL_RANK the GPU of --device auto (the CPU here, without
    one); an empty shard (more ranks than cases) writes nothing and succeeds."""
    checkpoint, manifest = model
    out = tmp_path / "out"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc, printed = run_cli(capsys, *_predict_args(checkpoint, manifest, out))
    assert rc == 0 and "shard 1/3: 2 case(s) written, 0 failed" in printed
    assert sorted(p.name for p in out.iterdir()) == ["S1", "S4"]
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "7")
    rc, printed = run_cli(capsys, *_predict_args(checkpoint, manifest, tmp_path / "empty"))
    assert rc == 0 and "shard 6/7: 0 case(s) written, 0 failed" in printed and "has no case" in printed
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("shard, problem", [
    ("3/2", "shard 3 of 2 does not exist: shards are numbered from 0 to 1"),
    ("2/2", "shard 2 of 2 does not exist"),
    ("0/0", "the number of shards must be >= 1, got 0"),
    ("-1/2", "expected I/N in whole numbers"),
    ("1", "expected I/N in whole numbers"),
    ("a/b", "expected I/N in whole numbers"),
])
def test_a_shard_that_does_not_exist_is_refused(model, tmp_path, capsys, shard, problem):
    checkpoint, manifest = model
    rc, printed = run_cli(capsys, *_predict_args(checkpoint, manifest, tmp_path / "out", f"--shard={shard}"))
    assert rc == 2 and f"medseg-diff predict: error: --shard {shard}: {problem}" in printed
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("env, extra, problem", [
    ({"RANK": "0"}, [], "WORLD_SIZE is not set, though RANK is"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, [], "RANK=2, WORLD_SIZE=2: shard 2 of 2 does not exist"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, [], "WORLD_SIZE='two' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["--shard", "0/2"], "--shard 0/2 under torchrun (WORLD_SIZE=2)"),
])
def test_a_bad_torchrun_environment_is_refused(model, tmp_path, capsys, monkeypatch, env, extra, problem):
    checkpoint, manifest = model
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc, printed = run_cli(capsys, *_predict_args(checkpoint, manifest, tmp_path / "out", *extra))
    assert rc == 2 and problem in printed
    assert not (tmp_path / "out").exists()
