"""DDP data sharing: validation sharded over processes with a single process's numbers, the cache partitioned per
process, torch threads per process from ``OMP_NUM_THREADS`` (issue 20)."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from monai.data import DistributedSampler

from factories import tiny_config
from medseg_diff.data.manifest import load_manifest, write_manifest
from medseg_diff.runtime import default_threads, pin_reproducibility, thread_count
from medseg_diff.training.distributed import DistInfo, partition, shard, unshard

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture
def odd_split(phantoms, tmp_path) -> Path:
    """The six phantoms as two folds of three: fold 0 validates on 3 cases (odd, so two processes get 2 and 1) and
    trains on 3 (padded to 2 per process)."""
    manifest = load_manifest(phantoms)
    cases = [replace(c, subset="train", fold=i % 2) for i, c in enumerate(sorted(manifest.cases, key=lambda c: c.id))]
    return write_manifest(replace(manifest, cases=cases, folds=2), tmp_path / "odd.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(cfg, manifest_path: Path) -> tuple[dict, list[list[float]]]:
    """Validation metrics and per-case Dice of the same seeded model in this process (one thread, as each rank)."""
    from medseg_diff.kinds import build_kind
    from medseg_diff.training.run import rank_datasets
    from medseg_diff.training.trainer import Trainer

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.experiment.seed)
        adapter = build_kind(cfg)
        manifest = load_manifest(manifest_path)
        _, val_cases, _ = manifest.split(cfg.data.fold)
        _, val_ds = rank_datasets(cfg, manifest, [], val_cases, DistInfo(), None)
        trainer = Trainer(cfg, adapter, [None], val_ds, torch.device("cpu"))
        segmenter = adapter.segmenter(trainer.eval_net.eval(), validation=True, seed=cfg.experiment.seed)
        rows = [trainer._case_dice(segmenter, item) for item in val_ds]
        return trainer.validate(), rows
    finally:
        torch.set_num_threads(before)


def test_two_processes_validate_their_shards_cache_their_part_and_match_one_process(odd_split, tmp_path):
    # the untrained U-Net scores each case differently and by its weights (the untrained diffusion model
    # predicts p = 0.5 everywhere, which would not tell its weights apart)
    cfg = tiny_config(odd_split, tmp_path / "run", "unet")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "ranks"
    out.mkdir()
    # torchrun's own thread setting: OMP_NUM_THREADS=1 per process (this machine has more CPUs than that)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MEDSEG_DIFF_THREADS")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(WORKER), str(config), str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    manifest = load_manifest(odd_split)
    train_cases, val_cases, _ = manifest.split(0)
    train_ids, val_ids = [c.id for c in train_cases], [c.id for c in val_cases]
    assert len(train_ids) == 3 and len(val_ids) == 3
    # validation: MONAI's DistributedSampler(even_divisible=False) shares, each cached by its process only
    for r, rank in enumerate(ranks):
        picked = list(DistributedSampler(val_ids, num_replicas=2, rank=r, shuffle=False, even_divisible=False))
        assert rank["val_records"] == [val_ids[i] for i in picked] and rank["val_cached"] == len(picked)
        assert rank["val_cases"] == 3
    assert [len(rank["val_records"]) for rank in ranks] == [2, 1]
    # training: equal parts (3 cases padded to 2 + 2) that together hold every case, each cached by its process only
    for rank in ranks:
        assert len(rank["train_records"]) == 2 and rank["train_cached"] == 2
    assert set(ranks[0]["train_records"]) | set(ranks[1]["train_records"]) == set(train_ids)
    # threads: OMP_NUM_THREADS from torchrun, not every CPU
    assert [(rank["threads"], rank["torch_threads"]) for rank in ranks] == [(1, 1), (1, 1)]
    # the gathered metrics are a single process's, exactly, on every process
    single, rows = _single_process(cfg, odd_split)
    assert ranks[0]["metrics"] == single and ranks[1]["metrics"] == single
    assert len({tuple(row) for row in rows}) == 3, rows  # a case lost or counted twice would change the means


@pytest.mark.parametrize("n", range(8))
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_monai_distributed_sampler_shares_and_unshard_restores_the_order(n, world):
    items = [f"case{i}" for i in range(n)]
    shares = [shard(items, DistInfo(rank=r, world_size=world)) for r in range(world)]
    for r, share in enumerate(shares):
        picked = list(DistributedSampler(items, num_replicas=world, rank=r, shuffle=False, even_divisible=False)) \
            if n >= world else list(range(n))[r::world]
        assert share == [items[i] for i in picked]
    assert unshard(shares) == items


@pytest.mark.parametrize("n", range(1, 8))
@pytest.mark.parametrize("world", [2, 3])
def test_training_parts_are_equal_cover_every_case_and_do_not_depend_on_the_rank_asking(n, world):
    items = [f"case{i}" for i in range(n)]
    parts = [partition(items, DistInfo(rank=r, world_size=world), seed=7) for r in range(world)]
    assert len({len(p) for p in parts}) == 1 and set(sum(parts, [])) == set(items)
    assert len(parts[0]) == max(1, -(-n // world))
    assert parts == [partition(items, DistInfo(rank=r, world_size=world), seed=7) for r in range(world)]


def test_the_training_parts_follow_the_seed():
    items = [f"case{i}" for i in range(7)]
    first = partition(items, DistInfo(rank=0, world_size=2), seed=7)
    assert any(partition(items, DistInfo(rank=0, world_size=2), seed=s) != first for s in range(8, 12))


def test_one_process_keeps_every_case_in_order():
    items = [f"case{i}" for i in range(5)]
    assert partition(items, DistInfo(), seed=7) == items and shard(items, DistInfo()) == items


@pytest.mark.parametrize("env, expected", [
    ({}, "cpus"),
    ({"OMP_NUM_THREADS": "1"}, 1),
    ({"OMP_NUM_THREADS": "1,1"}, 1),  # OpenMP's nested form: its first level
    ({"OMP_NUM_THREADS": "1", "MEDSEG_DIFF_THREADS": "3"}, 3),
    ({"MEDSEG_DIFF_THREADS": "3"}, 3),
    ({"OMP_NUM_THREADS": "", "MEDSEG_DIFF_THREADS": "0"}, "cpus"),
    ({"OMP_NUM_THREADS": "many"}, "cpus"),
    ({"LOCAL_WORLD_SIZE": "64"}, 1),  # more processes than CPUs: one thread each
])
def test_thread_precedence_medseg_diff_threads_then_omp_num_threads_then_cpus(monkeypatch, env, expected):
    for name in ("OMP_NUM_THREADS", "MEDSEG_DIFF_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert default_threads() == cpus
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert thread_count() == (cpus if expected == "cpus" else expected)



def test_a_mistyped_medseg_diff_threads_is_refused_naming_it(monkeypatch):
    from medseg_diff.errors import ConfigError

    monkeypatch.setenv("MEDSEG_DIFF_THREADS", "two")
    with pytest.raises(ConfigError, match="MEDSEG_DIFF_THREADS.*'two'"):
        thread_count()

def test_pin_reproducibility_sets_torch_to_omp_num_threads(monkeypatch):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to tell OMP_NUM_THREADS=1 from every CPU")
    monkeypatch.delenv("MEDSEG_DIFF_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert pin_reproducibility(deterministic=False) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_each_rank_draws_its_own_noise_and_one_process_keeps_its_seeds():
    """Under DDP every rank reseeds from (seed, epoch, rank): two ranks must not draw the same diffusion noise and
    crops on their different cases; rank 0 (one process) keeps the seeds of before, so single-process runs are
    unchanged."""
    from types import SimpleNamespace

    from medseg_diff.training.trainer import Trainer

    def draws(rank: int, epoch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        fake = SimpleNamespace(cfg=SimpleNamespace(experiment=SimpleNamespace(seed=5)),
                               dist=DistInfo(rank=rank, world_size=2), train_transform=None,
                               loader_generator=torch.Generator(), noise_generator=torch.Generator())
        Trainer._seed_epoch(fake, epoch)
        return (torch.randn(8, generator=fake.noise_generator), torch.randn(8, generator=fake.loader_generator))

    noise0, order0 = draws(0)
    noise1, order1 = draws(1)
    assert not torch.equal(noise0, noise1) and not torch.equal(order0, order1)
    before = 5 * 1_000_003 + 3  # the single-process seed of epoch 3
    assert torch.equal(noise0, torch.randn(8, generator=torch.Generator().manual_seed(before + 1)))
    assert torch.equal(order0, torch.randn(8, generator=torch.Generator().manual_seed(before)))
