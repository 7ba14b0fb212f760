"""Configs: YAML → frozen, validated dataclasses, one per concern. Parsed once, at the edge.

A YAML file may name a parent with ``extends: base.yaml`` (relative to itself); mappings are merged
key by key, the child winning. ``--set a.b=value`` overrides apply last (values parsed as YAML).
Unknown keys, wrong types and invalid choices raise ``ConfigError`` naming the key path, before any
work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medseg_diff.errors import ConfigError


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "medseg-diff"
    seed: int = 0
    output_dir: str = "runs/default"


@dataclass(frozen=True)
class DataConfig:
    manifest: str | None = None
    root: str | None = None  # overrides the manifest's data root
    fold: int = 0
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)  # None: keep native spacing
    roi_size: tuple[int, int, int] = (96, 96, 96)
    samples_per_volume: int = 2
    pos_neg: tuple[float, float] = (1.0, 1.0)
    batch_size: int = 1  # volumes per step (each yields samples_per_volume crops)
    cache: Literal["memory", "disk", "none"] = "memory"
    cache_dir: str | None = None
    num_workers: int = 0
    max_val_cases: int | None = None


@dataclass(frozen=True)
class UNetConfig:
    """The plain 3D U-Net baseline (MONAI ``UNet``)."""

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    dropout: float = 0.0


@dataclass(frozen=True)
class DenoiserConfig:
    """The conditional diffusion U-Net (see models/denoiser.py)."""

    patch_size: int = 4  # s: the denoiser and encoder run at 1/s of the input grid (1 = full resolution)
    channels: tuple[int, ...] = (16, 32, 64)  # denoiser widths per level, level 0 at 1/s
    encoder_factor: int = 2  # image encoder widths per level = this x channels
    stem_channels: int = 16  # the encoder's strided stem between the input grid and 1/s
    res_blocks: int = 1
    linear_attention_levels: tuple[int, ...] = (0, 1)
    cross_attention_levels: tuple[int, ...] = (2,)
    heads: int = 4
    dim_head: int = 16
    prior_source: Literal["head", "external", "none"] = "head"
    norm_groups: int = 8


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["diffusion", "unet"] = "diffusion"
    unet: UNetConfig = field(default_factory=UNetConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)


@dataclass(frozen=True)
class LossConfig:
    dice: float = 1.0
    bce: float = 1.0
    mse: float = 1.0  # diffusion only: MSE between the x0 estimate and x0
    prior: float = 0.5  # diffusion only: deep supervision of the prior head


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    schedule: Literal["linear_beta", "scaled_linear_beta", "cosine", "sigmoid_beta"] = "linear_beta"
    prediction: Literal["sample", "epsilon", "v_prediction"] = "sample"
    snr_shift: float = 1.0  # divide the schedule's SNR by this (patched denoisers: about patch_size^3)
    sample_steps: int = 2  # from the few-step curve (benchmarks/README.md)
    ensemble: int = 4
    step_uncertainty_weighting: bool = False
    val_sample_steps: int = 2
    val_ensemble: int = 1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    steps_per_epoch: int | None = None  # None: one pass over the training set
    lr: float = 2e-4
    weight_decay: float = 1e-5
    warmup_epochs: int = 2
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # diffusion model only; 0 disables EMA
    amp: bool = True  # bf16 autocast on CUDA; ignored on the CPU
    compile: bool = False  # torch.compile the training forward (fewer kernel launches; the first steps compile)
    val_every: int = 5
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = True  # deterministic algorithms (cuDNN, cuBLAS); the CPU thread count is always pinned
    progress: bool = True  # progress bars (only on an interactive terminal) and one log line per epoch


@dataclass(frozen=True)
class InferConfig:
    roi_size: tuple[int, int, int] | None = None  # None: data.roi_size
    overlap: float = 0.5
    sw_batch_size: int = 4
    mode: Literal["gaussian", "constant"] = "gaussian"
    threshold: float = 0.5


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str | None = None  # None: the data set's name
    run_name: str | None = None
    log_checkpoints: bool = True
    # register the trained model (an MLflow pyfunc) under this name, {kind} and {dataset} filled in; "" skips it
    register_model: str = "medseg-diff-{kind}"


@dataclass(frozen=True)
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 2e-4, ...}``: the config flattened, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# --- loading -----------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (following ``extends``), apply ``--set`` overrides, validate into a ``Config``."""
    raw: dict[str, Any] = _read_yaml_chain(Path(path)) if path is not None else {}
    for item in overrides or []:
        _apply_override(raw, item)
    return config_from_dict(raw, source=path)


def config_from_dict(raw: dict[str, Any], source: str | Path | None = None) -> Config:
    if isinstance(raw, dict) and isinstance(raw.get("tracking"), bool):  # `tracking: false` shorthand
        raw = {**raw, "tracking": {"enabled": raw["tracking"]}}
    cfg = _build(Config, raw, "", source)
    _check_semantics(cfg, source)
    return cfg


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError("extends", f"circular 'extends' chain through {path}", path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError("-", "config file not found", path) from None
    except yaml.YAMLError as err:
        raise ConfigError("-", f"not valid YAML ({err})", path) from err
    if not isinstance(doc, dict):
        raise ConfigError("-", "top level must be a mapping", path)
    parent = doc.pop("extends", None)
    if parent is None:
        return doc
    if not isinstance(parent, str):
        raise ConfigError("extends", "must be a file name", path)
    return _merge(_read_yaml_chain(path.parent / parent, seen + (path,)), doc)


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(item, "override must look like section.key=value")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"'{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(text)


def _build(cls: type, raw: Any, path: str, source) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path or "-", f"must be a mapping, got {type(raw).__name__}", source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(key, f"unknown key; known keys here: {', '.join(fields)}", source)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = f"{path}.{name}" if path else name
        values[name] = _coerce(hints[name], value, key, source)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str, source) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as err:
                errors.append(err.problem)
        raise ConfigError(key, "; ".join(errors), source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}", source)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {type(value).__name__} {value!r}", source)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"must have {len(args)} items, got {len(value)}", source)
        return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}", source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}", source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}", source)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}", source)
        return value
    raise ConfigError(key, f"unsupported type {tp}", source)


def _check_semantics(cfg: Config, source) -> None:
    """Value checks that types cannot express."""

    def positive(key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}", source)

    for key, value in [
        ("data.samples_per_volume", cfg.data.samples_per_volume), ("data.batch_size", cfg.data.batch_size),
        ("train.epochs", cfg.train.epochs), ("train.lr", cfg.train.lr), ("train.val_every", cfg.train.val_every),
        ("diffusion.timesteps", cfg.diffusion.timesteps), ("diffusion.sample_steps", cfg.diffusion.sample_steps),
        ("diffusion.ensemble", cfg.diffusion.ensemble), ("diffusion.val_sample_steps", cfg.diffusion.val_sample_steps),
        ("diffusion.val_ensemble", cfg.diffusion.val_ensemble), ("infer.sw_batch_size", cfg.infer.sw_batch_size),
        ("diffusion.snr_shift", cfg.diffusion.snr_shift),
    ]:
        positive(key, value)
    for i, size in enumerate(cfg.data.roi_size):
        positive(f"data.roi_size[{i}]", size)
    if cfg.data.spacing is not None:
        for i, s in enumerate(cfg.data.spacing):
            positive(f"data.spacing[{i}]", s)
    if not 0.0 <= cfg.infer.overlap < 1.0:
        raise ConfigError("infer.overlap", f"must be in [0, 1), got {cfg.infer.overlap}", source)
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError("train.ema_decay", f"must be in [0, 1), got {cfg.train.ema_decay}", source)
    if cfg.diffusion.sample_steps > cfg.diffusion.timesteps:
        raise ConfigError("diffusion.sample_steps", "must not exceed diffusion.timesteps", source)
    den = cfg.model.denoiser
    if den.patch_size < 1 or den.patch_size & (den.patch_size - 1):
        raise ConfigError("model.denoiser.patch_size", f"must be a power of two (1, 2, 4, ...), got {den.patch_size}",
                          source)
    positive("model.denoiser.encoder_factor", den.encoder_factor)
    positive("model.denoiser.stem_channels", den.stem_channels)
    levels = len(cfg.model.denoiser.channels)
    for name in ("linear_attention_levels", "cross_attention_levels"):
        for lvl in getattr(cfg.model.denoiser, name):
            if not 0 <= lvl < levels:
                raise ConfigError(f"model.denoiser.{name}", f"level {lvl} outside 0..{levels - 1}", source)
    if len(cfg.model.unet.strides) != len(cfg.model.unet.channels) - 1:
        raise ConfigError("model.unet.strides", "needs one stride fewer than model.unet.channels", source)
