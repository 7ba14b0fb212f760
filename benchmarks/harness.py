"""What the quality benchmarks share (``bench_ablation.py``, ``study.py``): phantoms, training runs that are reused
when finished, and scoring a prediction as ``medseg-diff evaluate`` scores it.

* :func:`phantom_manifest` -- synthesise phantoms with ``data.synth.synthesize`` and write their manifest, unless
  it exists; ``held_out`` cases go to the test subset (``build_manifest``'s ``test_fraction`` = held_out / cases).
* :func:`run_config` -- ``configs/demo_cpu.yaml`` (or another) with ``--set`` overrides, trained into ``run_dir``
  without MLflow.
* :func:`train_or_reuse` -- a finished run (``best.pt`` present, ``last.pt`` at ``train.epochs``, the same config)
  is reused; an unfinished one resumes (``training.run.train``); a finished run of another config is refused.
  The training wall time is kept in ``RUN_DIR/bench_train.json`` so that a reused run still reports it.
* :func:`scored_rows` -- per-case, per-region rows of one ``CasePrediction``: ``evaluation.run.score_case``
  (global and lesion-wise metrics, entropy AUROC and ECE), as ``evaluate`` writes them to ``per_case.csv``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from medseg_diff.checkpoint import load_checkpoint, upgrade_config  # noqa: E402
from medseg_diff.config import Config, config_from_dict, load_config  # noqa: E402
from medseg_diff.data.conventions import LabelConvention  # noqa: E402
from medseg_diff.data.manifest import build_manifest, write_manifest  # noqa: E402
from medseg_diff.data.synth import synthesize  # noqa: E402
from medseg_diff.evaluation.metrics import metric_rows  # noqa: E402
from medseg_diff.evaluation.run import score_case  # noqa: E402
from medseg_diff.evaluation.sources import ScoredInputs  # noqa: E402

DEMO_CONFIG = ROOT / "configs" / "demo_cpu.yaml"
TRAIN_RECORD = "bench_train.json"
#: config keys that do not change what a run trains (where it writes, what it logs, the manifest's path)
_NOT_TRAINING = {"experiment": ("output_dir",), "data": ("manifest", "root"), "train": ("progress", "device"),
                 "tracking": None}


def phantom_manifest(data_dir: Path, cases: int, held_out: int, spacing: float = 3.0, seed: int = 0,
                     name: str = "synthetic-brats-bench") -> Path:
    """``data_dir/manifest.json`` of ``cases`` phantoms at ``spacing`` mm, ``held_out`` of them in the test subset
    (5 folds over the rest, fold 0 validates, as in the demo); synthesised only if the manifest does not exist."""
    manifest = data_dir / "manifest.json"
    if not manifest.exists():
        if not 0 < held_out < cases:
            raise ValueError(f"held_out must be in 1..{cases - 1}, got {held_out}")
        synthesize(data_dir, cases=cases, spacing=spacing, seed=seed, layout="brats2021", workers=1)
        write_manifest(build_manifest(data_dir, name=name, convention="brats2021", folds=5,
                                      test_fraction=held_out / cases, seed=seed), manifest)
    return manifest


def run_config(manifest: Path, run_dir: Path, overrides: list[str], config: Path = DEMO_CONFIG) -> Config:
    """``config`` with ``overrides``, training into ``run_dir`` on ``manifest`` without MLflow or progress bars."""
    return load_config(config, [*overrides, f"data.manifest={manifest}", f"experiment.output_dir={run_dir}",
                                "tracking.enabled=false", "train.progress=false"])


@dataclass
class TrainedRun:
    checkpoint: Path  # best.pt
    seconds: float  # training wall time (NaN for a reused run that has no record of it)
    reused: bool


def train_or_reuse(cfg: Config) -> TrainedRun:
    """Train ``cfg`` into ``experiment.output_dir`` unless a finished run of the same config is there."""
    from medseg_diff.training.run import train  # training modules only when something is trained

    run_dir = Path(cfg.experiment.output_dir)
    record = run_dir / TRAIN_RECORD
    if finished_run(cfg):
        seconds = json.loads(record.read_text())["seconds"] if record.exists() else float("nan")
        return TrainedRun(run_dir / "best.pt", seconds, reused=True)
    resumed = (run_dir / "last.pt").exists()
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"seconds": seconds, "resumed": resumed}), encoding="utf-8")
    return TrainedRun(run_dir / "best.pt", seconds, reused=False)


def finished_run(cfg: Config) -> bool:
    """``best.pt`` exists and ``last.pt`` reached ``train.epochs`` with this config. A run of another config
    (changed model, budget, data or a newer model version's defaults) raises ``RuntimeError``: delete its folder."""
    run_dir = Path(cfg.experiment.output_dir)
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    if not last.exists():
        return False
    ckpt = load_checkpoint(last, map_location="cpu")
    saved = config_from_dict(upgrade_config(ckpt["config"], ckpt.get("format", 1))).to_dict()
    differ = _differences(_training_part(saved), _training_part(cfg.to_dict()))
    if differ:
        raise RuntimeError(f"{run_dir} holds a run of another config ({'; '.join(differ[:4])}); delete the folder "
                           "to retrain it, or use another --out")
    return best.exists() and int(ckpt.get("epoch", 0)) >= cfg.train.epochs


def _training_part(raw: dict) -> dict:
    """The settings that shape the trained weights: no sampler or tracking settings, and of ``model``, ``loss`` and
    ``diffusion`` only what the run's own model kind uses (a U-Net run is not stale when the diffusion defaults move)."""
    out = {}
    kind = raw.get("model", {}).get("kind")
    for section, values in raw.items():
        skip = _NOT_TRAINING.get(section, ())
        if skip is None or (section == "diffusion" and kind != "diffusion"):
            continue
        out[section] = {k: v for k, v in values.items() if k not in skip} if isinstance(values, dict) else values
    if kind is not None:
        own = {"diffusion": "denoiser"}.get(kind, kind)
        out["model"] = {k: v for k, v in out.get("model", {}).items() if k in ("kind", own)}
        if kind != "diffusion":
            out["loss"] = {k: v for k, v in out.get("loss", {}).items() if k in ("dice", "bce")}
    return out


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], key)
        elif a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{key}: {a.get(k, '<absent>')!r} there, {b.get(k, '<absent>')!r} here")
    return out


def scored_rows(label: str, pred, conv: LabelConvention) -> list[dict]:
    """Rows ``{case, model=label, region, dice, ..., uncertainty_auroc, ece, seconds}`` of one ``CasePrediction``
    (``inference.case.predict_case``), scored by ``evaluation.run.score_case`` on the original grid."""
    inputs = ScoredInputs(pred.case_id, pred.labels, pred.ground_truth, pred.spacing, Path(), probs=pred.probs,
                          uncertainty=pred.entropy, seconds=pred.seconds, peak_memory_mb=pred.peak_memory_mb)
    result, extra, _ = score_case(label, inputs, conv)  # global, lesion-wise, AUROC and ECE
    rows = metric_rows([result])
    for row in rows:
        row.update(extra[row["region"]])
    return rows
