"""Data-set manifests: what files a data set holds, their checksums, label convention and splits.

Schema (version 1) is documented in ``data_manifests/README.md``. Paths in a manifest are relative
to its ``root`` and may not escape it. ``root`` is stored relative to the manifest file when the
manifest sits on the same file system tree, so a data folder and its manifest can move together.

A manifest is unambiguous: case ids are unique (also ignoring letter case) and usable as file names
(``CASE_ID_PATTERN``, at most ``MAX_CASE_ID_LENGTH`` characters: the rule of the prediction/export writers); one
case's files come from one folder; files and folders that are symlinks leaving the root are refused unless built
with ``follow_symlinks``. One case is one patient (``identity_problems``): no file of a case lies in another case's
folder or is another case's file, no file is two modalities, and no two images have the same SHA-256. A loaded
manifest is validated as data: every key's type and value, named by its key path (``cases[2].subset``).

A patient may have several cases (``ManifestCase.patient``: the timepoints of a BraTS 2023+ id, or a mapping file's
``--patients``); splits are per patient (``data.patients.grouped_splits``), and a manifest in which one patient is
in two subsets or folds is refused when loaded (``split_problems``). A manifest without ``patient`` keys (written
before they existed) loads with the convention's patient of each case id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from medseg_diff.data.conventions import MODALITIES, get_convention
from medseg_diff.data.discovery import (CASE_ID_PATTERN, MAX_CASE_ID_LENGTH, CaseFiles, case_id_problem, discover,
                                        hash_into, one_patient_problems, patient_of)
from medseg_diff.data.patients import grouped_splits, patient_id_problem, read_patient_map, split_leaks
from medseg_diff.errors import ManifestError

__all__ = ["CASE_ID_PATTERN", "MAX_CASE_ID_LENGTH", "Manifest", "ManifestCase", "build_manifest", "case_id_problem",
           "duplicate_images", "identity_problems", "load_manifest", "safe_relative", "sha256_file", "split_problems",
           "write_manifest"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
IMAGE_LAYOUTS = ("separate", "4d")
SUBSETS = ("train", "test", "unlabelled")


@dataclass
class ManifestCase:
    """One case: ``images`` maps modality (or "4d" for MSD) to a root-relative POSIX path."""

    id: str
    images: dict[str, str]
    label: str | None
    sha256: dict[str, str]
    fold: int | None = None  # cross-validation fold, None for test / unlabelled cases
    subset: str = "train"  # "train" (in the folds), "test" (held out) or "unlabelled"
    patient: str | None = None  # the patient whose scan this is; None: the case id (a patient with one case)

    def __post_init__(self) -> None:
        if self.patient is None:
            self.patient = self.id


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
        split** (moving a test case into training changes it), not the JSON formatting. A case's patient is part of
        it when it is not the one its id implies (the convention's ``patient_id``: the case id, or the id without its
        BraTS 2023 timepoint), so manifests written before patients were recorded keep their hash."""
        conv = get_convention(self.convention)
        digest = hashlib.sha256()
        for case in sorted(self.cases, key=lambda c: c.id):
            patient = "" if case.patient == conv.patient_id(case.id) else f"\tpatient={case.patient}"
            for rel, sha in sorted(case.sha256.items()):
                digest.update(f"{case.id}\t{case.subset}\t{case.fold}\t{rel}\t{sha}{patient}\n".encode())
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
        hash_into(digest, f)
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
    patients: str | Path | None = None,
) -> Manifest:
    """Discover the cases under ``root``, checksum every file and assign splits per patient.

    Each case's patient is ``discovery.patient_of`` (a BraTS 2023+ id without its timepoint, a DICOM PatientID, else
    the case id), or what the mapping file ``patients`` says (``data.patients.read_patient_map``: a CSV
    ``case_id,patient_id`` or a JSON object naming every case; refused naming the file and the line otherwise).
    Labelled patients are shuffled with ``seed``; ``test_fraction`` of the labelled cases are held out as "test",
    whole patients, and the other patients are dealt into ``folds`` folds of balanced case counts (``folds`` < 2: no
    folds): ``data.patients.grouped_splits``. Cases without a label are "unlabelled" (prediction only).

    Refused (``DataError``/``ManifestError`` naming the folder): a case id in two folders, a case id that
    cannot be a file name (``case_id_problem``), ids equal but for letter case, a case missing a modality,
    and symlinks resolving outside ``root`` unless ``follow_symlinks`` (recorded in the manifest); a case that is
    not one patient (``identity_problems``, naming the files): a file in another case's folder, one file for two
    modalities or two cases, two images of one case with the same SHA-256. Images of two cases with the same
    SHA-256 (``duplicate_images``) are logged as warnings naming the pair.
    """
    root = Path(root).resolve()
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    # ids are checked here (ManifestError, also letter-case twins); contents by their SHA-256, computed anyway
    conv, found = discover(root, convention, follow_symlinks=follow_symlinks, check_ids=False, compare_content=False)
    _check_ids([(c.case_id, c.folder or root) for c in found], None)
    mapping = read_patient_map(patients, [c.case_id for c in found]) if patients is not None else {}
    cases = [_manifest_case(c, root, mapping.get(c.case_id) or patient_of(c, conv)) for c in found]
    _assign_splits(cases, folds, test_fraction, seed)
    manifest = Manifest(
        name=name or root.name,
        convention=conv.name,
        root=root,
        cases=cases,
        image_layout="4d" if conv.name == "msd" else "separate",
        folds=folds if folds >= 2 else 0,
        seed=seed,
        follow_symlinks=follow_symlinks,
    )
    for case_id, file, problem in identity_problems(manifest):
        raise ManifestError(file, problem, case=case_id)
    for case_id, file, problem in duplicate_images(manifest):
        log.warning("case %s: %s: warning: %s", case_id, file, problem)
    return manifest


def identity_problems(manifest: Manifest) -> list[tuple[str, str, str]]:
    """``(case id, file, problem)`` for every file that makes a case more than one patient's, from paths and the
    recorded SHA-256 only (no image is read; symlinks are resolved):

    - a file that resolves into another case's folder (layout "separate": a case's folder is where most of its
      files lie, when it is no other case's; MSD's shared ``imagesTr/`` has no owner);
    - one file (after resolving symlinks) given for two keys of a case, or used by two cases;
    - two images of one case with the same SHA-256 (a modality copied over another).

    Each problem is reported against the later file (the case later in the manifest), naming the earlier one.
    """
    resolved = {rel: _resolve(manifest.path_of(rel)) for case in manifest.cases for rel in _entries(case).values()}
    owners = _folder_owners(manifest, resolved) if manifest.image_layout == "separate" else {}
    entries = [(case.id, [(key, manifest.path_of(rel), resolved[rel]) for key, rel in _entries(case).items()])
               for case in manifest.cases]
    problems = [(case_id, str(path), problem)
                for case_id, path, problem in one_patient_problems(entries, owners, manifest.root.resolve())]
    for case in manifest.cases:  # a modality copied over another: equal recorded SHA-256
        first: dict[str, str] = {}
        for key, rel in case.images.items():
            sha = case.sha256.get(rel)
            if not sha:
                continue
            if sha in first and resolved[rel] != resolved[case.images[first[sha]]]:  # the same file: reported above
                problems.append((case.id, str(manifest.path_of(rel)),
                                 f"{key} has the same content as {first[sha]} "
                                 f"({manifest.path_of(case.images[first[sha]])}): identical bytes (equal SHA-256), a "
                                 "modality copied over another; each modality needs its own image"))
            first.setdefault(sha, key)
    return problems


def duplicate_images(manifest: Manifest) -> list[tuple[str, str, str]]:
    """``(case id, file, problem)`` for every image whose recorded SHA-256 is that of an image of an earlier case:
    one patient in two cases, or two patients mixed (a data-set hygiene finding: ``check`` and ``manifest`` warn,
    naming the pair). Label maps are left out: two empty label maps of one grid are the same bytes."""
    first: dict[str, tuple[str, str, Path]] = {}
    found = []
    for case in manifest.cases:
        for key, rel in case.images.items():
            sha = case.sha256.get(rel)
            if not sha:
                continue
            if sha in first and first[sha][0] != case.id:
                other, other_key, other_path = first[sha]
                found.append((case.id, str(manifest.path_of(rel)),
                              f"{key} has the same content as case {other}'s {other_key} ({other_path}): "
                              "identical bytes (equal SHA-256), one patient in two cases or two patients mixed; "
                              "remove the duplicate"))
            first.setdefault(sha, (case.id, key, manifest.path_of(rel)))
    return found


def _resolve(path: Path) -> Path:
    """``path`` with its symlinks resolved; as it is when that fails (a symlink loop: ``check`` names the file)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def _entries(case: ManifestCase) -> dict[str, str]:
    """key (a modality, "4d" or "label") -> root-relative path of every file of ``case``."""
    return {**case.images, **({"label": case.label} if case.label else {})}


def _folder_owners(manifest: Manifest, resolved: dict[str, Path]) -> dict[Path, set[str]]:
    """folder -> the ids of the cases whose folder it is: the (resolved) folder holding most of a case's files
    (none on a tie)."""
    owners: dict[Path, set[str]] = {}
    for case in manifest.cases:
        counts = Counter(resolved[rel].parent for rel in _entries(case).values()).most_common(2)
        if counts and (len(counts) == 1 or counts[0][1] > counts[1][1]):
            owners.setdefault(counts[0][0], set()).add(case.id)
    return owners


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


def _manifest_case(case: CaseFiles, root: Path, patient: str) -> ManifestCase:
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
        patient=patient,
    )


def _assign_splits(cases: list[ManifestCase], folds: int, test_fraction: float, seed: int) -> None:
    """Subset and fold of every labelled case, a patient's cases together (``data.patients.grouped_splits``)."""
    split = grouped_splits([(c.id, c.patient) for c in cases if c.label], folds, test_fraction, seed)
    for case in cases:
        if case.id in split:
            case.subset, case.fold = split[case.id]


def split_problems(manifest: Manifest) -> list[tuple[str, str]]:
    """``(case id, problem)`` for every case whose patient has an earlier case in another subset or fold (a model
    would be validated or tested on a patient it was trained on); unlabelled cases are not part of the rule
    (``data.patients.split_leaks``)."""
    return split_leaks((c.id, c.patient, c.subset, c.fold) for c in manifest.cases)


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
    """Read and validate a manifest JSON. ``root`` overrides the stored data root.

    The JSON is validated as data, each fault named by its key path (``ManifestError``, e.g. ``cases[2].subset:
    'tset' is not one of train, test, unlabelled``): the schema version; every key's type (``cases`` a list of
    objects, ``images`` an object of path strings, ``label`` a path string or null, ``sha256`` an object of strings,
    ``splits.folds`` an integer, ...); ``convention`` known; ``image_layout`` and ``modalities`` the pipeline's;
    ``subset`` one of ``SUBSETS``; ``fold`` an integer in 0..folds-1 for a train case when there are folds, else
    null; paths relative and inside the root; case ids unique and usable as file names; every case one patient
    (``identity_problems`` but across cases: paths and checksums only, no image is read); ``patient`` a usable
    name (absent: the convention's patient of the case id, ``LabelConvention.patient_id``), and no patient in two
    subsets or folds (``split_problems``, naming the patient and both cases).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(path, "manifest not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(path, f"not a readable JSON manifest ({err})") from err
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(path, f"unsupported manifest (schema_version must be {SCHEMA_VERSION})")
    name = _get(doc, "name", (str,), "a string", path)
    convention = _get(doc, "convention", (str,), "a string", path)
    try:
        get_convention(convention)
    except ValueError as err:
        raise ManifestError(path, f"convention: {err}") from None
    stored_root = _get(doc, "root", (str,), "a path string", path) if root is None else None
    modalities = _get(doc, "modalities", (list,), "a list of modality names", path, default=list(MODALITIES))
    image_layout = _get(doc, "image_layout", (str,), "a string", path, default="separate")
    if image_layout not in IMAGE_LAYOUTS:
        raise ManifestError(path, f"image_layout {image_layout!r} is not one of {', '.join(IMAGE_LAYOUTS)}")
    if tuple(modalities) != MODALITIES:
        raise ManifestError(path, f"modalities must be {list(MODALITIES)} (the channel order of every image "
                                  f"tensor), got {list(modalities)}")
    splits = _get(doc, "splits", (dict,), "an object (folds, seed)", path, default={})
    folds = _get(splits, "folds", (int,), "an integer", path, prefix="splits.", default=0)
    if folds < 0:
        raise ManifestError(path, f"splits.folds: must be >= 0, got {folds}")
    seed = _get(splits, "seed", (int,), "an integer", path, prefix="splits.", default=0)
    follow_symlinks = _get(doc, "follow_symlinks", (bool,), "true or false", path, default=False)
    cases_doc = _get(doc, "cases", (list,), "a list of cases", path)
    base = Path(root) if root is not None else Path(stored_root)
    base = (base if base.is_absolute() else path.parent / base).resolve()
    manifest = Manifest(
        name=name,
        convention=convention,
        root=base,
        cases=[_load_case(c, i, base, path, folds, get_convention(convention).patient_id)
               for i, c in enumerate(cases_doc)],
        modalities=tuple(modalities),
        image_layout=image_layout,
        folds=folds,
        seed=seed,
        created=str(doc.get("created", "")),
        source=path,
        follow_symlinks=follow_symlinks,
    )
    _check_ids([(c.id, path) for c in manifest.cases], path)
    for case_id, file, problem in identity_problems(manifest):
        raise ManifestError(path, f"{file}: {problem}", case=case_id)
    for _, problem in split_problems(manifest):
        raise ManifestError(path, problem)
    return manifest


def _load_case(doc: object, index: int, root: Path, source: Path, folds: int,
               patient_of_id: Callable[[str], str]) -> ManifestCase:
    """One entry of ``cases``, validated (every fault named by its key path, e.g. ``cases[2].fold``)."""
    where = f"cases[{index}]"
    if not isinstance(doc, dict):
        raise ManifestError(source, f"{where}: expected an object (a case), got {_got(doc)}")
    case = doc.get("id") if isinstance(doc.get("id"), str) else None  # names the case in the messages below

    def get(key: str, kinds: tuple, what: str, **kwargs):
        return _get(doc, key, kinds, what, source, prefix=f"{where}.", case=case, **kwargs)

    def relative(value: str, key: str) -> str:
        try:
            return safe_relative(value, root, source)
        except ManifestError as err:
            raise ManifestError(source, f"{where}.{key}: {err.problem}", case=case) from None

    case_id = get("id", (str,), "a string")
    images = get("images", (dict,), "an object (modality -> path)")
    for key, value in images.items():
        _expect(value, (str,), "a path string", f"{where}.images.{key}", source, case)
    label = get("label", (str, type(None)), "a path string or null", default=None) or None
    sha256 = get("sha256", (dict,), "an object (path -> SHA-256)", default={})
    for key, value in sha256.items():
        _expect(value, (str,), "a SHA-256 hex string", f"{where}.sha256[{json.dumps(key)}]", source, case)
    subset = get("subset", (str,), "a string", default="train" if label else "unlabelled")
    if subset not in SUBSETS:
        raise ManifestError(source, f"{where}.subset: {subset!r} is not one of {', '.join(SUBSETS)}", case=case)
    fold = get("fold", (int, type(None)), "an integer or null", default=None)
    if subset == "train" and folds >= 2:
        if fold is None or not 0 <= fold < folds:
            raise ManifestError(source, f"{where}.fold: {_got(fold)} is not a fold; a train case needs one of "
                                        f"0..{folds - 1} (splits.folds is {folds})", case=case)
    elif fold is not None:
        why = (f"only train cases are in folds, this is a {subset} case" if subset != "train"
               else f"splits.folds is {folds} (no cross-validation folds)")
        raise ManifestError(source, f"{where}.fold: {fold} given but {why}; use null", case=case)
    patient = get("patient", (str, type(None)), "a patient id string or null", default=None)
    if patient is None:  # written before patients were recorded (or null): the patient its id implies
        patient = patient_of_id(case_id)
    elif patient_id_problem(patient):
        raise ManifestError(source, f"{where}.patient: {patient_id_problem(patient)}", case=case)
    return ManifestCase(
        id=case_id,
        images={k: relative(v, f"images.{k}") for k, v in images.items()},
        label=relative(label, "label") if label else None,
        sha256={relative(k, "sha256"): v for k, v in sha256.items()},
        fold=fold,
        subset=subset,
        patient=patient,
    )


def _get(obj: dict, key: str, kinds: tuple, what: str, source: Path, prefix: str = "", case: str | None = None,
         **default):
    """``obj[key]`` checked to be one of ``kinds`` (``bool`` is no ``int``); a missing key is an error unless a
    ``default`` is given."""
    if key not in obj:
        if "default" in default:
            return default["default"]
        raise ManifestError(source, f"{prefix}{key}: missing (expected {what})", case=case)
    return _expect(obj[key], kinds, what, f"{prefix}{key}", source, case)


def _expect(value, kinds: tuple, what: str, key: str, source: Path, case: str | None = None):
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return value
    raise ManifestError(source, f"{key}: expected {what}, got {_got(value)}", case=case)


def _got(value) -> str:
    """A JSON value as a message names it: its type for an object or a list, else the value."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return repr(value) if isinstance(value, str) else json.dumps(value)
