"""A DICOM study folder as a scanner or PACS exports it, read as one case.

The folder may hold its files flat, one folder per series, or nested at any depth, under any names (``.dcm`` or
none). Every file starting with the DICOM preamble (``DICM`` at byte 128) is read (headers only); others (NIfTI,
notes, ``DICOMDIR``) are left alone. Series that hold no images to segment (SEG, SR, parametric maps, presentation
states, multi-frame objects) are ignored. The image series are mapped to t1, t1ce, t2 and flair by a
:class:`~medseg_diff.data.dicom.rules.SeriesRule` on their SeriesDescription.

``read_study`` refuses, naming the folder and listing every series of the study (number, description, modality,
instances): a modality no series matches, two series that match one modality, a series that matches two, and a
folder holding several studies (naming them). A series whose frames do not form one regular grid (two echoes in
one series, a missing slice) is refused naming its first file.

A case id is made of the PatientID, the StudyDate and a short hash of the StudyInstanceUID
(``P001_20240101_1a2b3c4d``): unique per study, the same on every read, and usable as a file name.

In a data pipeline, a series stands for itself by **its reference file** (:attr:`DicomSeries.reference`, a file of
the series directly in the series' common folder): ``data.io.read_image`` reads a DICOM file as the whole series
it belongs to, found under the file's folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from medseg_diff.data.conventions import MODALITIES
from medseg_diff.data.dicom.geometry import frame_affine, slice_order
from medseg_diff.data.dicom.rules import SeriesRule
from medseg_diff.errors import DataError

#: Modalities whose series hold no images to segment (PS3.3 C.7.3.1.1.1).
NON_IMAGE_MODALITIES = frozenset({
    "SEG", "SR", "PR", "KO", "DOC", "REG", "FID", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "PLAN", "AU", "ECG",
    "HD", "RWV", "SMR", "RESP", "TEXTUREMAP"})
#: SOP class UID prefixes of objects that are not images to segment even in a series labelled MR.
NON_IMAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.11",   # presentation states
    "1.2.840.10008.5.1.4.1.1.30",   # parametric map
    "1.2.840.10008.5.1.4.1.1.66",   # raw data, registration, fiducials, segmentation
    "1.2.840.10008.5.1.4.1.1.88",   # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.481",  # radiotherapy objects
)
_DICOMDIR = "1.2.840.10008.1.3.10"


def is_non_image_sop_class(sop_class: str) -> bool:
    """True for a SOP class of ``NON_IMAGE_SOP_CLASSES`` (the class itself or one below it, dot-separated)."""
    return any(sop_class == p or sop_class.startswith(p + ".") for p in NON_IMAGE_SOP_CLASSES)
_SCAN_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
              "SeriesDescription", "ProtocolName", "Modality", "PatientID", "StudyDate", "StudyDescription",
              "NumberOfFrames", "Rows", "ImagePositionPatient"]
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def is_dicom_file(path: str | Path) -> bool:
    """True for a file with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


@dataclass(frozen=True)
class FileHeader:
    """The few header fields of one DICOM file that scanning needs."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    series_number: int | None
    description: str
    modality: str
    patient_id: str
    study_date: str
    study_description: str
    is_image: bool  # a single-frame image with a position: something to segment


@dataclass(frozen=True)
class SeriesSummary:
    """One series of a study, as listed in messages."""

    series_uid: str
    number: int | None
    description: str
    modality: str
    instances: int
    is_image: bool

    def line(self, mapped: list[str] | None = None) -> str:
        """``   #3  'AX T1'  MR  24 images  -> t1``: one line of a study's listing."""
        number = "#?" if self.number is None else f"#{self.number}"
        plural = "s" if self.instances != 1 else ""
        if self.is_image:
            count = f"{self.instances} image{plural}"
            note = f"-> {', '.join(mapped)}" if mapped else "(matches no modality)"
        else:
            count = f"{self.instances} instance{plural}"
            note = "(no single-frame images: ignored)"
        return f"  {number:>5}  {self.description!r:34} {self.modality or '?':5} {count:>13}  {note}"


@dataclass
class DicomSeries:
    """One image series: its files and headers (pixel data not read) in slice order."""

    series_uid: str
    description: str
    number: int | None
    files: list[Path]  # slice order (ascending along the normal of ImageOrientationPatient)
    datasets: list = field(repr=False)  # pydicom Datasets, read with stop_before_pixels, same order as files

    @property
    def folder(self) -> Path:
        """The deepest folder holding every file of the series."""
        return Path(os.path.commonpath([str(p.parent) for p in self.files]))

    @property
    def reference(self) -> Path:
        """The file that stands for the series in a case: its first file (slice order) directly in :attr:`folder`
        (``data.io.read_image`` of it reads the series' files under that folder)."""
        folder = self.folder
        for path in self.files:
            if path.parent == folder:
                return path
        raise DataError(folder, f"series {self.description!r} ({self.series_uid}) is spread over several folders "
                                "with none of its files directly in their common folder; move its files into one "
                                "folder")


@dataclass
class DicomStudy:
    """A study folder read as one case: the series of each modality."""

    folder: Path
    study_uid: str
    case_id: str
    patient_id: str
    series: dict[str, DicomSeries]  # modality (MODALITIES order) -> series
    listing: tuple[SeriesSummary, ...] = ()  # every series of the study, images or not

    def modality_of(self, path: str | Path) -> str | None:
        """The modality whose series ``path`` (a file of it, or its reference) belongs to, or None."""
        path = Path(path).resolve()
        for modality, series in self.series.items():
            if path in (p.resolve() for p in series.files):
                return modality
        return None


def case_id_of(patient_id: str, study_date: str, study_uid: str) -> str:
    """``PATIENT_DATE_HASH8``: the PatientID and StudyDate made file-name safe, and a hash of the study UID."""
    patient = _UNSAFE.sub("-", patient_id.strip()).strip("-._+") or "anonymous"
    patient = re.sub(r"\.{2,}", ".", patient)[:48]
    date = re.sub(r"\D", "", study_date)[:8]
    digest = hashlib.sha256(study_uid.encode()).hexdigest()[:8]
    return "_".join(p for p in (patient, date, digest) if p)


def scan_headers(folder: str | Path) -> list[FileHeader]:
    """The headers of every DICOM file under ``folder`` (hidden files and folders skipped, symlinked folders not
    followed), sorted by path. A file with the preamble that cannot be read is a ``DataError`` naming it."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder" if folder.exists() else "folder not found")
    headers = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(top) / name
            if name.startswith(".") or not is_dicom_file(path):
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SCAN_TAGS)
            except (InvalidDicomError, OSError, ValueError, KeyError, EOFError) as err:
                raise DataError(path, f"unreadable DICOM file ({type(err).__name__}: {err})") from None
            header = _file_header(path, ds)
            if header is not None:
                headers.append(header)
    return headers


def _file_header(path: Path, ds) -> FileHeader | None:
    sop_class = str(getattr(ds, "SOPClassUID", "") or getattr(getattr(ds, "file_meta", None),
                                                               "MediaStorageSOPClassUID", ""))
    if sop_class == _DICOMDIR or "DirectoryRecordSequence" in ds:
        return None
    study_uid, series_uid = str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or "")
    if not study_uid or not series_uid:
        raise DataError(path, "DICOM file without StudyInstanceUID or SeriesInstanceUID (truncated or damaged?)")
    modality = str(ds.get("Modality", "") or "").upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    is_image = (modality not in NON_IMAGE_MODALITIES and not is_non_image_sop_class(sop_class)
                and frames == 1 and "Rows" in ds and "ImagePositionPatient" in ds)
    number = ds.get("SeriesNumber", None)
    return FileHeader(
        path=path, study_uid=study_uid, series_uid=series_uid, sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        series_number=int(number) if number not in (None, "") else None,
        description=str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or ""),
        modality=modality, patient_id=str(ds.get("PatientID", "") or ""), study_date=str(ds.get("StudyDate", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""), is_image=is_image,
    )


def is_dicom_study(folder: str | Path) -> bool:
    """True when ``folder`` (at any depth) holds DICOM images of exactly one study."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    try:
        headers = scan_headers(folder)
    except DataError:
        return True  # DICOM is there; read_study says what is wrong with it
    studies = {h.study_uid for h in headers if h.is_image}
    return len(studies) == 1


def read_study(folder: str | Path, rule: SeriesRule | None = None) -> DicomStudy:
    """The study in ``folder`` with a series per modality (``rule``: the default SeriesDescription rule)."""
    folder = Path(folder)
    headers = scan_headers(folder)
    studies = _by_study(headers)
    if not studies:
        raise DataError(folder, "holds no DICOM image files (files with the DICOM preamble 'DICM')")
    if len(studies) > 1:
        raise DataError(folder, f"holds {len(studies)} DICOM studies; give one folder per study:\n"
                        + "\n".join(_study_line(h) for h in studies.values()))
    return _study(folder, next(iter(studies.values())), rule or SeriesRule.default())


def find_studies(root: str | Path, rule: SeriesRule | None = None) -> list[DicomStudy]:
    """Every study under ``root`` (the root itself, or its study folders at any depth), sorted by case id.

    A study's folder is the root when it holds one study, else the highest folder below the root that holds files
    of that study only; a folder holding files of two studies is refused naming both."""
    root = Path(root)
    studies = _by_study(scan_headers(root))
    holders: dict[Path, set[str]] = defaultdict(set)  # folder -> the studies with files at or below it
    for uid, files in studies.items():
        for parent in {h.path.parent for h in files}:
            for folder in (parent, *parent.parents):
                holders[folder].add(uid)
                if folder == root:
                    break
    folders = {}
    for uid, files in studies.items():
        folder = Path(os.path.commonpath([str(h.path.parent) for h in files]))
        if len(holders[folder]) > 1:
            involved = sorted(holders[folder], key=lambda u: u != uid)
            raise DataError(folder, f"holds files of {len(involved)} DICOM studies; give each study its own folder:\n"
                            + "\n".join(_study_line(studies[u]) for u in involved))
        while folder != root and len(holders[folder.parent]) == 1:
            folder = folder.parent
        folders[uid] = folder
    found = [_study(folders[uid], files, rule or SeriesRule.default()) for uid, files in studies.items()]
    return sorted(found, key=lambda s: s.case_id)


def _by_study(headers: list[FileHeader]) -> dict[str, list[FileHeader]]:
    """Headers grouped by study, only studies with at least one image series."""
    studies: dict[str, list[FileHeader]] = defaultdict(list)
    for h in headers:
        studies[h.study_uid].append(h)
    return {uid: files for uid, files in sorted(studies.items()) if any(h.is_image for h in files)}


def _study_line(files: list[FileHeader]) -> str:
    h = files[0]
    series = len({f.series_uid for f in files})
    folder = os.path.commonpath([str(f.path.parent) for f in files])
    return (f"  StudyInstanceUID {h.study_uid} (patient {h.patient_id or '?'}, date {h.study_date or '?'}, "
            f"{h.study_description or 'no description'!r}): {series} series, {len(files)} files in {folder}")


def _summaries(files: list[FileHeader]) -> list[SeriesSummary]:
    by_series: dict[str, list[FileHeader]] = defaultdict(list)
    for h in files:
        by_series[h.series_uid].append(h)
    out = []
    for uid, members in by_series.items():
        first = members[0]
        out.append(SeriesSummary(uid, first.series_number, first.description, first.modality, len(members),
                                 all(m.is_image for m in members)))
    return sorted(out, key=lambda s: (s.number is None, s.number or 0, s.description, s.series_uid))


def _study(folder: Path, files: list[FileHeader], rule: SeriesRule) -> DicomStudy:
    listing = _summaries(files)
    mapped = {s.series_uid: rule.modalities_of(s.description) if s.is_image else [] for s in listing}

    def refuse(problem: str) -> DataError:
        lines = [s.line(mapped[s.series_uid]) for s in listing]
        return DataError(folder, f"{problem}; the study's series (number, description, modality, instances):\n"
                         + "\n".join(lines) + f"\n(series mapped by {rule.source}; give a rule file to choose)")

    two = [s for s in listing if len(mapped[s.series_uid]) > 1]
    if two:
        s = two[0]
        raise refuse(f"series #{s.number} {s.description!r} matches {' and '.join(mapped[s.series_uid])}")
    chosen: dict[str, SeriesSummary] = {}
    for modality in MODALITIES:
        matches = [s for s in listing if modality in mapped[s.series_uid]]
        if len(matches) > 1:
            names = ", ".join(f"#{s.number} {s.description!r}" for s in matches)
            raise refuse(f"{len(matches)} series match {modality} ({names})")
        if matches:
            chosen[modality] = matches[0]
    missing = [m for m in MODALITIES if m not in chosen]
    if missing:
        raise refuse(f"no series matches {', '.join(missing)}")
    series = {m: _read_series(s, [h for h in files if h.series_uid == s.series_uid]) for m, s in chosen.items()}
    first = files[0]
    return DicomStudy(folder=folder, study_uid=first.study_uid,
                      case_id=case_id_of(first.patient_id, first.study_date, first.study_uid),
                      patient_id=first.patient_id, series=series, listing=tuple(listing))


def _read_series(summary: SeriesSummary, files: list[FileHeader]) -> DicomSeries:
    """The full headers of a series' files, sorted into slice order and checked to form one grid."""
    import pydicom

    seen: dict[str, Path] = {}
    for h in files:
        if h.sop_uid in seen:
            raise DataError(h.path, f"is the same instance ({h.sop_uid}) as {seen[h.sop_uid]}; the series "
                                    f"{summary.description!r} is in the folder twice, remove one copy")
        seen[h.sop_uid] = h.path
    datasets = []
    for h in files:
        try:
            datasets.append(pydicom.dcmread(h.path, stop_before_pixels=True))
        except Exception as err:  # pydicom raises many types for a damaged header
            raise DataError(h.path, f"unreadable DICOM file ({type(err).__name__}: {err})") from None
    try:
        order = slice_order(datasets)
        datasets = [datasets[i] for i in order]
        frame_affine(datasets)  # refuses anything that is not one regular grid
    except (ValueError, AttributeError, TypeError) as err:
        raise DataError(files[0].path, f"series #{summary.number} {summary.description!r} cannot be read as one "
                                       f"volume: {err}") from None
    return DicomSeries(series_uid=summary.series_uid, description=summary.description, number=summary.number,
                       files=[files[i].path for i in order], datasets=datasets)
