"""benchmarks/bench_cost.py: its measurements on toys with exact values, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

@pytest.fixture(scope="module")
def bench():
    from benchmarks import bench_cost

    return bench_cost


def test_linear_saved_bytes_exclude_the_weight(bench):
    """``x @ W.T`` saves x (for dW: 4·10 fp32 = 160 bytes) and W (for dx: a parameter, excluded)."""
    torch.manual_seed(0)
    lin = nn.Linear(10, 10, bias=False)
    x = torch.randn(4, 10, requires_grad=True)
    flops, saved = bench.forward_backward_cost(lambda: lin(x).sum(), lin)
    assert saved == 4 * 10 * 4
    assert flops == 3 * (2 * 4 * 10 * 10)  # forward + grad wrt the weight + grad wrt the input
    assert x.grad is not None and lin.weight.grad is not None


def test_linear_flops_without_input_grad(bench):
    lin = nn.Linear(10, 10, bias=False)
    x = torch.randn(4, 10)  # no input gradient: backward is the weight gradient only
    flops, saved = bench.forward_backward_cost(lambda: lin(x).sum(), lin)
    assert flops == 2 * (2 * 4 * 10 * 10)
    assert saved == 4 * 10 * 4


def test_saved_bytes_count_a_shared_storage_once(bench):
    lin = nn.Linear(8, 8, bias=False)
    x = torch.randn(2, 8, requires_grad=True)
    with bench.SavedTensorBytes(lin) as saved:
        (lin(x) * x).sum()  # x is saved by the linear and by the product: one storage
    assert len(saved.storages) == 2  # x and the linear's output (saved by the product)
    assert saved.nbytes == 2 * (2 * 8 * 4)


@pytest.mark.parametrize(("shape", "roi", "overlap", "expected"), [
    ((240, 240, 155), (128,) * 3, 0.5, 3 * 3 * 2),
    ((240, 240, 155), (128,) * 3, 0.25, 3 * 3 * 2),  # stride 96: still 3 along 240
    ((72, 85, 74), (64,) * 3, 0.5, 2 * 2 * 2),
    ((30, 64, 10), (64,) * 3, 0.5, 1),
])
def test_windows_as_monai_places_them(bench, shape, roi, overlap, expected):
    assert bench.windows(shape, roi, overlap) == expected


def test_tiny_end_to_end_run(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the test process's thread count
    bench.main(["--set", "data.roi_size=[32,32,32]", "--set", "model.denoiser.channels=[8,16,32]",
                "--set", "model.unet.channels=[8,16,32,64,128]", "--steps", "2", "--ensemble", "2",
                "--repeats", "1", "--spacing", "5", "--skip-real", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "cost.json").read_text(encoding="utf-8"))
    assert (tmp_path / "cost.md").read_text(encoding="utf-8").startswith("# Diffusion vs U-Net cost")
    models, ratios = result["models"], result["ratios"]
    for kind in ("diffusion", "unet"):
        m = models[kind]
        assert 32 % m["stride"] == 0
        assert m["parameters"] > 0
        assert m["train"]["flops"] > 0 and m["train"]["saved_bytes"] > 0 and m["train"]["seconds"] > 0
        assert m["volume"]["flops"] > 0 and m["volume"]["windows"] >= 1 and m["volume"]["seconds"] > 0
    assert models["diffusion"]["volume"]["windows"] == models["unet"]["volume"]["windows"]
    assert models["diffusion"]["volume"]["shape"] == models["unet"]["volume"]["shape"]
    for key in ("train.flops", "train.saved_bytes", "train.seconds", "volume.flops", "volume.windows",
                "volume.seconds", "parameters"):
        section, _, name = key.rpartition(".")
        d, u = (models[k][section][name] if section else models[k][name] for k in ("diffusion", "unet"))
        assert ratios[key] == pytest.approx(d / u)
    assert ratios["volume.windows"] == 1.0
    assert result["real"] is None
    assert result["meta"]["steps"] == 2 and result["meta"]["ensemble"] == 2
