"""Data-set manifests: what files a data set holds, their checksums, label convention and splits.

Schema (version 1) is documented in ``data_manifests/README.md``. Paths in a manifest are relative
to its ``root`` and may not escape it. ``root`` is stored relative to the manifest file when the
manifest sits on the same file system tree, so a data folder and its manifest can move together.

A manifest is unambiguous: case ids are unique (also ignoring letter case) and usable as file names
(``CASE_ID_PATTERN``, the rule of the prediction/export writers); one case's files come from one folder;
files and folders that are symlinks leaving the root are refused unless built with ``follow_symlinks``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from medseg_diff.data.conventions import MODALITIES, get_convention
from medseg_diff.data.discovery import CaseFiles, discover
from medseg_diff.errors import ManifestError

SCHEMA_VERSION = 1
_CHUNK = 1 << 20
#: Case ids the writers can use as file / folder names (``predictions.types.check_name`` applies the same rule):
#: ASCII letters, digits, ``. _ + -``, starting with a letter or digit, and no "..".
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
IMAGE_LAYOUTS = ("separate", "4d")


def case_id_problem(case_id: object) -> str | None:
    """Why ``case_id`` cannot name a case (its prediction folder and files), or None when it can."""
    if not isinstance(case_id, str) or not CASE_ID_PATTERN.match(case_id) or ".." in case_id:
        return (f"case id {case_id!r} cannot be used as a file name (ASCII letters, digits, . _ + - only, starting "
                "with a letter or digit; no spaces, accents or path separators)")
    return None


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
    follow_symlinks: bool = False  # built with symlinks leaving the root allowed (check accepts them then)

    def path_of(self, relative: str) -> Path:
        """Absolute path of a root-relative manifest path (already checked not to escape the root)."""
        return self.root / relative

    @property
    def image_keys(self) -> tuple[str, ...]:
        """The ``images`` keys every case needs: ``("4d",)`` for MSD, else the modalities in channel order."""
        return ("4d",) if self.image_layout == "4d" else tuple(self.modalities)

    def missing_images(self, case: ManifestCase) -> list[str]:
        """The keys of ``image_keys`` that ``case.images`` lacks (``predict``/``train`` need every one)."""
        return [k for k in self.image_keys if k not in case.images]

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
    """SHA-256 of a file, or of a DICOM folder (its files' names and bytes, in sorted order), or of the whole
    series a DICOM file stands for (a study's case entries are one file of each series: ``data.io``)."""
    from medseg_diff.data.io import dicom_series_files, is_dicom_file

    digest = hashlib.sha256()
    series = not path.is_dir() and is_dicom_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif series:
        files = sorted(dicom_series_files(path))
    else:
        files = [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode())
        elif series:
            digest.update(str(f.relative_to(path.parent)).encode())
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
    follow_symlinks: bool = False,
) -> Manifest:
    """Discover the cases under ``root``, checksum every file and assign splits.

    Labelled cases are shuffled with ``seed``; ``test_fraction`` of them are held out as "test", the
    rest are dealt round-robin into ``folds`` folds (``folds`` < 2: no folds). Cases without a label
    are "unlabelled" (prediction only).

    Refused (``DataError``/``ManifestError`` naming the folder): a case id in two folders, a case id that
    cannot be a file name (``case_id_problem``), ids equal but for letter case, a case missing a modality,
    and symlinks resolving outside ``root`` unless ``follow_symlinks`` (recorded in the manifest).
    """
    root = Path(root).resolve()
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    conv, found = discover(root, convention, follow_symlinks=follow_symlinks)
    _check_ids([(c.case_id, c.folder or root) for c in found], None)
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
        follow_symlinks=follow_symlinks,
    )


def _check_ids(ids: list[tuple[str, Path | str | None]], source: Path | None) -> None:
    """Refuse unusable, duplicate and case-insensitively equal case ids; ``ids``: (id, where it comes from)."""
    seen: dict[str, tuple[str, Path | str | None]] = {}
    for case_id, where in ids:
        problem = case_id_problem(case_id)
        if problem:
            raise ManifestError(where, problem)
        key = case_id.lower()
        if key in seen:
            other, other_where = seen[key]
            what = "duplicate case id" if other == case_id else f"case ids {other!r} and {case_id!r} differ only in " \
                                                                 "letter case (one folder on macOS/Windows)"
            raise ManifestError(source or where, f"{what}{'' if source else f' (also {other_where})'}", case=case_id)
        seen[key] = (case_id, where)


def _manifest_case(case: CaseFiles, root: Path) -> ManifestCase:
    if case.missing:
        present = ", ".join(case.images) or "none"
        raise ManifestError(
            case.folder or root,
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
    if path.is_dir():
        raise ManifestError(path, "is a folder; give the manifest's file name (e.g. manifest.json)")
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
        "follow_symlinks": manifest.follow_symlinks,
        "cases": [asdict(c) for c in manifest.cases],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:  # the previous manifest stays; no temporary is left
        tmp.unlink(missing_ok=True)
        raise ManifestError(path, f"cannot be written ({err.strerror or err})") from None
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
            follow_symlinks=bool(doc.get("follow_symlinks", False)),
        )
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ManifestError(path, f"malformed manifest ({type(err).__name__}: {err})") from err
    if manifest.image_layout not in IMAGE_LAYOUTS:
        raise ManifestError(path, f"image_layout {manifest.image_layout!r} is not one of {', '.join(IMAGE_LAYOUTS)}")
    if manifest.modalities != MODALITIES:
        raise ManifestError(path, f"modalities must be {list(MODALITIES)} (the channel order of every image "
                                  f"tensor), got {list(manifest.modalities)}")
    _check_ids([(c.id, path) for c in manifest.cases], path)
    return manifest


def _load_case(doc: dict, root: Path, source: Path) -> ManifestCase:
    images = {k: safe_relative(v, root, source) for k, v in doc["images"].items()}
    label = safe_relative(doc["label"], root, source) if doc.get("label") else None
    sha = {safe_relative(k, root, source): str(v) for k, v in doc.get("sha256", {}).items()}
    return ManifestCase(
        id=str(doc["id"]), images=images, label=label, sha256=sha,
        fold=doc.get("fold"), subset=doc.get("subset", "train" if label else "unlabelled"),
    )
