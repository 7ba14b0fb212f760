"""Write volumes as a DICOM study (MR Image Storage, one series per modality) for tests and demos.

Each volume ``[X, Y, Z]`` on a RAS affine becomes one series of ``Z`` single-frame images: frame ``k`` is the
plane ``[:, :, k]``, its rows run along the array's Y axis and its columns along X (pixel ``(r, c)`` is voxel
``(c, r, k)``), with ImagePositionPatient / ImageOrientationPatient / PixelSpacing taken from the affine
(RAS -> LPS). Read back (``data.io``, SimpleITK, which sorts the frames along the normal of their orientation),
a volume whose affine has a positive determinant comes back with the same array and affine; with a negative one
(a "radiological" NIfTI), the same voxels on the same world grid with the third axis reversed.

Values are stored as 16-bit integers: integral volumes within int16 exactly, others scaled to uint16 with a
series-wide RescaleSlope / RescaleIntercept (error at most half a step, ``(max - min) / 65535 / 2``).

Written with pydicom (SimpleITK's DICOM writer changes the process locale). UIDs derive from ``patient_id`` and
``study_date`` (``generate_uid`` with entropy sources), so a phantom is the same bytes on every run; two studies
need distinct patient ids, dates or ``study_uid``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medseg_diff.data.dicom.geometry import LPS_TO_RAS

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: SeriesDescription of each canonical modality in a phantom study.
DEFAULT_DESCRIPTIONS: dict[str, str] = {"t1": "AX T1", "t1ce": "T1 POST GD", "t2": "AX T2", "flair": "T2 FLAIR"}
LAYOUTS = ("series", "flat", "nested")


def write_phantom_study(images: Mapping, out_dir: str | Path, descriptions: Mapping[str, str] | None = None,
                        patient_id: str = "PHANTOM-001", patient_name: str = "Phantom^Brain",
                        study_date: str = "20240101", study_description: str = "MRI BRAIN TUMOUR PHANTOM",
                        layout: str = "series", suffix: str = "", first_series_number: int = 2,
                        study_uid: str | None = None) -> Path:
    """Write ``images`` (name -> ``nibabel`` image or ``(array [X, Y, Z], RAS affine)``) as one MR study into
    ``out_dir``; returns ``out_dir``.

    ``descriptions``: SeriesDescription per name (default ``DEFAULT_DESCRIPTIONS``, else the name). ``layout``:
    ``"series"`` (a folder per series), ``"flat"`` (every file in ``out_dir``) or ``"nested"``
    (``out_dir/DICOM/STUDY/SERIESn/``). File names are opaque hashes (``suffix`` appended, e.g. ".dcm"), so their
    order says nothing about slice order. Series are numbered from ``first_series_number`` in ``images`` order.
    ``study_uid``: default derived from ``patient_id`` and ``study_date`` (give one to write two studies of a patient
    on one day); the other UIDs derive from it.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out_dir = Path(out_dir)
    names = {**DEFAULT_DESCRIPTIONS, **(descriptions or {})}
    study_uid = study_uid or _uid(patient_id, study_date, "study")
    frame_of_reference = _uid(study_uid, "frame-of-reference")
    for n, (name, image) in enumerate(images.items()):
        array, affine = _array_affine(image)
        number = first_series_number + n
        series_uid = _uid(study_uid, "series", name, str(number))
        folder = {"series": out_dir / f"SE{number:04d}", "flat": out_dir,
                  "nested": out_dir / "DICOM" / "ST0001" / f"SERIES{number}"}[layout]
        folder.mkdir(parents=True, exist_ok=True)
        series = {
            "PatientName": patient_name, "PatientID": patient_id, "PatientBirthDate": "", "PatientSex": "O",
            "StudyInstanceUID": study_uid, "StudyDate": study_date, "StudyTime": "120000", "StudyID": "1",
            "AccessionNumber": "", "ReferringPhysicianName": "", "StudyDescription": study_description,
            "SeriesInstanceUID": series_uid, "SeriesNumber": number, "SeriesDescription": names.get(name, name),
            "SeriesDate": study_date, "SeriesTime": "120000", "FrameOfReferenceUID": frame_of_reference,
            "PositionReferenceIndicator": "",
        }
        for k, plane in enumerate(_planes(array, affine, names.get(name, name))):
            sop_uid = _uid(series_uid, "instance", str(k))
            ds = _mr_dataset(series, plane, sop_uid, k + 1)
            file_name = hashlib.sha256(sop_uid.encode()).hexdigest()[:16].upper() + suffix
            ds.save_as(folder / file_name, enforce_file_format=True)
    return out_dir


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["medseg-diff phantom", *parts])


def _array_affine(image) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(image, tuple):
        array, affine = image
    else:
        array, affine = np.asarray(image.dataobj), image.affine
    array, affine = np.asarray(array), np.asarray(affine, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"a phantom series needs a 3D volume, got shape {array.shape}")
    return array, affine


def _planes(array: np.ndarray, affine: np.ndarray, what: str):
    """Per frame: pixel array (rows, columns), position, orientation, spacing, thickness and rescale."""
    lps = LPS_TO_RAS @ affine
    steps = [lps[:3, a] for a in range(3)]
    sizes = [float(np.linalg.norm(s)) for s in steps]
    u, v = steps[0] / sizes[0], steps[1] / sizes[1]
    normal = np.cross(u, v)
    if abs(float(u @ v)) > 1e-4 or abs(abs(float(steps[2] @ normal)) - sizes[2]) > 1e-4 * sizes[2]:
        raise ValueError(f"{what}: the affine's axes must be orthogonal to be written as DICOM slices:\n{affine}")
    stored, slope, intercept = _encode(array)
    for k in range(array.shape[2]):
        yield {
            "pixels": np.ascontiguousarray(stored[:, :, k].T),
            "position": lps[:3, 3] + k * steps[2],
            "orientation": np.concatenate([u, v]),
            "spacing": (sizes[1], sizes[0]),  # [between rows, between columns]
            "thickness": sizes[2],
            "slope": slope,
            "intercept": intercept,
        }


def _encode(array: np.ndarray) -> tuple[np.ndarray, str | None, str | None]:
    """``(stored int16/uint16 values, RescaleSlope, RescaleIntercept)``; no rescale for int16-exact volumes."""
    from pydicom.valuerep import format_number_as_ds

    values = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("a phantom volume must be finite")
    if np.array_equal(values, np.rint(values)) and values.min() >= -32768 and values.max() <= 32767:
        return values.astype(np.int16), None, None
    low, high = float(values.min()), float(values.max())
    slope_text = format_number_as_ds((high - low) / 65535 if high > low else 1.0)
    intercept_text = format_number_as_ds(low)
    slope, intercept = float(slope_text), float(intercept_text)
    stored = np.clip(np.rint((values - intercept) / slope), 0, 65535).astype(np.uint16)
    return stored, slope_text, intercept_text


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(round(value, 6)) + 0.0)


def _mr_dataset(series: dict, plane: dict, sop_uid: str, number: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "MR"
    ds.Manufacturer = "medseg-diff"
    ds.ManufacturerModelName = "phantom"
    for key, value in series.items():
        setattr(ds, key, value)
    ds.InstanceNumber = number
    ds.ContentDate, ds.ContentTime = series["StudyDate"], series["StudyTime"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "10", "1"
    ds.ImagePositionPatient = [_ds(x) for x in plane["position"]]
    ds.ImageOrientationPatient = [_ds(x) for x in plane["orientation"]]
    ds.PixelSpacing = [_ds(x) for x in plane["spacing"]]
    ds.SliceThickness = _ds(plane["thickness"])
    ds.SpacingBetweenSlices = _ds(plane["thickness"])
    normal = np.cross(plane["orientation"][:3], plane["orientation"][3:])
    ds.SliceLocation = _ds(float(plane["position"] @ normal))
    pixels = plane["pixels"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if plane["slope"] is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = plane["slope"], plane["intercept"], "US"
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds
