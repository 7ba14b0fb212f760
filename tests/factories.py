"""Test factories: tiny BraTS-like cases written to tmp dirs, and the real cases in ../shared."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_diff.data.conventions import BRATS2021, BRATS2023, MSD, MSD_CHANNEL_ORDER, MODALITIES, LabelConvention

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
LPS_AFFINE = np.diag([-2.0, -2.0, 2.0, 1.0]) + np.array([[0, 0, 0, 30], [0, 0, 0, 30], [0, 0, 0, -20], [0, 0, 0, 0]])
RAS_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0]) + np.array([[0, 0, 0, -30], [0, 0, 0, -30], [0, 0, 0, -20], [0, 0, 0, 0]])


def tiny_label(shape=(16, 16, 16), convention: LabelConvention = BRATS2021, seed: int = 0) -> np.ndarray:
    """Nested spheres: edema shell, core, enhancing rim — every label of the convention present."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array(shape)[:, None, None, None] / 2 + np.random.default_rng(seed).uniform(-1, 1, 3)[:, None, None, None]
    r = np.sqrt(((grid - centre) ** 2).sum(0))
    s = min(shape) / 16
    label = np.zeros(shape, np.uint8)
    label[r < 6 * s] = convention.edema
    label[r < 4 * s] = convention.enhancing
    label[r < 2.5 * s] = convention.core
    return label


def tiny_images(label: np.ndarray, convention: LabelConvention, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = label.shape
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    brain = np.sqrt(((grid - np.array(shape)[:, None, None, None] / 2) ** 2).sum(0)) < min(shape) * 0.48
    out = {}
    for i, m in enumerate(MODALITIES):
        img = (100 + 20 * i) * brain + 40.0 * (label > 0) * (i + 1) + rng.normal(0, 3, shape) * brain
        out[m] = np.where(brain | (label > 0), img, 0).astype(np.float32)
    return out


def save(array: np.ndarray, path: Path, affine=LPS_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_case(root: Path, case_id: str, convention: LabelConvention = BRATS2021, shape=(16, 16, 16),
               affine=LPS_AFFINE, label: bool = True, seed: int = 0, ext: str = ".nii.gz") -> Path:
    """Write one tiny case in the convention's layout; returns the case folder (MSD: the root)."""
    lab = tiny_label(shape, convention, seed)
    images = tiny_images(lab, convention, seed)
    if convention.name == "msd":
        stacked = np.stack([images[m] for m in MSD_CHANNEL_ORDER], axis=-1)
        save(stacked, root / "imagesTr" / f"{case_id}.nii.gz", affine)
        if label:
            save(lab, root / "labelsTr" / f"{case_id}.nii.gz", affine)
        return root
    folder = root / case_id
    sep = convention.separator
    for m, suffix in zip(MODALITIES, convention.modality_suffixes):
        save(images[m], folder / f"{case_id}{sep}{suffix}{ext}", affine)
    if label:
        save(lab, folder / f"{case_id}{sep}{convention.seg_suffix}{ext}", affine)
    return folder


__all__ = ["BRATS2021", "BRATS2023", "MSD", "write_case", "tiny_label", "tiny_images", "save"]


def tiny_config(manifest, output_dir, kind="diffusion", tracking_uri=None, **sections):
    """A validated config for a seconds-long CPU run on 16³ crops; ``sections`` override per section."""
    from medseg_diff.config import config_from_dict

    raw = {
        "experiment": {"output_dir": str(output_dir), "seed": 0},
        "data": {"manifest": str(manifest), "spacing": None, "roi_size": [16, 16, 16], "samples_per_volume": 1,
                 "batch_size": 2, "cache": "memory"},
        "model": {"kind": kind,
                  "denoiser": {"channels": [8, 16, 32], "linear_attention_levels": [0, 1], "patch_size": 2,
                               "cross_attention_levels": [2], "heads": 2, "dim_head": 8, "norm_groups": 4},
                  "unet": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}},
        "diffusion": {"sample_steps": 2, "ensemble": 2, "val_sample_steps": 1, "val_ensemble": 1},
        "train": {"epochs": 2, "steps_per_epoch": 2, "lr": 1e-3, "warmup_epochs": 0, "val_every": 1,
                  "ema_decay": 0.9, "progress": False},
        "infer": {"sw_batch_size": 2, "overlap": 0.25},
        "tracking": {"enabled": tracking_uri is not None, "uri": tracking_uri},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return config_from_dict(raw)


def run_cli(capsys, *args) -> tuple[int, str]:
    """``medseg-diff ARGS`` as a user runs it: its exit status and everything it printed (stderr, then stdout),
    asserting that no traceback reached the user."""
    from medseg_diff.cli import main

    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out, captured.err
    return rc, captured.err + captured.out


def dead_pid() -> int:
    """The pid of a process that has already ended: the owner of a killed run's leftovers."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
