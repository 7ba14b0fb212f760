"""Data-set manifests: what files a data set holds, their checksums, label convention and splits.

Schema (version 1) is documented in ``data_manifests/README.md``. Paths in a manifest are relative
to its ``root`` and may not escape it. ``root`` is stored relative to the manifest file when the
manifest sits on the same file system tree, so a data folder and its manifest can move together.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from medseg_diff.data.conventions import MODALITIES, get_convention
from medseg_diff.data.discovery import CaseFiles, discover
from medseg_diff.errors import ManifestError

SCHEMA_VERSION = 1
_CHUNK = 1 << 20


@dataclass
class ManifestCase:
    """One case: ``images`` maps modality (or "4d" for MSD) to a root-relative POSIX path."""

    id: str
    images: dict[str, str]
    label: str | None
    sha256: dict[str, str]
    fold: int | None = None  # cross-validation fold, None for test / unlabelled cases
    subset: str = "train"  # "train" (in the folds), "test" (held out) or "unlabelled"


@dataclass
class Manifest:
    name: str
    convention: str
    root: Path  # absolute, resolved when loaded
    cases: list[ManifestCase]
    modalities: tuple[str, ...] = MODALITIES
    image_layout: str = "separate"  # "separate" (a file per modality) or "4d" (MSD)
    folds: int = 0
    seed: int = 0
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    source: Path | None = None  # the JSON file this manifest was loaded from

    def path_of(self, relative: str) -> Path:
        """Absolute path of a root-relative manifest path (already checked not to escape the root)."""
        return self.root / relative

    def split(self, fold: int = 0) -> tuple[list[ManifestCase], list[ManifestCase], list[ManifestCase]]:
        """``(train, val, test)`` for cross-validation ``fold``: val = that fold, train = the other folds."""
        labelled = [c for c in self.cases if c.subset == "train"]
        if self.folds < 2:
            return labelled, [], [c for c in self.cases if c.subset == "test"]
        if not 0 <= fold < self.folds:
            raise ManifestError(self.source, f"fold {fold} out of range 0..{self.folds - 1}")
        train = [c for c in labelled if c.fold != fold]
        val = [c for c in labelled if c.fold == fold]
        return train, val, [c for c in self.cases if c.subset == "test"]

    def content_hash(self) -> str:
        """SHA-256 over the sorted (case, subset, fold, path, checksum) entries: identifies the data **and its
        split** (moving a test case into training changes it), not the JSON formatting."""
        digest = hashlib.sha256()
        for case in sorted(self.cases, key=lambda c: c.id):
            for rel, sha in sorted(case.sha256.items()):
                digest.update(f"{case.id}\t{case.subset}\t{case.fold}\t{rel}\t{sha}\n".encode())
        return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, or of a DICOM folder (its files' names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def safe_relative(path: str, root: Path, source: Path | None = None) -> str:
    """Validate a manifest path: relative, POSIX, and not escaping ``root``. Returns it normalised."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or (len(path) > 1 and path[1] == ":"):
        raise ManifestError(source, f"path '{path}' is absolute; manifest paths must be relative to the root {root}")
    parts = []
    for part in pure.parts:
        if part == "..":
            if not parts:
                raise ManifestError(source, f"path '{path}' escapes the data root {root}")
            parts.pop()
        elif part != ".":
            parts.append(part)
    if not parts:
        raise ManifestError(source, f"path '{path}' is empty")
    return "/".join(parts)


def build_manifest(
    root: str | Path,
    name: str | None = None,
    convention: str | None = None,
    folds: int = 5,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> Manifest:
    """Discover the cases under ``root``, checksum every file and assign splits.

    Labelled cases are shuffled with ``seed``; ``test_fraction`` of them are held out as "test", the
    rest are dealt round-robin into ``folds`` folds (``folds`` < 2: no folds). Cases without a label
    are "unlabelled" (prediction only).
    """
    root = Path(root).resolve()
    conv, found = discover(root, convention)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    cases = [_manifest_case(c, root) for c in found]
    _assign_splits(cases, folds, test_fraction, seed)
    return Manifest(
        name=name or root.name,
        convention=conv.name,
        root=root,
        cases=cases,
        image_layout="4d" if conv.name == "msd" else "separate",
        folds=folds if folds >= 2 else 0,
        seed=seed,
    )


def _manifest_case(case: CaseFiles, root: Path) -> ManifestCase:
    if case.missing:
        present = ", ".join(case.images) or "none"
        raise ManifestError(
            next(iter(case.images.values()), root).parent,
            f"missing modality {', '.join(case.missing)} (found: {present})",
            case=case.case_id,
        )
    rel = {key: Path(os.path.relpath(path, root)).as_posix() for key, path in case.images.items()}
    label = Path(os.path.relpath(case.label, root)).as_posix() if case.label else None
    files = list(rel.values()) + ([label] if label else [])
    return ManifestCase(
        id=case.case_id,
        images=rel,
        label=label,
        sha256={f: sha256_file(root / f) for f in files},
        subset="train" if label else "unlabelled",
    )


def _assign_splits(cases: list[ManifestCase], folds: int, test_fraction: float, seed: int) -> None:
    labelled = sorted((c for c in cases if c.label), key=lambda c: c.id)
    random.Random(seed).shuffle(labelled)
    n_test = int(round(test_fraction * len(labelled)))
    for case in labelled[:n_test]:
        case.subset, case.fold = "test", None
    for i, case in enumerate(labelled[n_test:]):
        case.subset, case.fold = "train", (i % folds if folds >= 2 else None)


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write ``manifest`` as JSON (atomically); ``root`` is stored relative to the file when possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        root = Path(os.path.relpath(manifest.root, path.parent.resolve())).as_posix()
    except ValueError:  # different drives on Windows
        root = manifest.root.as_posix()
    doc = {
        "schema_version": SCHEMA_VERSION,
        "name": manifest.name,
        "convention": manifest.convention,
        "modalities": list(manifest.modalities),
        "image_layout": manifest.image_layout,
        "root": root,
        "created": manifest.created,
        "splits": {"folds": manifest.folds, "seed": manifest.seed},
        "cases": [asdict(c) for c in manifest.cases],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Read and validate a manifest JSON. ``root`` overrides the stored data root."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(path, "manifest not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(path, f"not a readable JSON manifest ({err})") from err
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(path, f"unsupported manifest (schema_version must be {SCHEMA_VERSION})")
    try:
        get_convention(doc["convention"])
        base = Path(root) if root is not None else Path(doc["root"])
        base = (base if base.is_absolute() else path.parent / base).resolve()
        cases = [_load_case(c, base, path) for c in doc["cases"]]
        splits = doc.get("splits", {})
        manifest = Manifest(
            name=str(doc["name"]),
            convention=doc["convention"],
            root=base,
            cases=cases,
            modalities=tuple(doc.get("modalities", MODALITIES)),
            image_layout=doc.get("image_layout", "separate"),
            folds=int(splits.get("folds", 0)),
            seed=int(splits.get("seed", 0)),
            created=str(doc.get("created", "")),
            source=path,
        )
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise ManifestError(path, f"malformed manifest ({type(err).__name__}: {err})") from err
    ids = [c.id for c in manifest.cases]
    if len(set(ids)) != len(ids):
        raise ManifestError(path, "duplicate case ids")
    return manifest


def _load_case(doc: dict, root: Path, source: Path) -> ManifestCase:
    images = {k: safe_relative(v, root, source) for k, v in doc["images"].items()}
    label = safe_relative(doc["label"], root, source) if doc.get("label") else None
    sha = {safe_relative(k, root, source): str(v) for k, v in doc.get("sha256", {}).items()}
    return ManifestCase(
        id=str(doc["id"]), images=images, label=label, sha256=sha,
        fold=doc.get("fold"), subset=doc.get("subset", "train" if label else "unlabelled"),
    )
