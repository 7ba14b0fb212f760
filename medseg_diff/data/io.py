"""Reading volumes: NIfTI through nibabel; MHA/MHD/NRRD and DICOM series through SimpleITK.

A DICOM series is given as a folder (its first series) or as **one file of the series** (any name, ``.dcm`` or
none): the file stands for the whole series, read from the files with its SeriesInstanceUID under the file's
folder (subfolders included). That is how a case of a DICOM study folder (``medseg_diff.dicom``) names its
modalities, whose series may share one folder.

Every reader returns a ``nibabel.Nifti1Image`` whose affine maps voxel indices to RAS+ world
coordinates (the NIfTI convention), so the rest of the package sees one kind of image. SimpleITK
images (LPS world, z-y-x arrays) are converted with their geometry kept: the array is transposed
to x-y-z and the direction/spacing/origin become an affine, flipped LPS → RAS.

Before any voxel is decoded, the header's claim is bounded by the bytes on disk (``header_size_problem``):
a corrupt 173-byte header claiming 10000³ voxels is refused in milliseconds instead of ending in a
``MemoryError`` (or gigabytes allocated first). Every image must have a finite, non-singular affine with
voxel sizes > 0 (``geometry_problem``).

Also refused by name, from the header alone: images with more than one value per voxel (a NIfTI RGB24/RGBA32 data
type, a NIfTI vector intent or 5D vector layout, a multi-component MetaImage/NRRD/DICOM such as an RGB series;
``MULTI_COMPONENT``) and complex-valued images -- ``np.asarray(..., float32)`` would fail with a numpy type error or
silently drop the imaginary part -- and a NIfTI whose sform and qform (both set) place the voxels in different
places (``qform_sform_problem``): the package reads the sform, a viewer that reads the qform would show the image,
and every output written on its grid, elsewhere.

Every integer and float voxel type (int8, uint8, int16, uint16, int32, ..., float32, float64, with or without
``scl_slope``/``scl_inter``) is decoded by the same path, to float32 unless asked otherwise; what a value *means*
(a signed or offset background, z-scored data) is preprocessing's business
(``data.transforms.remove_background_offset``), not the reader's.

``MedsegReader`` plugs the same reader into MONAI's ``LoadImage(d)``.
"""

from __future__ import annotations

import gzip
import logging
import math
import re
import threading
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import NibabelReader
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from medseg_diff.errors import DataError

# MONAI's optional GPU DICOM decoder (nvImageCodec) announces on every command that it is absent, once as a log line
# and once as a warning; pydicom's own decoders are what this package uses, so neither says anything useful here.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES

#: LPS <-> RAS: negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Deflate (gzip, zlib) cannot expand its input more than ~1032:1 (a 258-byte match costs at least
#: ~2 bits), so a compressed file of N bytes decodes to at most ``GZIP_MAX_RATIO * N`` bytes.
GZIP_MAX_RATIO = 1032
#: An affine whose |det| is below this fraction of the product of its voxel sizes is singular.
_SINGULAR_RTOL = 1e-6
_HEADER_READ = 1 << 16  # MetaImage / NRRD text headers are read up to this many bytes

#: What an image with several values per voxel (RGB, a vector field, a multi-component MetaImage) is told.
MULTI_COMPONENT = "multi-component (RGB/vector) image; expected one scalar value per voxel"
#: NIfTI intent codes that declare one vector per voxel (NIFTI_INTENT_DISPVECT, _VECTOR, _RGB_VECTOR, _RGBA_VECTOR).
_VECTOR_INTENTS = {1006: "displacement vector", 1007: "vector", 2003: "RGB vector", 2004: "RGBA vector"}
#: sform vs qform: the largest distance (mm) between where the two put any corner of the voxel grid that still
#: counts as agreement. The qform is a quaternion with float32 parameters: it cannot hold a shear and rounds a
#: rotation to ~1e-7 rad, and DICOM direction cosines written with 6 decimals are orthogonal only to ~1e-6, so an
#: honest pair written from one matrix differs by up to ~3e-4 mm over a 300 mm field of view. 0.01 mm is 30x that
#: margin and still 1/100 of the finest voxel an MR scan has: a disagreement above it is a second, different
#: placement, not rounding.
QFORM_SFORM_TOL_MM = 0.01


def image_suffix(path: str | Path) -> str:
    """The recognised suffix of ``path`` ('.nii.gz', '.mha', ...) or '' for a DICOM folder / unknown."""
    name = str(path).lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def is_image_path(path: Path) -> bool:
    """True for a file of a supported format or a folder that holds a DICOM series (a DICOM file without a known
    suffix is not counted here: discovery finds those through ``medseg_diff.dicom``)."""
    if path.is_dir():
        return _dicom_series_files(path) is not None
    return image_suffix(path) != "" and not path.name.startswith("._")


def read_image(path: str | Path) -> nib.Nifti1Image:
    """Read one image file (or DICOM folder) as a NIfTI image with a RAS affine.

    Raises ``DataError`` naming the file when it is missing, truncated or not an image, when its header
    claims more voxels than the file can hold (checked before any voxel is decoded), or when its affine
    is singular / has a zero or non-finite voxel size.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    try:
        if path.is_dir():
            img = _read_dicom_series(path)
        else:
            suffix = image_suffix(path)
            if suffix in NIFTI_SUFFIXES:
                img = _read_nifti(path)
            elif suffix in SITK_SUFFIXES:
                img = _read_sitk_file(path)
            elif is_dicom_file(path):
                img = _read_dicom_file_series(path)
            else:
                raise DataError(
                    path, f"unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}, a DICOM file "
                          "or a DICOM folder"
                )
    except DataError:
        raise
    except _NotScalar as err:
        raise DataError(path, str(err)) from None
    except MemoryError as err:  # a claim the size bounds could not rule out (e.g. bzip2-encoded NRRD)
        raise DataError(path, "not enough memory to decode the image; is its header corrupt?") from err
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, RuntimeError, ImageFileError,
            HeaderDataError) as err:
        raise DataError(path, f"unreadable image ({type(err).__name__}: {err})") from err
    problem = geometry_problem(img.affine)
    if problem:
        raise DataError(path, problem)
    return img


def read_array(path: str | Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """``(array [X, Y, Z(, C)], affine 4x4)`` of an image file; the whole file is decoded."""
    img = read_image(path)
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except MemoryError as err:
        raise DataError(path, f"not enough memory to decode {_human(_claimed_bytes(img))} of voxels") from err
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise DataError(path, f"truncated or corrupt image data ({type(err).__name__}: {err})") from err
    return data, np.asarray(img.affine, dtype=np.float64)


def geometry_problem(affine) -> str | None:
    """What makes ``affine`` unusable as a voxel-to-world map (non-finite entries, a voxel size that is not
    > 0, a singular matrix), or None when it is fine. ``read_image`` refuses such images."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return "affine contains NaN/Inf" if affine.shape == (4, 4) else f"affine has shape {affine.shape}, not 4x4"
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(zooms > 0):
        return f"voxel size must be > 0, got {_fmt_zooms(zooms)} mm (affine has a zero column; pixdim/spacing unset?)"
    det = abs(float(np.linalg.det(affine[:3, :3])))
    if det <= _SINGULAR_RTOL * float(np.prod(zooms)):
        return f"affine is singular (its voxel axes are parallel; voxel size {_fmt_zooms(zooms)} mm)"
    return None


def header_size_problem(shape: Sequence[int], bytes_per_voxel: float, offset: int, capacity: float | None,
                        how: str) -> str | None:
    """The problem with a header that claims ``shape`` voxels of ``bytes_per_voxel`` bytes starting at byte
    ``offset`` when the file can hold at most ``capacity`` bytes (``how`` says why), or None when it fits.
    ``capacity`` None: no bound is known (the claim is accepted)."""
    dims = [int(d) for d in shape]
    if not dims or any(d <= 0 for d in dims):
        return f"header claims shape {tuple(dims)}; every dimension must be >= 1"
    voxels = math.prod(dims)
    needed = offset + voxels * bytes_per_voxel
    if capacity is None or needed <= capacity:
        return None
    return (f"header claims {'x'.join(map(str, dims))} = {voxels:,} voxels ({_human(voxels * bytes_per_voxel)}) "
            f"but the file holds at most {_human(max(capacity - offset, 0))}{f' ({how})' if how else ''}; "
            "the header is corrupt or the file is truncated")


def _read_nifti(path: Path) -> nib.Nifti1Image:
    img = nib.load(str(path))  # reads the header only; voxels are decoded later, from img.dataobj
    dtype = img.header.get_data_dtype()
    intent = int(img.header["intent_code"]) if "intent_code" in img.header else 0
    vector_5d = len(img.shape) == 5 and img.shape[3] == 1 and img.shape[4] > 1  # NIfTI's layout of a vector field
    if dtype.fields is not None or intent in _VECTOR_INTENTS or vector_5d:
        what = (f"data type {_nifti_type(img)}" if dtype.fields is not None else
                f"intent '{_VECTOR_INTENTS[intent]}'" if intent in _VECTOR_INTENTS else
                f"{img.shape[4]} components per voxel")
        raise DataError(path, f"{MULTI_COMPONENT} ({what}, shape {tuple(img.shape)})")
    if dtype.kind == "c":
        raise DataError(path, f"complex-valued image ({_nifti_type(img)}); expected one real value per voxel "
                              "(save the magnitude)")
    if len(img.shape) not in (3, 4):
        raise DataError(path, f"expected a 3D or 4D image, got shape {img.shape}")
    size = path.stat().st_size
    if image_suffix(path) == ".nii.gz":
        capacity, how = size * GZIP_MAX_RATIO, f"{size:,} gzip bytes x {GZIP_MAX_RATIO}, the most deflate can expand"
    else:
        capacity, how = size, ""
    offset = int(img.header["vox_offset"]) if "vox_offset" in img.header else 0
    problem = header_size_problem(img.shape, img.header.get_data_dtype().itemsize, offset, capacity, how)
    if problem:
        raise DataError(path, problem)
    problem = qform_sform_problem(img)
    if problem:
        raise DataError(path, problem)
    return img


def _nifti_type(img) -> str:
    code = int(img.header["datatype"]) if "datatype" in img.header else None
    try:
        return (str(nib.nifti1.data_type_codes.niistring[code]).removeprefix("NIFTI_TYPE_") if code is not None
                else str(img.get_data_dtype()))
    except KeyError:
        return str(img.get_data_dtype())


def qform_sform_problem(img) -> str | None:
    """What differs between the sform and the qform of a NIfTI image when both are set (codes > 0) and place some
    corner of the voxel grid more than ``QFORM_SFORM_TOL_MM`` apart; None when they agree or only one is set.

    The package reads the sform (``img.affine``); a viewer or tool that reads the qform puts the image, and every
    output written on its grid, elsewhere. Said: the largest displacement, the origin's, and per voxel axis a flip,
    a rotation or a different voxel size."""
    header = img.header
    if not hasattr(header, "get_qform") or not hasattr(header, "get_sform"):
        return None
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    if sform is None or qform is None or not scode or not qcode:
        return None
    sform, qform = np.asarray(sform, np.float64), np.asarray(qform, np.float64)
    if not (np.all(np.isfinite(sform)) and np.all(np.isfinite(qform))):
        return None  # geometry_problem names a non-finite sform; a broken unused qform is not worth refusing
    shape = np.asarray(img.shape[:3], dtype=np.float64)
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    apart = float(np.max(np.linalg.norm((corners @ (sform - qform).T)[:, :3], axis=1)))
    if apart <= QFORM_SFORM_TOL_MM:
        return None
    details = []
    origin = float(np.linalg.norm(sform[:3, 3] - qform[:3, 3]))
    if origin > QFORM_SFORM_TOL_MM:
        details.append(f"origin differs by {origin:.1f} mm")
    for axis in range(3):
        s_col, q_col = sform[:3, axis], qform[:3, axis]
        s_len, q_len = float(np.linalg.norm(s_col)), float(np.linalg.norm(q_col))
        name = f"axis {axis + 1} ({'ijk'[axis]})"
        if s_len > 0 and q_len > 0:
            cos = float(np.clip(s_col @ q_col / (s_len * q_len), -1.0, 1.0))
            angle = math.degrees(math.acos(cos))
            if angle > 179.0:
                details.append(f"{name} flipped")
            elif angle * math.pi / 180 * max(shape[axis] - 1, 1) * s_len > QFORM_SFORM_TOL_MM:
                details.append(f"{name} rotated by {angle:.1f}°")
        if abs(s_len - q_len) * max(shape[axis] - 1, 1) > QFORM_SFORM_TOL_MM:
            details.append(f"{name} voxel size {s_len:.4g} vs {q_len:.4g} mm")
    return (f"sform and qform disagree ({', '.join(details) or 'shear'}; voxels up to {apart:.1f} mm apart); this "
            "package reads the sform, a viewer that reads the qform would put the image and its segmentation "
            "elsewhere: fix the header (e.g. copy one form over the other, nibabel img.set_qform(img.get_sform()), "
            "once you know which is right) or set the wrong one's qform_code/sform_code to 0")


def _claimed_bytes(img: nib.Nifti1Image) -> int:
    return math.prod(int(d) for d in img.shape) * np.dtype(img.get_data_dtype()).itemsize


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n}"


def _fmt_zooms(zooms) -> str:
    return "(" + ", ".join(f"{z:.4g}" for z in zooms) + ")"


def _sitk_to_nifti(image) -> nib.Nifti1Image:
    """SimpleITK image (LPS world, array z-y-x) → NIfTI image (RAS affine, array x-y-z)."""
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim != 3:
        raise ValueError(f"expected a 3D image, got {dim}D")
    problem = _components_problem(image.GetPixelIDTypeAsString(), image.GetNumberOfComponentsPerPixel())
    if problem:
        raise _NotScalar(problem)
    array = sitk.GetArrayFromImage(image)  # [Z, Y, X] or [Z, Y, X, C]
    array = np.transpose(array, (2, 1, 0) + tuple(range(3, array.ndim)))
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    affine = _LPS_TO_RAS @ affine
    out = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def _read_sitk_file(path: Path) -> nib.Nifti1Image:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header only
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())  # e.g. "32-bit float", "vector of 16-bit signed integer"
    bits = re.search(r"(\d+)-bit", pixel)
    itemsize = (int(bits.group(1)) // 8 if bits else 8) * (2 if "complex" in pixel else 1)
    capacity, how = _sitk_capacity(path)
    problem = header_size_problem(reader.GetSize(), reader.GetNumberOfComponents() * itemsize, 0, capacity, how)
    if problem:
        raise DataError(path, problem)
    problem = _components_problem(pixel, reader.GetNumberOfComponents())  # before decoding a single voxel
    if problem:
        raise DataError(path, problem)
    return _sitk_to_nifti(reader.Execute())


def _components_problem(pixel: str, components: int) -> str | None:
    """Why a SimpleITK pixel type (``pixel``: e.g. "vector of 8-bit unsigned integer") with ``components`` values
    per voxel is not one real scalar per voxel, or None when it is."""
    if "complex" in pixel.lower():
        return f"complex-valued image ({pixel}); expected one real value per voxel (save the magnitude)"
    if components > 1:
        return f"{MULTI_COMPONENT} ({components} components per voxel, {pixel})"
    return None


class _NotScalar(ValueError):
    """An image with several (or complex) values per voxel, found while converting it; ``read_image`` names the
    file."""


def _text_header(path: Path) -> dict[str, str]:
    """Fields of a MetaImage (``Key = value``, up to ``ElementDataFile``) or NRRD (``key: value``, up to the
    blank line) text header; keys lowercased."""
    nrrd = image_suffix(path) in (".nrrd", ".nhdr")
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_READ)
    fields: dict[str, str] = {}
    for raw in head.split(b"\n"):
        line = raw.decode("latin-1").strip()
        if nrrd and not line and fields:
            break
        if nrrd and (line.startswith("#") or ":=" in line):
            continue  # comments and key:=value pairs
        key, sep, value = line.partition(":" if nrrd else "=")
        key = key.strip().lower()
        if sep and key:
            fields.setdefault(key, value.strip())
        if not nrrd and key == "elementdatafile":
            break
    return fields


def _sitk_capacity(path: Path) -> tuple[float | None, str]:
    """The most bytes of voxel data the file (and its detached data file) can decode to, and why; None when
    the encoding gives no bound (bzip2, lists / patterns of data files)."""
    fields = _text_header(path)
    if image_suffix(path) in (".mha", ".mhd"):
        data_file = fields.get("elementdatafile", "LOCAL")
        ratio = GZIP_MAX_RATIO if fields.get("compresseddata", "false").lower() == "true" else 1
        encoding = "zlib" if ratio > 1 else "raw"
    else:
        data_file = fields.get("data file", fields.get("datafile", "LOCAL"))
        encoding = fields.get("encoding", "raw").lower()
        ratio = {"raw": 1, "gzip": GZIP_MAX_RATIO, "gz": GZIP_MAX_RATIO, "hex": 0.5}.get(encoding)
        if encoding in ("ascii", "text", "txt"):
            ratio = 8  # every value takes at least one character and decodes to at most 8 bytes
    if ratio is None:
        return None, encoding
    if data_file.upper() == "LOCAL":
        files = [path]
    elif data_file.upper().startswith("LIST") or "%" in data_file or " " in data_file:
        return None, "several data files"
    else:
        files = [path.parent / data_file]
        if not files[0].is_file():
            raise DataError(path, f"its data file {data_file} is missing")
    size = sum(f.stat().st_size for f in files)
    where = "" if files == [path] else f" in {files[0].name}"
    return size * ratio, f"{size:,} {encoding} bytes{where}" + (f" x {ratio}" if ratio != 1 else "")


def _dicom_series_files(folder: Path) -> list[str] | None:
    """File names of the (first) DICOM series in ``folder``, or None when it holds none."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        return None
    return list(reader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def _read_dicom_series(folder: Path) -> nib.Nifti1Image:
    import SimpleITK as sitk

    files = _dicom_series_files(folder)
    if not files:
        raise DataError(folder, "folder holds no DICOM series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return _sitk_to_nifti(reader.Execute())


def is_dicom_file(path: str | Path) -> bool:
    """True for a file that starts with the DICOM preamble (``DICM`` at byte 128)."""
    from medseg_diff.data.dicom.study import is_dicom_file as _is_dicom_file

    return _is_dicom_file(path)


def dicom_series_files(path: str | Path) -> list[Path]:
    """The files of the DICOM series ``path`` (one of its files) stands for, in slice order: those with its
    SeriesInstanceUID under its folder (GDCM's scan, as SimpleITK reads them). What a manifest should hash."""
    import pydicom
    import SimpleITK as sitk

    path = Path(path)
    try:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                  .get("SeriesInstanceUID", "") or "")
    except Exception as err:  # pydicom raises many types for a damaged header
        raise DataError(path, f"unreadable DICOM file ({type(err).__name__}: {err})") from None
    if not uid:
        raise DataError(path, "DICOM file without a SeriesInstanceUID")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), uid, False, True)
    if str(path) not in files and path.resolve() not in {Path(f).resolve() for f in files}:
        raise DataError(path, f"is not an image of series {uid} (not a single-frame image with a position?)")
    return [Path(f) for f in files]


def _read_dicom_file_series(path: Path) -> nib.Nifti1Image:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in dicom_series_files(path)])
    return _sitk_to_nifti(reader.Execute())


def n4_bias_correct(path: str | Path, shrink: int = 2, iterations: Sequence[int] = (50, 50, 30)) -> nib.Nifti1Image:
    """N4 bias-field correction (SimpleITK) of one modality; returns a NIfTI image on the same grid.

    For raw clinical scans; BraTS data are already corrected. The mask is Otsu's threshold; the field is
    estimated on a ``shrink``-times subsampled image and applied at full resolution.
    """
    import SimpleITK as sitk

    img = read_image(path)
    array = np.asarray(img.dataobj, dtype=np.float32)
    sitk_img = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)))
    mask = sitk.OtsuThreshold(sitk_img, 0, 1, 200)
    small = sitk.Shrink(sitk_img, [shrink] * 3)
    small_mask = sitk.Shrink(mask, [shrink] * 3)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(iterations))
    corrector.Execute(small, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(sitk_img)
    corrected = sitk_img / sitk.Exp(log_field)
    out = np.transpose(sitk.GetArrayFromImage(corrected), (2, 1, 0)).astype(np.float32)
    return nib.Nifti1Image(out, img.affine, img.header)


class MedsegReader(NibabelReader):
    """MONAI image reader for every format ``read_image`` knows (NIfTI, MHA/NRRD, DICOM folders).

    Thread-safe: ``NibabelReader`` remembers the file names of ``read()`` on the instance for
    ``get_data()``; ``CacheDataset`` fills its cache from several threads through one ``LoadImaged``,
    so one thread's 4 image files could be paired with another thread's label file. The names are kept
    per thread here.
    """

    def __init__(self, *args, **kwargs):
        self._local = threading.local()
        super().__init__(*args, **kwargs)

    @property
    def filenames(self):
        return getattr(self._local, "filenames", ())

    @filenames.setter
    def filenames(self, value) -> None:
        self._local.filenames = value

    def verify_suffix(self, filename) -> bool:
        names = filename if isinstance(filename, (list, tuple)) else [filename]
        return all(image_suffix(n) or Path(n).is_dir() or is_dicom_file(n) for n in names)

    def read(self, data, **kwargs):
        names = data if isinstance(data, (list, tuple)) else [data]
        self.filenames = names
        images = [read_image(n) for n in names]
        return images if len(images) > 1 else images[0]
