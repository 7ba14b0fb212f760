"""Load a trained model for inference from its checkpoint, with nothing from training.

The network is rebuilt from the checkpoint's own ``network`` spec (the constructor of the kind that owns ``name``, ``kinds.build_network``) and takes the
inference weights (the EMA when training kept one); the rest of the stored config gives the preprocessing,
sliding-window and sampler settings, which the caller may override. It reads a training checkpoint and its
inference checkpoint (``checkpoint.inference_checkpoint``, what a logged MLflow model holds) alike: nothing else of
a checkpoint is read here. A model registered in MLflow is loaded through
``stages.load_model``, which fetches its checkpoint first (``tracking.registry``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medseg_diff.checkpoint import load_checkpoint, upgrade_config
from medseg_diff.config import Config, config_from_dict
from medseg_diff.data.manifest import load_manifest
from medseg_diff.data.profile import native_spacing, training_record
from medseg_diff.errors import ConfigError, DataError, MedsegError
from medseg_diff.kinds import build_kind, build_network, kind_class
from medseg_diff.kinds.base import ModelKind


@dataclass
class LoadedModel:
    adapter: ModelKind
    net: torch.nn.Module
    cfg: Config
    checkpoint: Path
    run_id: str | None
    epoch: int
    source: str | None = None  # the MLflow model URI it came from, when it did
    training: dict | None = None  # what it was trained on (data.profile.training_record; spacing_mm always set)

    @property
    def kind(self) -> str:
        return self.adapter.kind



def is_model_uri(source: str | Path) -> bool:
    """An MLflow model URI rather than a file path."""
    return str(source).startswith(("models:/", "runs:/"))


def check_overrides(sample_steps: int | None = None, ensemble: int | None = None, overlap: float | None = None,
                    postprocess: dict[str, float] | None = None) -> None:
    """``ConfigError`` naming the flag for a sampler, sliding-window or post-processing override out of range."""
    post = [(f"--{k.replace('_', '-')}", v, lambda v: v >= 0, ">= 0") for k, v in (postprocess or {}).items()]
    for flag, value, ok, rule in (("--steps", sample_steps, lambda v: v >= 1, ">= 1"),
                                  ("--ensemble", ensemble, lambda v: v >= 1, ">= 1"),
                                  ("--overlap", overlap, lambda v: 0 <= v < 1, "in [0, 1)"), *post):
        if value is not None and not ok(value):
            raise ConfigError(flag, f"must be {rule}, got {value}")


def load_model(source: str | Path, device: torch.device | str = "cpu", sample_steps: int | None = None,
               ensemble: int | None = None, seed: int | None = None, overlap: float | None = None,
               fetched: Path | None = None, postprocess: dict[str, float] | None = None) -> LoadedModel:
    """Rebuild a trained model from a checkpoint file; ``source`` may be an MLflow model URI when ``fetched`` is
    the checkpoint it names (``stages.load_model`` fetches it: inference knows nothing of MLflow).

    ``sample_steps`` / ``ensemble`` / ``seed`` override the sampler of the training config, ``overlap`` its
    sliding-window overlap (``infer.overlap``), ``postprocess`` its post-processing (``{"min_lesion_mm3": ...,
    "min_enhancing_mm3": ...}``, ``infer.*``; None values keep the checkpoint's).
    """
    postprocess = {k: v for k, v in (postprocess or {}).items() if v is not None}
    check_overrides(sample_steps, ensemble, overlap, postprocess)
    uri = str(source) if is_model_uri(source) else None
    if uri is not None and fetched is None:
        raise DataError(uri, "an MLflow model URI: load it with medseg_diff.stages.load_model, which fetches its "
                             "checkpoint from the tracking server")
    path = Path(fetched) if uri is not None else Path(source)
    ckpt = load_checkpoint(path, map_location="cpu")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "inference_model" not in ckpt:
        raise DataError(path, "not a medseg-diff checkpoint (no config / weights inside)")
    raw, weights = ckpt["config"], ckpt["inference_model"]
    overrides = {k: v for k, v in (("sample_steps", sample_steps), ("ensemble", ensemble)) if v is not None}
    if overrides:
        raw = {**raw, "diffusion": {**raw["diffusion"], **overrides}}
    if seed is not None:
        raw = {**raw, "experiment": {**raw["experiment"], "seed": seed}}
    if overlap is not None:
        raw = {**raw, "infer": {**raw["infer"], "overlap": overlap}}
    if postprocess:
        raw = {**raw, "infer": {**raw["infer"], **postprocess}}
    raw = upgrade_config(raw, ckpt.get("format", 1))
    training = trained_on(ckpt, raw, path)
    if raw.get("data", {}).get("spacing") is None:  # trained at the data's own voxel size: predict at that size
        raw = {**raw, "data": {**raw["data"], "spacing": training["spacing_mm"]}}
    cfg = config_from_dict(raw, source=path)
    kind = cfg.model.kind
    if ckpt.get("model_kind", kind) != kind:
        raise DataError(path, f"the checkpoint says model_kind '{ckpt.get('model_kind')}' but its config says '{kind}'")
    # formats 1-2 have no network spec: it follows from their (upgraded) config
    spec = ckpt.get("network")
    if spec is not None:
        expected = kind_class(kind).network_spec(cfg)["name"]
        if not isinstance(spec, dict) or spec.get("name") != expected:
            name = spec.get("name") if isinstance(spec, dict) else spec
            raise DataError(path, f"the checkpoint's network {name!r} is not the {expected} of a '{kind}' model")
    adapter = build_kind(cfg, build_network(spec, path) if spec is not None else None)
    try:
        adapter.net.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise DataError(path, f"the weights do not fit the network the checkpoint describes ({first[0] if first else err})"
                        ) from None
    net = adapter.net.to(torch.device(device) if isinstance(device, str) else device).eval()
    return LoadedModel(adapter, net, cfg, path, ckpt.get("run_id"), int(ckpt.get("epoch", 0)), source=uri,
                       training=training)


def trained_on(ckpt: dict, raw: dict, path: Path) -> dict:
    """What the model was trained on (``data.profile.training_record``) with ``spacing_mm`` always set: from the
    checkpoint (format 4), else measured from its training manifest. A checkpoint that records neither, trained at
    its data's own voxel size, is refused by name: it would predict at whatever scale an input happens to have."""
    record = ckpt.get("training_data") if isinstance(ckpt.get("training_data"), dict) else None
    spacing = ckpt.get("spacing_mm") or (record or {}).get("spacing_mm") or raw.get("data", {}).get("spacing")
    if record is not None and spacing:
        return {**record, "spacing_mm": [float(v) for v in spacing]}
    data = raw.get("data", {})
    try:
        manifest = load_manifest(data["manifest"], root=data.get("root"))
        train, val, _ = manifest.split(int(data.get("fold", 0)))
        if data.get("max_val_cases") is not None:
            val = val[: int(data["max_val_cases"])]
        measured = training_record(manifest, train, val, data.get("spacing"))
        if not measured["spacing_mm"]:
            native_spacing(manifest, train + val)  # refuses mixed voxel sizes by name
    except (MedsegError, OSError, KeyError, TypeError, ValueError) as err:
        if spacing:  # an explicit data.spacing: all that prediction needs
            return {"spacing_mm": [float(v) for v in spacing]}
        raise DataError(path, f"records no voxel size (a checkpoint older than format 4, trained with data.spacing "
                              f"null) and its training manifest {data.get('manifest')} cannot be read here ({err}); "
                              f"set the voxel size of its training data, in mm: python -m medseg_diff.checkpoint "
                              f"--set-spacing {path} X Y Z") from None
    return measured if not spacing else {**measured, "spacing_mm": [float(v) for v in spacing]}
