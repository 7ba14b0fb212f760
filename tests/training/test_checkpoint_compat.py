"""Checkpoints across the compact-model change: a format-1 (full-resolution) checkpoint still loads for
inference, a run cannot resume into a different network, and inference settings (overlap) override cleanly."""

from pathlib import Path

import pytest
import torch

from factories import tiny_config
from medseg_diff.checkpoint import FORMAT, load_checkpoint, save_checkpoint, upgrade_config
from medseg_diff.inference.loading import load_model
from medseg_diff.training.run import train
from medseg_diff.errors import ConfigError, TrainingError

ONE_EPOCH = dict(train={"epochs": 1, "steps_per_epoch": 1}, data={"max_val_cases": 0})


def _as_format_1(path: Path, out: Path) -> Path:
    """A copy of a full-resolution checkpoint as the code before the compact design wrote it: format 1, and a
    config without the keys that did not exist then."""
    ckpt = load_checkpoint(path)
    denoiser = {k: v for k, v in ckpt["config"]["model"]["denoiser"].items()
                if k not in ("patch_size", "encoder_factor", "stem_channels")}
    ckpt["config"]["model"]["denoiser"] = denoiser
    ckpt["format"] = 1
    del ckpt["network"]  # format 3 added the network's own arguments
    return save_checkpoint(ckpt, out)


def test_format_1_checkpoint_loads_as_the_full_resolution_model(phantoms, tmp_path):
    cfg = tiny_config(phantoms, tmp_path / "full", "diffusion", **ONE_EPOCH)
    raw = cfg.to_dict()
    raw["model"]["denoiser"].update(patch_size=1, encoder_factor=1)
    from medseg_diff.config import config_from_dict

    train(config_from_dict(raw))
    old = _as_format_1(tmp_path / "full" / "best.pt", tmp_path / "old.pt")
    model = load_model(old)
    assert model.net.patch_size == 1 and model.cfg.model.denoiser.encoder_factor == 1
    saved = load_checkpoint(old)["inference_model"]
    for name, value in model.net.state_dict().items():
        torch.testing.assert_close(value, saved[name])


@pytest.mark.parametrize("kind", ["diffusion", "unet"])
def test_the_network_is_rebuilt_from_its_own_arguments_in_the_checkpoint(phantoms, tmp_path, kind):
    from medseg_diff.errors import DataError
    from medseg_diff.kinds import kind_class

    train(tiny_config(phantoms, tmp_path / "run", kind, **ONE_EPOCH))
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["format"] == FORMAT == 4
    spec = ckpt["network"]
    net = kind_class(kind).network_factory(**spec["kwargs"])  # Net(**cfg), nothing else needed
    net.load_state_dict(ckpt["inference_model"])
    # inference follows the spec, not the run config: a config that disagrees cannot change the network
    if kind == "diffusion":
        ckpt["config"]["model"]["denoiser"]["channels"] = [4, 8, 16]
    else:
        ckpt["config"]["model"]["unet"]["num_res_units"] = 0
    model = load_model(save_checkpoint(ckpt, tmp_path / "spec.pt"))
    assert sum(p.numel() for p in model.net.parameters()) == sum(p.numel() for p in net.parameters())
    # weights that do not fit the network the checkpoint describes: a clear error naming the file
    ckpt["network"]["kwargs"]["channels"] = [c * 2 for c in spec["kwargs"]["channels"]]
    with pytest.raises(DataError, match=r"bad\.pt: the weights do not fit the network"):
        load_model(save_checkpoint(ckpt, tmp_path / "bad.pt"))


def test_upgrade_leaves_new_and_unet_configs_alone():
    raw = {"model": {"kind": "diffusion", "denoiser": {"patch_size": 4}}}
    assert upgrade_config(raw, FORMAT) is raw
    assert upgrade_config({"model": {"kind": "unet"}}, 1) == {"model": {"kind": "unet"}}
    assert upgrade_config({"model": {"denoiser": {"channels": [8]}}}, 1)["model"]["denoiser"] == {
        "patch_size": 1, "encoder_factor": 1, "channels": [8]}


def test_resume_into_a_different_network_is_refused_by_name(phantoms, tmp_path):
    train(tiny_config(phantoms, tmp_path / "run", "diffusion", **ONE_EPOCH))
    changed = tiny_config(phantoms, tmp_path / "run", "diffusion", train={"epochs": 2, "steps_per_epoch": 1},
                          data={"max_val_cases": 0}, model={"kind": "diffusion", "denoiser": {
                              "channels": [8, 16, 32], "linear_attention_levels": [0, 1], "cross_attention_levels": [2],
                              "heads": 2, "dim_head": 8, "norm_groups": 4, "patch_size": 4}})
    with pytest.raises(TrainingError, match=r"model\.denoiser\.patch_size: 2 -> 4") as err:
        train(changed)
    assert "last.pt" in str(err.value) and "--no-resume" in str(err.value)
    # settings of the other model do not block a resume
    other_unet = tiny_config(phantoms, tmp_path / "run", "diffusion", train={"epochs": 2, "steps_per_epoch": 1},
                             data={"max_val_cases": 0})
    raw = other_unet.to_dict()
    raw["model"]["unet"]["channels"] = [4, 8, 16]
    from medseg_diff.config import config_from_dict

    assert train(config_from_dict(raw)).epoch == 2


def test_overlap_override_reaches_the_config_and_is_validated(phantoms, tmp_path):
    train(tiny_config(phantoms, tmp_path / "u", "unet", **ONE_EPOCH))
    ckpt = tmp_path / "u" / "best.pt"
    assert load_model(ckpt).cfg.infer.overlap == 0.25
    assert load_model(ckpt, overlap=0.0).cfg.infer.overlap == 0.0
    with pytest.raises(ConfigError, match=r"'--overlap': must be in \[0, 1\), got 1.0"):  # the flag the user typed
        load_model(ckpt, overlap=1.0)


def test_an_inference_checkpoint_is_refused_as_a_resume_point(phantoms, tmp_path):
    """The MLflow model's inference checkpoint (weights only) put where a run resumes from: a clear TrainingError,
    not a KeyError on the missing optimizer state."""
    from medseg_diff.checkpoint import inference_checkpoint

    train(tiny_config(phantoms, tmp_path / "run", "unet", **ONE_EPOCH))
    last = tmp_path / "run" / "last.pt"
    inference_checkpoint(last, tmp_path / "inference.pt")
    (tmp_path / "inference.pt").replace(last)
    with pytest.raises(TrainingError, match="inference checkpoint.*cannot be resumed"):
        train(tiny_config(phantoms, tmp_path / "run", "unet", train={"epochs": 2, "steps_per_epoch": 1},
                          data={"max_val_cases": 0}))
