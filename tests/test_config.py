from pathlib import Path

import pytest

from factories import tiny_config
from medseg_diff.config import Config, config_from_dict, load_config, network_stride
from medseg_diff.store_uris import TRACKING_SCHEMES
from medseg_diff.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_validate_and_flatten():
    cfg = config_from_dict({})
    assert isinstance(cfg, Config)
    flat = cfg.flat()
    assert flat["train.lr"] == cfg.train.lr and flat["model.denoiser.channels"] == list(cfg.model.denoiser.channels)


def test_bernoulli_noise_is_opt_in_and_old_checkpoints_keep_gaussian():
    """base.yaml keeps Gaussian noise (README: the study's Dice gain against the audit's losses); a stored config
    without the key (a checkpoint from before the setting) reads back as the Gaussian noise it was trained with."""
    assert load_config(CONFIGS / "base.yaml").diffusion.noise == "gaussian"
    assert load_config(CONFIGS / "demo_cpu.yaml", ["diffusion.noise=bernoulli"]).diffusion.noise == "bernoulli"
    old = load_config(CONFIGS / "base.yaml", ["diffusion.noise=bernoulli"]).to_dict()
    del old["diffusion"]["noise"]
    assert config_from_dict(old).diffusion.noise == "gaussian"
    with pytest.raises(ConfigError, match="diffusion.noise"):
        config_from_dict({"diffusion": {"noise": "bernoulli", "prediction": "epsilon"}})


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


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output_dir etc. are relative to the working directory; nothing is created
    cfg = load_config(path)
    stride, _ = network_stride(cfg)
    assert all(s % stride == 0 for s in cfg.data.roi_size)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["diffusion", "unet"])
def test_tiny_test_configs_validate(tmp_path, kind):
    cfg = tiny_config(tmp_path / "m.json", tmp_path / "out", kind, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert cfg.model.kind == kind and cfg.data.roi_size == (16, 16, 16)


@pytest.mark.parametrize("section,values", [
    ("model", {"kind": "diffusion", "denoiser": {"patch_size": 2, "channels": [8, 16, 32], "norm_groups": 4,
                                                  "linear_attention_levels": [], "cross_attention_levels": [2]}}),
    ("model", {"kind": "diffusion", "denoiser": {"patch_size": 1, "channels": [8, 16], "norm_groups": 4,
                                                  "linear_attention_levels": [], "cross_attention_levels": []}}),
    ("model", {"kind": "unet", "unet": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}}),
    ("model", {"kind": "unet", "unet": {"channels": [8, 16], "strides": [4], "num_res_units": 0}}),
])
def test_network_stride_is_the_built_networks(section, values):
    from medseg_diff.kinds import build_kind as build_adapter

    cfg = config_from_dict({section: values, "data": {"roi_size": [32, 32, 32]}})
    assert network_stride(cfg)[0] == build_adapter(cfg).stride


# every value the review found accepted, and the other range / meaning rules: (raw, key path, message)
INVALID = [
    ({"train": {"lr": -1e-3}}, "train.lr", "must be > 0, got -0.001"),
    ({"loss": {"dice": -1}}, "loss.dice", "must be >= 0, got -1.0"),
    ({"loss": {"bce": -0.5}}, "loss.bce", "must be >= 0, got -0.5"),
    ({"loss": {"mse": -1}}, "loss.mse", "must be >= 0, got -1.0"),
    ({"loss": {"prior": -2}}, "loss.prior", "must be >= 0, got -2.0"),
    ({"loss": {"dice": 0, "bce": 0}, "model": {"kind": "unet"}}, "loss", "unet' uses \\(dice, bce\\) are all 0"),
    ({"train": {"grad_clip": -1}}, "train.grad_clip", "must be >= 0, got -1.0"),
    ({"train": {"warmup_epochs": -1}}, "train.warmup_epochs", "must be >= 0, got -1"),
    ({"train": {"weight_decay": -1e-5}}, "train.weight_decay", "must be >= 0, got -1e-05"),
    ({"model": {"unet": {"dropout": 2.0}}}, "model.unet.dropout", "must be in \\[0, 1\\), got 2.0"),
    ({"model": {"denoiser": {"heads": 0}}}, "model.denoiser.heads", "must be > 0, got 0"),
    ({"model": {"denoiser": {"dim_head": -4}}}, "model.denoiser.dim_head", "must be > 0, got -4"),
    ({"data": {"num_workers": -1}}, "data.num_workers", "must be >= 0, got -1"),
    ({"data": {"max_val_cases": -1}}, "data.max_val_cases", "must be >= 0, got -1"),
    ({"train": {"steps_per_epoch": 0}}, "train.steps_per_epoch", "must be > 0, got 0"),
    ({"train": {"steps_per_epoch": -3}}, "train.steps_per_epoch", "must be > 0, got -3"),
    ({"infer": {"threshold": 5}}, "infer.threshold", "must be in \\(0, 1\\).*got 5.0"),
    ({"infer": {"threshold": 0}}, "infer.threshold", "must be in \\(0, 1\\).*got 0.0"),
    ({"data": {"pos_neg": [-1, 1]}}, "data.pos_neg[0]", "must be >= 0, got -1.0"),
    ({"data": {"pos_neg": [0, 0]}}, "data.pos_neg", "must not both be 0"),
    ({"data": {"roi_size": [96, 96, 40]}}, "data.roi_size",
     "\\[96, 96, 40\\] must be a multiple of the network stride 16 \\(model.denoiser.patch_size 4"),
    ({"model": {"kind": "unet"}, "data": {"roi_size": [96, 96, 88]}}, "data.roi_size",
     "must be a multiple of the network stride 16 \\(the product of model.unet.strides \\[2, 2, 2, 2\\]\\)"),
    ({"infer": {"roi_size": [64, 64, 72]}}, "infer.roi_size",
     "\\[64, 64, 72\\] must be a multiple of the network stride 16"),
    ({"infer": {"roi_size": [64, 0, 64]}}, "infer.roi_size[1]", "must be > 0, got 0"),
    ({"infer": {"overlap": 1.0}}, "infer.overlap", "must be in \\[0, 1\\), got 1.0"),
    ({"infer": {"overlap": -0.1}}, "infer.overlap", "must be in \\[0, 1\\), got -0.1"),
    ({"diffusion": {"sample_steps": 0}}, "diffusion.sample_steps", "must be > 0, got 0"),
    ({"diffusion": {"val_ensemble": 0}}, "diffusion.val_ensemble", "must be > 0, got 0"),
    ({"diffusion": {"timesteps": 10, "sample_steps": 20}}, "diffusion.sample_steps",
     "must not exceed diffusion.timesteps \\(10\\), got 20"),
    ({"diffusion": {"timesteps": 10, "sample_steps": 2, "val_sample_steps": 11}}, "diffusion.val_sample_steps",
     "must not exceed diffusion.timesteps \\(10\\), got 11"),
    ({"train": {"ema_decay": 1.0}}, "train.ema_decay", "must be in \\[0, 1\\), got 1.0"),
    ({"train": {"epochs": 0}}, "train.epochs", "must be > 0, got 0"),
    ({"train": {"val_every": 0}}, "train.val_every", "must be > 0, got 0"),
    ({"data": {"batch_size": 0}}, "data.batch_size", "must be > 0, got 0"),
    ({"data": {"spacing": [1.0, 0.0, 1.0]}}, "data.spacing[1]", "must be > 0, got 0.0"),
    ({"data": {"fold": -1}}, "data.fold", "must be >= 0, got -1"),
    ({"data": {"cache": "disk"}}, "data.cache_dir", "must be set when data.cache is 'disk'"),
    ({"experiment": {"seed": -1}}, "experiment.seed", "must be >= 0, got -1"),
    ({"model": {"unet": {"channels": [16, 0, 64, 128, 256]}}}, "model.unet.channels[1]", "must be > 0, got 0"),
    ({"model": {"unet": {"channels": [16], "strides": []}}}, "model.unet.channels", "needs at least 2 levels"),
    ({"model": {"unet": {"strides": [2, 2, 0, 2]}}}, "model.unet.strides[2]", "must be > 0, got 0"),
    ({"model": {"unet": {"num_res_units": -1}}}, "model.unet.num_res_units", "must be >= 0, got -1"),
    ({"model": {"denoiser": {"channels": [16, -32, 64]}}}, "model.denoiser.channels[1]", "must be > 0, got -32"),
    ({"model": {"denoiser": {"channels": []}}}, "model.denoiser.channels", "needs at least 1 level"),
    ({"model": {"denoiser": {"res_blocks": 0}}}, "model.denoiser.res_blocks", "must be > 0, got 0"),
    ({"model": {"denoiser": {"norm_groups": 0}}}, "model.denoiser.norm_groups", "must be > 0, got 0"),
    ({"model": {"denoiser": {"patch_size": 3}}}, "model.denoiser.patch_size", "power of two.*got 3"),
    ({"model": {"denoiser": {"linear_attention_levels": [-1]}}}, "model.denoiser.linear_attention_levels",
     "level -1 outside 0..2 \\(model.denoiser.channels has 3 levels\\)"),
    ({"train": {"device": "gpu"}}, "train.device", "must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ({"train": {"device": "cuda:x"}}, "train.device", "got 'cuda:x'"),
    ({"tracking": {"uri": "bogus://x"}}, "tracking.uri", "scheme 'bogus' is not one MLflow tracks to"),
    ({"tracking": {"uri": "localhost:5000"}}, "tracking.uri", "scheme 'localhost' is not one MLflow tracks to"),
    ({"tracking": {"uri": "http://"}}, "tracking.uri", "needs a host"),
    ({"tracking": {"uri": "sqlite://mlflow.db"}}, "tracking.uri", "must look like sqlite:///PATH.db"),
    ({"tracking": {"uri": ""}}, "tracking.uri", "is empty"),
    ({"tracking": {"register_model": "m-{model}"}}, "tracking.register_model", "unknown placeholder \\{model\\}"),
    ({"tracking": {"register_model": "m-{kind"}}, "tracking.register_model", "not a valid name template"),
]


@pytest.mark.parametrize("raw,key,message", INVALID, ids=[f"{k}:{i}" for i, (_, k, _) in enumerate(INVALID)])
def test_invalid_values_name_the_key(raw, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict(raw, source="run.yaml")
    assert info.value.key == key
    assert info.value.source == "run.yaml"
    assert str(info.value).startswith(f"run.yaml: config key '{key}': ")


def test_boundary_values_are_accepted():
    cfg = config_from_dict({
        "data": {"num_workers": 0, "max_val_cases": 0, "pos_neg": [0, 1], "cache": "disk", "cache_dir": "c"},
        "train": {"grad_clip": 0, "warmup_epochs": 0, "weight_decay": 0, "ema_decay": 0, "steps_per_epoch": 1},
        "loss": {"dice": 0, "bce": 0, "mse": 1, "prior": 0},
        "model": {"unet": {"dropout": 0.0, "num_res_units": 0}},
        "infer": {"overlap": 0.0, "threshold": 0.01, "roi_size": [32, 48, 64]},
        "diffusion": {"timesteps": 4, "sample_steps": 4, "val_sample_steps": 4},
        "tracking": {"register_model": "{dataset}-{kind}"},
    })
    assert cfg.train.grad_clip == 0.0 and cfg.data.max_val_cases == 0 and cfg.infer.roi_size == (32, 48, 64)
    assert cfg.diffusion.sample_steps == cfg.diffusion.timesteps == 4


@pytest.mark.parametrize("uri", [
    "sqlite:///mlflow.db", "sqlite:////abs/mlflow.db", "file:///tmp/mlruns", "file:mlruns", "mlruns", "/abs/mlruns",
    "http://127.0.0.1:5000", "https://mlflow.example.org", "databricks", "databricks://profile",
    "postgresql://u:p@host:5432/db", "postgresql+psycopg2://u@host/db", "mysql://u@host/db", "mssql://u@host/db",
])
def test_tracking_uris_mlflow_accepts_are_accepted(uri):
    assert config_from_dict({"tracking": {"uri": uri}}).tracking.uri == uri


def test_accepted_tracking_schemes_are_mlflows():
    registry = pytest.importorskip("mlflow.tracking._tracking_service.utils")._tracking_store_registry
    assert set(TRACKING_SCHEMES) <= set(registry._registry)


@pytest.mark.parametrize("device,present", [
    ("cuda", "torch sees no CUDA GPU \\(present here: cpu;"),
    ("cuda:1", "torch sees no CUDA GPU"),
    ("mps", "torch sees no Apple MPS device \\(present here: cpu;"),
])
def test_a_device_torch_does_not_see_is_refused_at_load(monkeypatch, tmp_path, device, present):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    path = tmp_path / "gpu.yaml"
    path.write_text(f"train:\n  device: {device}\n")
    with pytest.raises(ConfigError, match=f"'{device}' asked for, but {present}") as info:
        load_config(path)
    assert info.value.key == "train.device" and info.value.source == str(path)
    assert load_config(path, ["train.device=cpu"]).train.device == "cpu"
    # a config read back from a checkpoint (config_from_dict) does not depend on this machine
    assert config_from_dict({"train": {"device": device}}).train.device == device


def test_cuda_index_beyond_the_gpus_present(monkeypatch, tmp_path):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"'cuda:2' asked for, but torch sees 2 CUDA GPUs \(present here: cpu, "
                                          r"cuda:0, cuda:1;") as info:
        load_config(None, ["train.device=cuda:2"])
    assert info.value.key == "train.device"


def test_output_dir_that_is_a_file_is_refused_without_creating_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("not a folder")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("experiment:\n  output_dir: taken\n")
    with pytest.raises(ConfigError, match="'taken' is a file, not a folder") as info:
        load_config(cfg_file)
    assert info.value.key == "experiment.output_dir" and info.value.source == str(cfg_file)
    with pytest.raises(ConfigError, match="'taken/run' cannot be a folder: taken is a file") as info:
        load_config(None, ["experiment.output_dir=taken/run", "data.cache_dir=fresh/cache"])
    assert info.value.key == "experiment.output_dir"
    with pytest.raises(ConfigError, match="'taken' is a file") as info:
        load_config(None, ["data.cache_dir=taken"])
    assert info.value.key == "data.cache_dir"
    assert load_config(None, ["experiment.output_dir=new/run"]).experiment.output_dir == "new/run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "taken"]  # nothing created at load


def test_errors_in_set_overrides_are_blamed_on_the_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 3\n")
    cases = [
        ("train.lrate=1", "train.lrate", "unknown key"),
        ("trian.lr=1", "trian", "unknown key"),
        ("train.lr=-1", "train.lr", "must be > 0, got -1.0"),
        ("data.roi_size=[32, 32, x]", "data.roi_size[2]", "must be an integer, got 'x'"),
        ("train.epochs=0", "train.epochs", "must be > 0, got 0"),
    ]
    for item, key, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            load_config(path, ["model.kind=unet", item])
        assert info.value.key == key
        assert info.value.source == f"--set {item}"
        assert str(info.value).startswith(f"--set {item}: config key '{key}': ")
    # an error in the file itself is still blamed on the file
    path.write_text("train:\n  lrate: 1\n")
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(path, ["train.lr=0.001"])
    assert info.value.key == "train.lrate" and info.value.source == str(path)


@pytest.mark.parametrize("item,key,message", [
    ("data.roi_size=[32,32", "data.roi_size", "value '\\[32,32' is not valid YAML \\(expected ',' or ']'"),
    ("train.lr={", "train.lr", "is not valid YAML"),
    ("train", "train", "override must look like section.key=value"),
    ("train..lr=1", "train..lr=1", "override must look like section.key=value"),
    ("train.lr.x=1", "train.lr", "must be a number, got \\{'x': 1\\}"),
])
def test_bad_set_overrides_are_config_errors(item, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [item])
    assert info.value.key == key and info.value.source == f"--set {item}"


def test_set_into_an_empty_section_and_the_tracking_shorthand(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\ntracking: false\n")  # an empty section (null), and `tracking: false`
    cfg = load_config(path, ["train.epochs=3", "tracking.uri=sqlite:///x.db"])
    assert cfg.train.epochs == 3
    assert cfg.tracking.enabled is False and cfg.tracking.uri == "sqlite:///x.db"
    path.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="'lr' is not a section") as info:
        load_config(path, ["train.lr.x=1"])
    assert info.value.key == "train.lr.x" and info.value.source == "--set train.lr.x=1"


def test_the_demo_finds_its_config_wherever_its_module_lives():
    """``make demo`` reads configs/demo_cpu.yaml next to the package (a moved module once looked inside it)."""
    from medseg_diff.stages.demo import DEMO_CONFIG

    assert DEMO_CONFIG.is_file() and DEMO_CONFIG == Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"
    assert load_config(DEMO_CONFIG).model.kind == "diffusion"
