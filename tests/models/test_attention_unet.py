"""MONAI's Attention U-Net as a model kind (``model.kind=attention_unet``): config, network, gate map, training,
checkpoint reload, prediction with the gate map stitched like our attention maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factories import tiny_config
from medseg_diff.config import config_from_dict
from medseg_diff.errors import ConfigError
from medseg_diff.kinds import build_kind as build_adapter, kind_class
from medseg_diff.kinds.segmenters import ATTENTION_PREFIX, AttentionGateSegmenter
from medseg_diff.models import AttentionUNet, build_attention_unet

TINY = {"channels": [8, 16, 32], "strides": [2, 2]}  # stride 4
SECTIONS = dict(data={"roi_size": [32, 32, 32], "max_val_cases": 1},
                model={"attention_unet": TINY}, train={"epochs": 1, "steps_per_epoch": 1},
                infer={"roi_size": [32, 32, 32], "sw_batch_size": 2})


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    """One epoch of one step of a tiny Attention U-Net on the phantoms; returns (config, run folder)."""
    from medseg_diff.training.run import train

    out = tmp_path_factory.mktemp("attention_unet") / "run"
    cfg = tiny_config(phantoms, out, "attention_unet", **SECTIONS)
    state = train(cfg)
    assert state.epoch == 1 and np.isfinite(state.history[0]["train_loss"])
    return cfg, out


# --- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("section, key, message", [
    ({"channels": [8]}, "model.attention_unet.channels", "needs at least 2 levels"),
    ({"channels": [8, 0, 32]}, "model.attention_unet.channels[1]", "must be > 0, got 0"),
    ({"strides": [2]}, "model.attention_unet.strides", "needs one stride fewer"),
    ({"strides": [2, 0]}, "model.attention_unet.strides[1]", "must be > 0, got 0"),
    ({"dropout": 1.0}, "model.attention_unet.dropout", "must be in \\[0, 1\\), got 1.0"),
    ({"num_res_units": 1}, "model.attention_unet.num_res_units", "unknown key"),
])
def test_config_section_is_validated(section, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict({"model": {"kind": "attention_unet", "attention_unet": {**TINY, **section}},
                          "data": {"roi_size": [32, 32, 32]}})
    assert err.value.key == key


def test_roi_must_be_a_multiple_of_its_stride():
    with pytest.raises(ConfigError, match=r"multiple of the network stride 4 \(the product of "
                                          r"model.attention_unet.strides \[2, 2\]\)") as err:
        config_from_dict({"model": {"kind": "attention_unet", "attention_unet": TINY},
                          "data": {"roi_size": [32, 32, 30]}})
    assert err.value.key == "data.roi_size"
    # the other kinds' sections do not constrain it
    cfg = config_from_dict({"model": {"kind": "attention_unet", "attention_unet": TINY,
                                      "unet": {"strides": [4, 4, 4, 4]}}, "data": {"roi_size": [36, 36, 36]}})
    assert cfg.model.attention_unet.channels == (8, 16, 32)


def test_own_params_log_only_its_own_model_section():
    from medseg_diff.training.hooks import own_params

    params = own_params(config_from_dict({"model": {"kind": "attention_unet"}, "data": {"roi_size": [32, 32, 32]}}))
    assert "model.attention_unet.channels" in params and "model.kind" in params
    assert not any(k.startswith(("model.unet.", "model.denoiser.", "diffusion.")) for k in params)
    unet = own_params(config_from_dict({"model": {"kind": "unet"}}))
    assert not any(k.startswith("model.attention_unet.") for k in unet)


# --- network and gate map ---------------------------------------------------------------------------


def test_network_shapes_stride_and_gates():
    net = build_attention_unet(channels=TINY["channels"], strides=TINY["strides"]).eval()
    assert isinstance(net, AttentionUNet) and net.stride == 4 and len(net.gate_modules()) == 2
    assert net(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    with pytest.raises(ValueError, match="one entry fewer"):
        build_attention_unet(channels=[8, 16, 32], strides=[2])


def test_segmenter_gives_a_gate_map_of_mean_one_per_window_and_removes_its_hooks():
    torch.manual_seed(0)
    net = build_attention_unet(channels=TINY["channels"], strides=TINY["strides"]).eval()
    maps = AttentionGateSegmenter(net)(torch.randn(2, 4, 32, 32, 32))
    gate = maps[ATTENTION_PREFIX + "gate"]
    assert gate.shape == (2, 1, 32, 32, 32) and maps["probs"].shape == (2, 3, 32, 32, 32)
    assert torch.isfinite(gate).all() and (gate >= 0).all()
    torch.testing.assert_close(gate.mean(dim=(1, 2, 3, 4)), torch.ones(2))
    assert all(not m._forward_hooks for m in net.gate_modules())
    assert set(AttentionGateSegmenter(net, attention=False)(torch.randn(1, 4, 32, 32, 32))) == {"probs", "entropy"}


def test_adapter_is_registered_and_builds_from_its_spec():
    cfg = config_from_dict({"model": {"kind": "attention_unet", "attention_unet": TINY},
                            "data": {"roi_size": [32, 32, 32]}})
    adapter = build_adapter(cfg)
    assert kind_class("attention_unet") is type(adapter) and adapter.kind == "attention_unet"
    assert adapter.spec["name"] == "MonaiAttentionUNet" and adapter.stride == 4 and not adapter.uses_ema


# --- training, checkpoint, prediction ---------------------------------------------------------------


def test_checkpoint_reloads_with_its_weights_and_resumes(trained, phantoms):
    from medseg_diff.checkpoint import load_checkpoint
    from medseg_diff.inference.loading import load_model
    from medseg_diff.training.run import train

    cfg, out = trained
    model = load_model(out / "best.pt", "cpu")
    assert model.kind == "attention_unet" and isinstance(model.net, AttentionUNet)
    saved = load_checkpoint(out / "best.pt")
    assert saved["model_kind"] == "attention_unet" and saved["network"]["kwargs"]["channels"] == TINY["channels"]
    for k, v in model.net.state_dict().items():
        torch.testing.assert_close(v, saved["inference_model"][k])
    resumed = train(tiny_config(phantoms, out, "attention_unet", **{**SECTIONS, "train": {"epochs": 2,
                                                                                       "steps_per_epoch": 1}}))
    assert resumed.epoch == 2 and len(resumed.history) == 2


def test_predict_case_gives_probs_entropy_and_a_stitched_gate_map(trained, phantoms):
    from medseg_diff.data.conventions import get_convention
    from medseg_diff.data.dataset import case_record
    from medseg_diff.data.manifest import load_manifest
    from medseg_diff.evaluation.run import select_cases
    from medseg_diff.inference.case import predict_case
    from medseg_diff.inference.loading import load_model

    _, out = trained
    manifest = load_manifest(phantoms)
    case = select_cases(manifest, "test")[0]
    pred = predict_case(load_model(out / "best.pt", "cpu"), case_record(manifest, case),
                        get_convention(manifest.convention))
    assert pred.variance is None and set(pred.attention) == {"gate"}
    gate = pred.attention["gate"]
    assert gate.shape == pred.labels.shape == pred.probs.shape[1:] and np.isfinite(gate).all()
    head = pred.entropy > 0  # the head: predict sets entropy to 0 outside it
    assert 0.8 < float(gate[head].mean()) < 1.25  # stitched: 1 = the head's average (before the inverse resampling)
