"""Find the cases of a data set folder and detect its layout / label convention.

Layouts recognised (the convention can always be forced):
- brats2021: ``CASE/CASE_{t1,t1ce,t2,flair}[.nii.gz|.nii|.mha|.nrrd|/ (DICOM)]`` + optional ``CASE_seg``
- brats2023: ``CASE/CASE-{t1n,t1c,t2w,t2f}...`` + optional ``CASE-seg`` (ET = 3)
- msd:       ``imagesTr/NAME.nii.gz`` (4D: FLAIR, T1w, t1gd, T2w) + ``labelsTr/NAME.nii.gz``; also ``imagesTs``
- DICOM studies: the root is a study folder as a scanner / PACS exports it, or holds study folders at any depth
  (``medseg_diff.data.dicom.study``); series are mapped to modalities by a ``SeriesRule`` on their SeriesDescription.
  A case's image entries are the series' reference files (``data.io`` reads a DICOM file as its whole series);
  the case id is ``PATIENT_DATE_HASH``; the convention is brats2021 unless forced (it sets the output labels).
  Tried when the BraTS layouts give no complete case, so a BraTS case folder of DICOM series folders
  (``CASE/CASE_t1/`` ...) is still read by its names.
Case folders may sit up to ``MAX_DEPTH`` levels below the root (e.g. ``root/TrainingData/CASE``).

One case is one patient (``discover`` refuses the rest, naming the files): no file of a case resolves into another
case's folder (a symlink ``C1/C1_t2.nii.gz -> ../C2/C2_t2.nii.gz``), one file is not two modalities of a case or a
file of two cases, and no two images of a case are byte-identical (a modality copied over another). Case ids are
usable as file names (``case_id_problem``).

A patient may have several cases (``patient_of``): the timepoints of a BraTS 2023+ id (the convention's rule), the
studies of one DICOM PatientID; a manifest keeps a patient's cases in one subset and fold.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from medseg_diff.data.conventions import BRATS2021, BRATS2023, MODALITIES, LabelConvention, get_convention
from medseg_diff.data.io import image_suffix, is_image_path
from medseg_diff.errors import DataError
from medseg_diff.data.names import MAX_NAME_LENGTH, SAFE_NAME, name_length_problem

if TYPE_CHECKING:
    from medseg_diff.data.dicom.rules import SeriesRule
    from medseg_diff.data.dicom.study import DicomStudy

MAX_DEPTH = 3
#: Case ids the writers can use as file / folder names (``predictions.types.check_name`` applies the same rule):
#: ASCII letters, digits, ``. _ + -``, starting with a letter or digit, no "..", at most ``MAX_CASE_ID_LENGTH``
#: characters (the writers append suffixes like ``_attention_cross.nii.gz``; a file name holds 255 bytes).
CASE_ID_PATTERN: re.Pattern = SAFE_NAME
MAX_CASE_ID_LENGTH = MAX_NAME_LENGTH
_CHUNK = 1 << 20


def case_id_problem(case_id: object) -> str | None:
    """Why ``case_id`` cannot name a case (its prediction folder and files), or None when it can."""
    if not isinstance(case_id, str) or not CASE_ID_PATTERN.match(case_id) or ".." in case_id:
        return (f"case id {case_id!r} cannot be used as a file name (ASCII letters, digits, . _ + - only, starting "
                "with a letter or digit; no spaces, accents or path separators)")
    return name_length_problem(case_id, "case id")


@dataclass
class CaseFiles:
    """The files of one case, as absolute paths.

    images: canonical modality -> file (brats layouts), or {"4d": file} for MSD
    label:  the segmentation file, or None when the case has none
    folder: where the case's files were found (the case folder; MSD: the image file)
    """

    case_id: str
    images: dict[str, Path]
    label: Path | None = None
    missing: list[str] = field(default_factory=list)
    folder: Path | None = None
    #: why the case cannot be used as found (two folders, two files for one modality, a symlink leaving the
    #: root); ``discover`` raises it
    conflict: DataError | None = None
    #: the DICOM study the case was read from (its series, headers and UIDs for DICOM outputs); None for files
    dicom: DicomStudy | None = None
    #: key (a modality, "4d" or "label") -> the path as found under the root, before an in-root symlink was
    #: resolved (``images``/``label`` hold the target): what messages name
    found: dict[str, Path] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return list(self.images.values()) + ([self.label] if self.label else [])

    def entries(self) -> list[tuple[str, Path]]:
        """``(key, path)`` of every file: the images, then ``("label", label)``."""
        return list(self.images.items()) + ([("label", self.label)] if self.label else [])


def patient_of(case: CaseFiles, convention: LabelConvention) -> str:
    """The patient id of ``case``: a DICOM study's PatientID (made file-name safe, as in its case id
    ``PATIENT_DATE_HASH``; the case id when the study has none), else the convention's rule
    (``LabelConvention.patient_id``: ``BraTS-GLI-00001-001`` -> ``BraTS-GLI-00001``; other ids: the case id)."""
    if case.dicom is not None:
        patient = case.case_id.split("_", 1)[0]  # the PatientID part of PATIENT_DATE_HASH (it holds no "_")
        if not case.dicom.patient_id.strip() or patient == "anonymous":
            return case.case_id  # a study without a PatientID: no evidence that two are one patient
        return patient
    return convention.patient_id(case.case_id)


def discover(root: str | Path, convention: str | None = None, follow_symlinks: bool = False,
             series_rule: SeriesRule | None = None, check_ids: bool = True,
             compare_content: bool = True) -> tuple[LabelConvention, list[CaseFiles]]:
    """``(convention, cases)`` of the data set under ``root``, cases sorted by id.

    ``convention`` forces the layout; otherwise it is detected. A case folder that has some but not all
    modalities is returned with ``missing`` filled in (``check`` reports it); nothing is silently dropped.

    Refused with ``DataError``: a case id found in two folders (e.g. two sites' ``CASE/`` folders: two
    patients' modalities would be mixed), two files for one modality of a case, and symlinks (files or
    folders) that resolve outside ``root`` unless ``follow_symlinks`` (then the path under ``root`` is kept,
    not the target); a case id that cannot be a file name (``case_id_problem``; ``check_ids=False`` leaves it to
    the caller: ``build_manifest``); a file of a case that resolves into another case's folder, one file given for
    two keys of a case or for two cases, and (``compare_content``) two byte-identical images of a case: files of
    equal size are hashed, so a data set of ``.nii.gz`` files is mostly not read (``build_manifest``, which hashes
    every file anyway, compares checksums instead).

    DICOM study folders (see the module's docstring) are read when the BraTS layouts give no complete case;
    ``series_rule`` maps their series to modalities (default ``SeriesRule.default()``). A study whose series
    cannot be mapped (a modality missing or matched twice) is refused listing its series.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "data root is not a folder")
    walk = _Walk(root.resolve(), follow_symlinks)
    if convention is not None:
        conv = get_convention(convention)
        cases = _msd_cases(walk) if conv.name == "msd" else _brats_cases(walk, conv)
        if conv.name != "msd" and not any(not c.missing for c in cases):
            cases = _dicom_cases(walk, series_rule) or cases
    else:
        conv, cases = _detect(walk, series_rule)
    if not cases:
        raise DataError(root, f"no {conv.name} cases found (expected {_layout_hint(conv)})")
    for case in cases:
        if case.conflict is not None:
            raise case.conflict
    if check_ids:
        for case in cases:
            problem = case_id_problem(case.case_id)
            if problem:
                raise DataError(case.folder or root, problem)
    conflict = patient_conflict(cases, walk.root, shared_folders=conv.name == "msd")
    if conflict is None and compare_content:
        conflict = next(filter(None, (_identical_images(case) for case in cases)), None)
    if conflict is not None:
        raise conflict
    return conv, sorted(cases, key=lambda c: c.case_id)


def patient_conflict(cases: list[CaseFiles], root: Path, shared_folders: bool = False) -> DataError | None:
    """The first file that makes a case more than one patient's (``one_patient_problems``), as a ``DataError``
    naming it (None: none). A folder is a case's when it is the ``folder`` of that case and of no other
    (``shared_folders``: no folder is, as in MSD's ``imagesTr/``)."""
    owners: dict[Path, set[str]] = {}
    if not shared_folders:
        for case in cases:
            if case.folder is not None and case.folder.is_dir():
                owners.setdefault(case.folder.resolve(), set()).add(case.case_id)
    entries = [(case.case_id, [(key, case.found.get(key, path), path.resolve()) for key, path in case.entries()])
               for case in cases]
    found = one_patient_problems(entries, owners, root)
    if not found:
        return None
    case_id, shown, problem = found[0]
    return DataError(shown, problem, case=case_id)


def one_patient_problems(cases: list[tuple[str, list[tuple[str, Path, Path]]]], owners: dict[Path, set[str]],
                         root: Path) -> list[tuple[str, Path, str]]:
    """``(case id, file, problem)`` for every file that makes a case more than one patient's, from paths alone:
    one file (after resolving symlinks) given for two keys of a case, a file that resolves into another case's
    folder (``owners``: folder -> the cases whose folder it is), or one file used by two cases. ``cases``: per case,
    ``(key, path as given, resolved path)`` of each file. The rule of ``discover`` and of ``manifest`` alike."""
    problems: list[tuple[str, Path, str]] = []
    used: dict[Path, tuple[str, str]] = {}
    for case_id, files in cases:
        mine: dict[Path, str] = {}
        for key, shown, target in files:
            via = "" if target == shown else f" (to {target})"
            if target in mine:
                problems.append((case_id, shown, f"{mine[target]} and {key} are the same file{via}; each modality "
                                                 "needs its own image"))
                continue
            mine[target] = key
            owner = folder_owner(target, owners, root)
            if owner is not None and owner[0] != case_id:
                problems.append((case_id, shown, f"{key} resolves into case {owner[0]}'s folder {owner[1]} (to "
                                                 f"{target}); one case is one patient: give {case_id} its own {key}"))
            elif target in used and used[target][0] != case_id:
                other, other_key = used[target]
                problems.append((case_id, shown, f"{key} is the same file as case {other}'s {other_key}{via}; one "
                                                 "file cannot be two patients' image"))
        for target, key in mine.items():
            used.setdefault(target, (case_id, key))
    return problems


def folder_owner(target: Path, owners: dict[Path, set[str]], root: Path) -> tuple[str, Path] | None:
    """``(case id, folder)`` of the innermost case folder holding ``target`` when one case alone owns it."""
    if not owners or not target.is_relative_to(root):
        return None
    for parent in target.parents:
        ids = owners.get(parent)
        if ids is not None:
            return (next(iter(ids)), parent) if len(ids) == 1 else None
        if parent == root:
            return None
    return None


def _identical_images(case: CaseFiles) -> DataError | None:
    """Two byte-identical image files of ``case`` (a modality copied over another), as a ``DataError``; only
    files of equal size are read."""
    by_size: dict[int, list[str]] = {}
    for key, path in case.images.items():
        if path.is_file():
            by_size.setdefault(path.stat().st_size, []).append(key)
    for keys in by_size.values():
        if len(keys) < 2:
            continue
        seen: dict[str, str] = {}
        for key in keys:
            digest = _file_digest(case.images[key])
            if digest in seen:
                other = seen[digest]
                return DataError(case.found.get(key, case.images[key]),
                                 f"{key} has the same content as {other} ({case.found.get(other, case.images[other])}): "
                                 "identical bytes, a modality copied over another; each modality needs its own image",
                                 case=case.case_id)
            seen[digest] = key
    return None


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    hash_into(digest, path)
    return digest.hexdigest()


def hash_into(digest, path: Path) -> None:
    """Feed the bytes of ``path`` to ``digest``, a MiB at a time (``manifest.sha256_file`` uses it too)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)


class _Walk:
    """The data root (resolved) and what to do with symlinks that leave it."""

    def __init__(self, root: Path, follow_symlinks: bool):
        self.root = root
        self.follow_symlinks = follow_symlinks

    def place(self, entry: Path) -> Path:
        """The absolute path to record for ``entry`` (found under the root): its target when that is inside
        the root; else, with ``follow_symlinks``, the path under the root; else ``DataError``."""
        target = entry.resolve()
        if target.is_relative_to(self.root):
            return target
        if self.follow_symlinks:
            return self.root / entry.relative_to(self.root)
        kind = "folder" if entry.is_dir() else "file"
        raise DataError(
            entry,
            f"symlinked {kind} resolves outside the data root {self.root} (to {target}); copy it into the root "
            "or allow it explicitly (follow_symlinks=True, --follow-symlinks)",
        )


def _detect(walk: _Walk, series_rule: SeriesRule | None = None) -> tuple[LabelConvention, list[CaseFiles]]:
    root = walk.root
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return get_convention("msd"), _msd_cases(walk)
    found = {conv.name: _brats_cases(walk, conv) for conv in (BRATS2021, BRATS2023)}
    complete = {name: [c for c in cases if not c.missing] for name, cases in found.items()}
    counts = {name: len(cases) for name, cases in complete.items()}
    if counts["brats2021"] and counts["brats2023"]:
        raise DataError(
            root,
            f"mixed layouts: {counts['brats2021']} BraTS 2018-2021 cases and {counts['brats2023']} "
            "BraTS 2023 cases; split the folder or force one with --convention",
        )
    best = max(found, key=lambda name: (counts[name], len(found[name])))
    if not counts[best]:  # no complete BraTS case: series folders named like "AX_T1" are no BraTS case
        dicom = _dicom_cases(walk, series_rule)
        if dicom:
            return BRATS2021, dicom
    if not found[best]:
        raise DataError(
            root,
            "no BraTS or MSD cases found (expected CASE/CASE_t1.nii.gz ... (BraTS 2018-2021), "
            "CASE/CASE-t1n.nii.gz ... (BraTS 2023+), imagesTr/ + labelsTr/ (MSD Task01)) and no DICOM study",
        )
    return get_convention(best), found[best]


def _dicom_cases(walk: _Walk, series_rule: SeriesRule | None) -> list[CaseFiles]:
    """A case per DICOM study under the root (none when it holds no DICOM images)."""
    from medseg_diff.data.dicom.study import find_studies

    cases = []
    for study in find_studies(walk.root, series_rule):
        case = CaseFiles(case_id=study.case_id, images={}, folder=study.folder, dicom=study)
        try:
            for modality, series in study.series.items():
                for path in series.files:
                    if path.is_symlink():
                        walk.place(path)  # refuses a file leaving the root; the path itself is kept
                case.images[modality] = series.reference  # read as the whole series (data.io)
        except DataError as err:
            case.conflict = DataError(err.path, err.problem, case=study.case_id)
        cases.append(case)
    return cases


def _layout_hint(conv: LabelConvention) -> str:
    if conv.name == "msd":
        return "imagesTr/*.nii.gz and labelsTr/*.nii.gz"
    sep = conv.separator
    return (f"CASE/CASE{sep}" + f", CASE{sep}".join(conv.modality_suffixes) + f" (+ CASE{sep}{conv.seg_suffix}) "
            "or a DICOM study folder")


def _split_name(path: Path, conv: LabelConvention) -> tuple[str, str] | None:
    """``(case_id, suffix)`` of a BraTS file/folder name like ``CASE_t1ce.nii.gz``, else None."""
    name = path.name
    ext = image_suffix(name)
    stem = name[: len(name) - len(ext)] if ext else name
    if not ext and not path.is_dir():
        return None
    case_id, sep, suffix = stem.rpartition(conv.separator)
    if not sep or not case_id:
        return None
    known = set(conv.modality_suffixes) | {conv.seg_suffix}
    return (case_id, suffix.lower()) if suffix.lower() in known else None


def _case_folders(walk: _Walk) -> list[Path]:
    folders, frontier = [], [walk.root]
    for _ in range(MAX_DEPTH + 1):
        next_frontier = []
        for folder in frontier:
            folders.append(folder)
            subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            next_frontier.extend(walk.place(p) if p.is_symlink() else p for p in subfolders)
        frontier = next_frontier
    return folders


def _brats_cases(walk: _Walk, conv: LabelConvention) -> list[CaseFiles]:
    by_suffix = dict(zip(conv.modality_suffixes, MODALITIES))
    cases: dict[str, CaseFiles] = {}
    for folder in _case_folders(walk):
        for entry in sorted(folder.iterdir()):
            parsed = _split_name(entry, conv)
            if parsed is None or entry.name.startswith("._") or not is_image_path(entry):
                continue
            case_id, suffix = parsed
            case = cases.setdefault(case_id, CaseFiles(case_id=case_id, images={}, folder=folder))
            key = "label" if suffix == conv.seg_suffix else by_suffix[suffix]
            try:
                path = walk.place(entry)
            except DataError as err:
                case.conflict = case.conflict or DataError(err.path, err.problem, case=case_id)
                continue
            previous = case.label if key == "label" else case.images.get(key)
            if previous == path:
                continue  # the same file reached through an in-root symlinked folder
            if folder != case.folder:
                case.conflict = case.conflict or DataError(
                    case.folder, f"the same case id is also in {folder}: two patients' files would be mixed into one "
                                 "case; rename one, or build a manifest per folder", case=case_id)
            elif previous is not None:
                case.conflict = case.conflict or DataError(
                    folder, f"two files for {key}: {previous.name} and {entry.name}; keep one", case=case_id)
            if key == "label":
                case.label = path
            else:
                case.images[key] = path
            case.found[key] = entry
    for case in cases.values():
        case.missing = [m for m in MODALITIES if m not in case.images]
        case.images = {m: case.images[m] for m in MODALITIES if m in case.images}
    return list(cases.values())


def _msd_cases(walk: _Walk) -> list[CaseFiles]:
    root = walk.root
    cases: dict[str, CaseFiles] = {}
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        folder = root / images_dir
        if not folder.is_dir():
            continue
        folder = walk.place(folder) if folder.is_symlink() else folder
        for image in sorted(folder.iterdir()):
            if image.name.startswith(".") or image_suffix(image) not in (".nii", ".nii.gz"):
                continue
            case_id = image.name[: -len(image_suffix(image))]
            label = root / labels_dir / image.name
            case = CaseFiles(case_id=case_id, images={}, folder=image)
            try:
                case.images["4d"] = walk.place(image)
                case.label = walk.place(label) if label.exists() else None
                case.found = {"4d": image, **({"label": label} if case.label else {})}
            except DataError as err:
                case.conflict = DataError(err.path, err.problem, case=case_id)
            if case_id in cases:
                first = cases[case_id]
                first.conflict = first.conflict or DataError(
                    first.folder, f"the same case id is also {image}; keep one", case=case_id)
                continue
            cases[case_id] = case
    return list(cases.values())
