"""The data stages: synthetic phantoms with their manifest, a manifest of a data set folder, and its check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medseg_diff.data.check import check_manifest
from medseg_diff.data.manifest import Manifest, build_manifest, load_manifest, write_manifest
from medseg_diff.data.synth import synthesize


def synthesize_dataset(out: Path, cases: int, spacing: float, seed: int, layout: str, workers: int,
                       manifest: Path | None, folds: int, test_fraction: float,
                       progress: bool = True, timepoints: int = 1) -> tuple[list[Path], Path]:
    """Phantoms into ``out`` (``cases`` patients, ``timepoints`` scans each) and their manifest (default
    ``out/manifest.json``, split per patient): ``(case folders, manifest)``."""
    folders = synthesize(out, cases=cases, spacing=spacing, seed=seed, layout=layout, workers=workers,
                         progress=progress, timepoints=timepoints)
    built = build_manifest(out, name=out.name, convention=layout, folds=folds, test_fraction=test_fraction,
                           seed=seed)
    return folders, write_manifest(built, manifest or out / "manifest.json")


def dataset_manifest(root: Path, out: Path, name: str | None, convention: str | None, folds: int,
                     test_fraction: float, seed: int, follow_symlinks: bool = False,
                     patients: Path | None = None) -> tuple[Manifest, Path]:
    """The manifest of a data set folder, written to ``out``: ``(manifest, its path)``; ``patients``: a mapping file
    (case id -> patient id) that overrides the patients the case ids imply."""
    manifest = build_manifest(root, name=name, convention=convention, folds=folds, test_fraction=test_fraction,
                              seed=seed, follow_symlinks=follow_symlinks, patients=patients)
    return manifest, write_manifest(manifest, out)


def check_dataset(path: Path, root: Path | None, continue_on_error: bool, verify_checksums: bool,
                  on_case: Callable | None = None) -> tuple[Manifest, list]:
    """``data.check.check_manifest`` of the manifest at ``path``: ``(manifest, problems)``."""
    manifest = load_manifest(path, root=root)
    problems = check_manifest(manifest, continue_on_error=continue_on_error, verify_checksums=verify_checksums,
                              on_case=on_case)
    return manifest, problems
