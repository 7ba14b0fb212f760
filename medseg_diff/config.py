"""Configs: YAML → frozen, validated dataclasses, one per concern. Parsed once, at the edge.

A YAML file may name a parent with ``extends: base.yaml`` (relative to itself); mappings are merged
key by key, the child winning (an empty section, ``train:`` with every key commented out, changes nothing).
``--set a.b=value`` overrides apply last (values parsed as YAML). Every file and value is read by
``safe_yaml.ConfigLoader``: a key given twice in one mapping, too many aliases, an "alias bomb" or too deep a nesting
are refused while the YAML is composed, before anything is built from it.
Unknown keys, wrong types, invalid choices and values out of range or meaning (a negative learning rate,
a crop that is not a multiple of the network's stride, a tracking URI MLflow cannot use, ...) raise
``ConfigError`` naming the key path and where it came from (the file, or the ``--set`` override), before
any work starts.

``config_from_dict`` checks what the values themselves say; ``load_config`` (a config for a run on this
machine) also runs ``check_environment``: the device is present and the output folder can be one. Configs read
back from checkpoints go through ``config_from_dict`` only, so a model trained on ``cuda`` loads on a CPU.

Over 400 lines on purpose: the schema (one dataclass per section), the loader and the value checks (in the
order of the sections) are one contract; split, a new key would be declared in one file and checked in another.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medseg_diff.errors import ConfigError
from medseg_diff.safe_yaml import ConfigYAMLError, load_yaml
from medseg_diff.store_uris import folder_problem, uri_problem


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
    # training augmentation after the crops (data/transforms.py: train_transforms): none | light (flips, intensity
    # scale/shift: what training did before the presets) | brats (nnU-Net-like: light + affine, noise, blur, ...)
    augment: Literal["none", "light", "brats"] = "light"


@dataclass(frozen=True)
class UNetConfig:
    """The plain 3D U-Net baseline (MONAI ``UNet``)."""

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    dropout: float = 0.0


@dataclass(frozen=True)
class AttentionUNetConfig:
    """MONAI ``AttentionUnet`` (Oktay et al. 2018): a U-Net whose skips pass through learned attention gates."""

    channels: tuple[int, ...] = (16, 32, 64, 128)  # the demo U-Net's widths
    strides: tuple[int, ...] = (2, 2, 2)
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
    prior_source: Literal["head", "external", "optional", "none"] = "head"
    norm_groups: int = 8
    self_condition: bool = False  # the denoiser also sees its previous x0 estimate (Chen et al. 2022)
    token_source: Literal["features", "prior"] = "features"  # what the prior tokens are built from (encoder.py)
    token_level: int = -1  # the encoder level whose grid the prior tokens and the prior head use (-1: coarsest)
    refine: bool = False  # refine the x0 logits at full resolution once per member (denoiser.py: Refiner)
    refine_width: int | None = None  # the refiner's channels (None: stem_channels // 2); its cost is per member
    refine_context: int = 0  # residual 3x3x3 convs on the refiner's image features (once per window, not per member)


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["diffusion", "unet", "attention_unet"] = "diffusion"
    unet: UNetConfig = field(default_factory=UNetConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    attention_unet: AttentionUNetConfig = field(default_factory=AttentionUNetConfig)


@dataclass(frozen=True)
class LossConfig:
    dice: float = 1.0
    bce: float = 1.0
    mse: float = 1.0  # diffusion only: MSE between the x0 estimate and x0
    prior: float = 0.5  # diffusion only: deep supervision of the prior head
    attention: float = 0.0  # diffusion only: KL(whole tumour on the token grid || cross-attention mass)


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
    mode: Literal["denoise", "direct"] = "denoise"  # direct: x_t = 0 at t = T-1, one pass (the Öttl et al. control)
    x_skip: bool = False  # x0 logits += 2√ᾱ x_t / (1-ᾱ), x_t's own posterior log-odds (prediction "sample" only)
    noise: Literal["gaussian", "bernoulli"] = "gaussian"  # the forward process (bernoulli: BerDiff's voxel flips)
    eta: float = 0.0  # DDIM η: 0 deterministic, 1 DDPM-like fresh noise at every step (members differ more)
    recycle: float = 0.0  # fraction of training samples noised from the model's own estimate (Fu et al. 2023)
    chain: float = 0.0  # fraction of training samples drawn along the sampler's own chain (sample_steps, eta)
    self_condition_rate: float = 0.5  # a self-conditioned model: fraction of training samples given their own
    # first-pass x0 estimate (the rest get zeros, as the sampler's first step does)
    prior_none: float = 0.3  # prior_source optional: fraction of training crops given no prior (0.7 until 2026-12-07)


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
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    deterministic: bool = True  # deterministic algorithms (cuDNN, cuBLAS); the CPU thread count is always pinned
    progress: bool = True  # progress bars (only on an interactive terminal) and one log line per epoch


@dataclass(frozen=True)
class InferConfig:
    roi_size: tuple[int, int, int] | None = None  # None: data.roi_size
    overlap: float = 0.5
    sw_batch_size: int = 4
    mode: Literal["gaussian", "constant"] = "gaussian"
    threshold: float = 0.5
    min_lesion_mm3: float = 250.0  # post-processing: whole-tumour components smaller than this are removed
    min_enhancing_mm3: float = 0.0  # post-processing: a case's enhancing tumour smaller than this becomes core


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

def parse_yaml(text: str, source: str | Path | None = None, key_prefix: str = "") -> Any:
    """``text`` read by ``ConfigLoader``; what it refuses becomes a ``ConfigError`` naming the key path and
    ``source``. Other YAML errors (syntax) are raised as they are, for the caller to word."""
    try:
        return load_yaml(text, key_prefix)
    except ConfigYAMLError as err:
        raise ConfigError(err.key or "-", err.problem, source) from None
    except RecursionError:
        raise ConfigError(key_prefix or "-", "nested too deeply", source) from None


def _yaml_problem(err: yaml.YAMLError, lines: bool = True) -> str:
    """A YAML syntax error in one line: its problem and, in a file, where."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    if lines and mark is not None:
        problem += f" at line {mark.line + 1}, column {mark.column + 1}"
    return problem


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (following ``extends``), apply ``--set`` overrides, validate into a ``Config`` for a run
    here (``check_environment`` included). An error in a key that an override set names that override."""
    raw: dict[str, Any] = _read_yaml_chain(Path(path)) if path is not None else {}
    set_by: dict[str, str] = {}  # key path -> the override that set it (the last one wins)
    for item in overrides or []:
        set_by[_apply_override(raw, item)] = _override_source(item)
    try:
        cfg = config_from_dict(raw, source=path)
        check_environment(cfg, source=path)
    except ConfigError as err:
        blamed = _override_of(err.key, set_by)
        if blamed is None:
            raise
        raise ConfigError(err.key, err.problem, blamed) from None
    return cfg


def config_from_dict(raw: dict[str, Any], source: str | Path | None = None) -> Config:
    """Types and values (ranges, meanings, agreement between keys); nothing about this machine."""
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
        doc = parse_yaml(path.read_text(encoding="utf-8"), path) or {}
    except FileNotFoundError:
        raise ConfigError("-", "config file not found", path) from None
    except IsADirectoryError:
        raise ConfigError("-", "is a folder, not a config file", path) from None
    except UnicodeDecodeError as err:
        raise ConfigError("-", f"not UTF-8 text (byte {err.start}), so not a YAML config", path) from None
    except yaml.YAMLError as err:
        raise ConfigError("-", f"not valid YAML ({_yaml_problem(err)})", path) from None
    if not isinstance(doc, dict):
        raise ConfigError("-", f"top level must be a mapping, got {type(doc).__name__}", path)
    parent = doc.pop("extends", None)
    if parent is None:
        return doc
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError("extends", f"must be a file name, got {_show(parent)}", path)
    if not (path.parent / parent).is_file():
        what = "is not a file" if (path.parent / parent).exists() else "not found"
        raise ConfigError("extends", f"{path.parent / parent} {what}", path)
    return _merge(_read_yaml_chain(path.parent / parent, seen + (path,)), doc)


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is None and isinstance(out.get(key), dict):  # an empty section (keys commented out): no change
            continue
        else:
            out[key] = value
    return out


def _override_source(item: str) -> str:
    return f"--set {item if len(item) <= 100 else item[:97] + '...'}"


def _apply_override(raw: dict, item: str) -> str:
    """Set ``section.key=value`` (the value parsed as YAML) in ``raw``; returns the key path."""
    source = _override_source(item)
    key, sep, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise ConfigError(item, "override must look like section.key=value", source)
    try:
        value = parse_yaml(text, source, key_prefix=key)
    except yaml.YAMLError as err:
        raise ConfigError(key, f"value {_show(text)} is not valid YAML ({_yaml_problem(err, False)})", source
                          ) from None
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section in the file
            node[part] = {}
        elif part == "tracking" and node is raw and isinstance(node[part], bool):  # `tracking: false` shorthand
            node[part] = {"enabled": node[part]}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(key, f"'{part}' is not a section", source)
    node[parts[-1]] = value
    return key


def _override_of(key: str, set_by: dict[str, str]) -> str | None:
    """The override to blame for an error at ``key``: one that set it, a section above it (a list item:
    ``data.roi_size[2]``), or a key below it (an unknown section ``trian`` from ``trian.lr=1``)."""
    for set_key, source in reversed(list(set_by.items())):
        if key == set_key or key.startswith((f"{set_key}.", f"{set_key}[")) or set_key.startswith(f"{key}."):
            return source
    return None


def _build(cls: type, raw: Any, path: str, source) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path or "-", f"must be a mapping, got {type(raw).__name__}", source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be numbers, booleans, null
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
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error (it names an item: data.spacing[2])
            return _coerce(options[0], value, key, source)
        errors = []
        for arg in options:
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as err:
                errors.append(err.problem)
        raise ConfigError(key, "; ".join(errors), source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {_show(value)}", source)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {type(value).__name__} {_show(value)}", source)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"must have {len(args)} items, got {len(value)}", source)
        return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {_show(value)}", source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {_show(value)}{_number_hint(value, integer=True)}", source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {_show(value)}{_number_hint(value)}", source)
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value}", source)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {_show(value)}", source)
        return value
    raise ConfigError(key, f"unsupported type {tp}", source)


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error stays one short line whatever the value holds."""
    shown = reprlib.Repr()  # keyword arguments only from Python 3.12
    shown.maxlevel, shown.maxlist, shown.maxtuple, shown.maxdict = 3, 6, 6, 6
    shown.maxstring = shown.maxother = limit
    text = shown.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _number_hint(value: Any, integer: bool = False) -> str:
    """Why a number in the YAML is text: quoted, or an exponent PyYAML (YAML 1.1) does not read as a number (``1e-4``,
    ``1.5e3``: it needs a dot and a signed exponent, ``1.0e-4``, ``1.5e+3``)."""
    if not isinstance(value, str):
        return ""
    m = re.fullmatch(r"([-+]?[0-9]+)(\.[0-9]*)?[eE]([-+]?)([0-9]+)", value.strip())
    if m and integer:
        number = float(value)
        return f" (text to YAML: write {int(number)})" if number.is_integer() and abs(number) < 1e18 else ""
    if m:
        return f" (text to YAML: write {m[1]}{m[2] or '.0'}e{m[3] or '+'}{m[4]} for a number)"
    if re.fullmatch(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)", value.strip()):
        return " (text: write the number without quotes)"
    return ""


# --- value checks ------------------------------------------------------------------------------------

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
REGISTER_MODEL_FIELDS = ("kind", "dataset")


def network_stride(cfg: Config) -> tuple[int, str]:
    """``(stride, how it follows from the config)`` of ``model.kind``'s network: every crop and sliding-window
    size must be a multiple of it. The kind's own rule (``kinds``: ``ModelKind.config_stride``)."""
    from medseg_diff.kinds import kind_class  # the kind's module loads torch: only when a config is checked

    return kind_class(cfg.model.kind).config_stride(cfg)


def _check_semantics(cfg: Config, source) -> None:
    """Value checks that types cannot express: one call per rule, in the order of the sections."""

    def fail(key: str, problem: str) -> None:
        raise ConfigError(key, problem, source)

    def positive(key: str, value: float) -> None:
        if not value > 0:  # also refuses NaN
            fail(key, f"must be > 0, got {value}")

    def non_negative(key: str, value: float) -> None:
        if not value >= 0:
            fail(key, f"must be >= 0, got {value}")

    def below_one(key: str, value: float) -> None:
        if not 0.0 <= value < 1.0:
            fail(key, f"must be in [0, 1), got {value}")

    def each(check, key: str, values) -> None:
        for i, v in enumerate(values):
            check(f"{key}[{i}]", v)

    # experiment
    non_negative("experiment.seed", cfg.experiment.seed)
    # data
    d = cfg.data
    non_negative("data.fold", d.fold)
    if d.spacing is not None:
        each(positive, "data.spacing", d.spacing)
    each(positive, "data.roi_size", d.roi_size)
    positive("data.samples_per_volume", d.samples_per_volume)
    each(non_negative, "data.pos_neg", d.pos_neg)
    if sum(d.pos_neg) == 0:
        fail("data.pos_neg", f"must not both be 0 (the ratio of crops centred on a tumour to the others), got "
                             f"{list(d.pos_neg)}")
    positive("data.batch_size", d.batch_size)
    if d.cache == "disk" and not d.cache_dir:
        fail("data.cache_dir", "must be set when data.cache is 'disk'")
    non_negative("data.num_workers", d.num_workers)
    if d.max_val_cases is not None:
        non_negative("data.max_val_cases", d.max_val_cases)
    # model.unet and model.attention_unet: channels per level, one stride fewer, dropout
    for name in ("unet", "attention_unet"):
        section, key = getattr(cfg.model, name), f"model.{name}"
        if len(section.channels) < 2:
            fail(f"{key}.channels", f"needs at least 2 levels, got {list(section.channels)}")
        each(positive, f"{key}.channels", section.channels)
        if len(section.strides) != len(section.channels) - 1:
            fail(f"{key}.strides", f"needs one stride fewer than {key}.channels ({len(section.channels)} levels), "
                                   f"got {list(section.strides)}")
        each(positive, f"{key}.strides", section.strides)
        below_one(f"{key}.dropout", section.dropout)
    non_negative("model.unet.num_res_units", cfg.model.unet.num_res_units)
    # model.denoiser (GroupNorm takes the largest group count <= norm_groups that divides the width, so widths
    # need not be multiples of norm_groups: models.blocks.group_norm)
    den = cfg.model.denoiser
    if den.patch_size < 1 or den.patch_size & (den.patch_size - 1):
        fail("model.denoiser.patch_size", f"must be a power of two (1, 2, 4, ...), got {den.patch_size}")
    if not den.channels:
        fail("model.denoiser.channels", "needs at least 1 level, got []")
    each(positive, "model.denoiser.channels", den.channels)
    positive("model.denoiser.encoder_factor", den.encoder_factor)
    positive("model.denoiser.stem_channels", den.stem_channels)
    positive("model.denoiser.res_blocks", den.res_blocks)
    if den.refine_width is not None:
        positive("model.denoiser.refine_width", den.refine_width)
    non_negative("model.denoiser.refine_context", den.refine_context)
    levels = len(den.channels)
    for name in ("linear_attention_levels", "cross_attention_levels"):
        for lvl in getattr(den, name):
            if not 0 <= lvl < levels:
                fail(f"model.denoiser.{name}",
                     f"level {lvl} outside 0..{levels - 1} (model.denoiser.channels has {levels} levels)")
    positive("model.denoiser.heads", den.heads)
    positive("model.denoiser.dim_head", den.dim_head)
    positive("model.denoiser.norm_groups", den.norm_groups)
    if not -levels <= den.token_level < levels:
        fail("model.denoiser.token_level", f"must index one of the {levels} levels (-{levels}..{levels - 1}), "
                                           f"got {den.token_level}")
    # loss
    weights = dataclasses.asdict(cfg.loss)
    for name, value in weights.items():
        non_negative(f"loss.{name}", value)
    from medseg_diff.kinds import kind_class

    used = kind_class(cfg.model.kind).loss_terms(cfg)
    if not any(weights[name] > 0 for name in used):
        fail("loss", f"the weights model.kind '{cfg.model.kind}' uses ({', '.join(used)}) are all 0: nothing "
                     "would be trained")
    # diffusion
    diff = cfg.diffusion
    positive("diffusion.timesteps", diff.timesteps)
    positive("diffusion.snr_shift", diff.snr_shift)
    for name in ("sample_steps", "ensemble", "val_sample_steps", "val_ensemble"):
        positive(f"diffusion.{name}", getattr(diff, name))
    for name in ("eta", "recycle", "chain", "self_condition_rate", "prior_none"):
        if not 0.0 <= getattr(diff, name) <= 1.0:
            fail(f"diffusion.{name}", f"must be in [0, 1], got {getattr(diff, name)}")
    if diff.chain > 0 and diff.prediction != "sample":
        fail("diffusion.chain", f"needs diffusion.prediction 'sample' (its losses act on x0), got "
                                f"{diff.prediction!r}")
    if diff.noise == "bernoulli" and diff.prediction != "sample":
        fail("diffusion.noise", f"'bernoulli' needs diffusion.prediction 'sample' (x0 probabilities), got "
                                f"{diff.prediction!r}")
    if diff.x_skip and diff.prediction != "sample":
        fail("diffusion.x_skip", f"needs diffusion.prediction 'sample' (x0 logits), got {diff.prediction!r}")
    for name in ("sample_steps", "val_sample_steps"):
        if getattr(diff, name) > diff.timesteps:
            fail(f"diffusion.{name}", f"must not exceed diffusion.timesteps ({diff.timesteps}), got "
                                      f"{getattr(diff, name)}")
    # train
    t = cfg.train
    positive("train.epochs", t.epochs)
    if t.steps_per_epoch is not None:
        positive("train.steps_per_epoch", t.steps_per_epoch)
    positive("train.lr", t.lr)
    non_negative("train.weight_decay", t.weight_decay)
    non_negative("train.warmup_epochs", t.warmup_epochs)
    non_negative("train.grad_clip", t.grad_clip)
    below_one("train.ema_decay", t.ema_decay)
    positive("train.val_every", t.val_every)
    if not DEVICE_PATTERN.fullmatch(t.device):
        fail("train.device", f"must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
    # infer
    i = cfg.infer
    if i.roi_size is not None:
        each(positive, "infer.roi_size", i.roi_size)
    below_one("infer.overlap", i.overlap)
    positive("infer.sw_batch_size", i.sw_batch_size)
    if not 0.0 < i.threshold < 1.0:
        fail("infer.threshold", f"must be in (0, 1) (a probability cut-off), got {i.threshold}")
    non_negative("infer.min_lesion_mm3", i.min_lesion_mm3)
    non_negative("infer.min_enhancing_mm3", i.min_enhancing_mm3)
    # the network's stride (after model and infer: it needs valid levels and sizes)
    stride, how = network_stride(cfg)
    for key, roi in [("data.roi_size", d.roi_size), ("infer.roi_size", i.roi_size)]:
        if roi is not None and any(s % stride for s in roi):
            fail(key, f"{list(roi)} must be a multiple of the network stride {stride} ({how})")
    # tracking
    _check_tracking_uri(cfg.tracking.uri, fail)
    _check_register_model(cfg.tracking.register_model, fail)


def _check_tracking_uri(uri: str | None, fail) -> None:
    if uri is not None and (problem := uri_problem(uri)):
        fail("tracking.uri", problem)


def _check_register_model(name: str, fail) -> None:
    key = "tracking.register_model"
    try:
        name.format(**{field: "x" for field in REGISTER_MODEL_FIELDS})
    except KeyError as err:
        fail(key, f"unknown placeholder {{{err.args[0]}}} (only {{kind}} and {{dataset}} are filled in), got {name!r}")
    except (IndexError, ValueError, AttributeError) as err:
        fail(key, f"not a valid name template ({err}; only {{kind}} and {{dataset}} are filled in), got {name!r}")


# --- this machine ------------------------------------------------------------------------------------


def check_environment(cfg: Config, source: str | Path | None = None) -> None:
    """What a run of ``cfg`` needs from this machine, checked before any work (and without creating anything):
    the device ``train.device`` names is present, ``experiment.output_dir`` / ``data.cache_dir`` can be folders,
    and, with tracking on, the store it will open (``tracking.uri``, else ``$MLFLOW_TRACKING_URI``) is one MLflow
    opens. ``load_config`` calls it; a config read back from a checkpoint does not need it."""
    _check_device(cfg.train.device, source)
    _check_folder("experiment.output_dir", cfg.experiment.output_dir, source)
    if cfg.data.cache_dir:
        _check_folder("data.cache_dir", cfg.data.cache_dir, source)
    if cfg.tracking.enabled:
        _check_tracking_store(cfg.tracking.uri, source)


def _check_tracking_store(uri: str | None, source) -> None:
    """The store the run will open: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI`` (its form checked here, since the
    config does not hold it); a folder must be able to hold FOLDER/mlflow.db (``store_uris.folder_problem``)."""
    key, env = "tracking.uri", os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and env:
        problem = uri_problem(env) or folder_problem(env)
        if problem:
            raise ConfigError(key, f"is null, so $MLFLOW_TRACKING_URI={env!r} is used, and it: {problem}", source)
        return
    if uri and (problem := folder_problem(uri)):
        raise ConfigError(key, problem, source)


def _check_device(name: str, source) -> None:
    if name in ("auto", "cpu"):
        return
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    present = ["cpu"] + [f"cuda:{i}" for i in range(cuda)] + (["mps"] if mps else [])
    here = f"present here: {', '.join(present)}; auto picks the first GPU, else the CPU"
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if index >= cuda:
            seen = "no CUDA GPU" if cuda == 0 else f"{cuda} CUDA GPU{'s' if cuda > 1 else ''}"
            raise ConfigError("train.device", f"'{name}' asked for, but torch sees {seen} ({here})", source)
    elif name == "mps" and not mps:
        raise ConfigError("train.device", f"'mps' asked for, but torch sees no Apple MPS device ({here})", source)


def _check_folder(key: str, folder: str, source) -> None:
    """``folder`` is a folder, or can become one: neither it nor a folder above it is a file."""
    path = Path(folder)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                problem = "is a file, not a folder" if p == path else f"cannot be a folder: {p} is a file"
                raise ConfigError(key, f"'{folder}' {problem}", source)
            return
