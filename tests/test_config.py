import pytest

from medseg_diff.config import Config, config_from_dict, load_config
from medseg_diff.errors import ConfigError


def test_defaults_validate_and_flatten():
    cfg = config_from_dict({})
    assert isinstance(cfg, Config)
    flat = cfg.flat()
    assert flat["train.lr"] == cfg.train.lr and flat["model.denoiser.channels"] == list(cfg.model.denoiser.channels)


def test_extends_merges_and_overrides_apply(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.001\n  epochs: 7\ndata:\n  roi_size: [32, 32, 32]\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "child.yaml", overrides=["model.kind=unet", "data.spacing=null"])
    assert cfg.train.lr == 0.001 and cfg.train.epochs == 3
    assert cfg.data.roi_size == (32, 32, 32) and cfg.data.spacing is None
    assert cfg.model.kind == "unet"


@pytest.mark.parametrize(
    "raw,key,message",
    [
        ({"train": {"lrate": 1}}, "train.lrate", "unknown key"),
        ({"trian": {}}, "trian", "unknown key"),
        ({"train": {"epochs": "ten"}}, "train.epochs", "must be an integer"),
        ({"train": {"epochs": 2.5}}, "train.epochs", "must be an integer"),
        ({"train": {"amp": "yes"}}, "train.amp", "true or false"),
        ({"data": {"roi_size": [32, 32]}}, "data.roi_size", "must have 3 items"),
        ({"data": {"roi_size": [32, 32, "x"]}}, "data.roi_size[2]", "must be an integer"),
        ({"model": {"kind": "transformer"}}, "model.kind", "must be one of"),
        ({"model": {"denoiser": {"cross_attention_levels": [9]}}}, "model.denoiser.cross_attention_levels", "outside"),
        ({"diffusion": {"ensemble": 0}}, "diffusion.ensemble", "must be > 0"),
        ({"infer": {"overlap": 1.5}}, "infer.overlap", r"\[0, 1\)"),
        ({"tracking": "off"}, "tracking", "must be a mapping"),
    ],
)
def test_bad_configs_name_the_key(raw, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict(raw)
    assert info.value.key == key


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_circular_extends(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_tracking_false_shorthand():
    assert config_from_dict({"tracking": False}).tracking.enabled is False
    assert config_from_dict({"tracking": {"enabled": True}}).tracking.enabled is True
