"""Reading volumes: NIfTI through nibabel; MHA/MHD/NRRD and DICOM series through SimpleITK.

Every reader returns a ``nibabel.Nifti1Image`` whose affine maps voxel indices to RAS+ world
coordinates (the NIfTI convention), so the rest of the package sees one kind of image. SimpleITK
images (LPS world, z-y-x arrays) are converted with their geometry kept: the array is transposed
to x-y-z and the direction/spacing/origin become an affine, flipped LPS → RAS.

``MedsegReader`` plugs the same reader into MONAI's ``LoadImage(d)``.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import NibabelReader
from nibabel.filebasedimages import ImageFileError

from medseg_diff.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES

#: LPS <-> RAS: negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_suffix(path: str | Path) -> str:
    """The recognised suffix of ``path`` ('.nii.gz', '.mha', ...) or '' for a DICOM folder / unknown."""
    name = str(path).lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def is_image_path(path: Path) -> bool:
    """True for a file of a supported format or a folder that holds a DICOM series."""
    if path.is_dir():
        return _dicom_series_files(path) is not None
    return image_suffix(path) != "" and not path.name.startswith("._")


def read_image(path: str | Path) -> nib.Nifti1Image:
    """Read one image file (or DICOM folder) as a NIfTI image with a RAS affine.

    Raises ``DataError`` naming the file when it is missing, truncated or not an image.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    try:
        if path.is_dir():
            return _read_dicom_series(path)
        suffix = image_suffix(path)
        if suffix in NIFTI_SUFFIXES:
            return _read_nifti(path)
        if suffix in SITK_SUFFIXES:
            return _read_sitk_file(path)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, RuntimeError, ImageFileError) as err:
        raise DataError(path, f"unreadable image ({type(err).__name__}: {err})") from err
    raise DataError(path, f"unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)} or a DICOM folder")


def read_array(path: str | Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """``(array [X, Y, Z(, C)], affine 4x4)`` of an image file; the whole file is decoded."""
    img = read_image(path)
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise DataError(path, f"truncated or corrupt image data ({type(err).__name__}: {err})") from err
    return data, np.asarray(img.affine, dtype=np.float64)


def _read_nifti(path: Path) -> nib.Nifti1Image:
    img = nib.load(str(path))
    if len(img.shape) not in (3, 4):
        raise DataError(path, f"expected a 3D or 4D image, got shape {img.shape}")
    if not np.all(np.isfinite(img.affine)):
        raise DataError(path, "affine contains NaN/Inf")
    return img


def _sitk_to_nifti(image) -> nib.Nifti1Image:
    """SimpleITK image (LPS world, array z-y-x) → NIfTI image (RAS affine, array x-y-z)."""
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim != 3:
        raise ValueError(f"expected a 3D image, got {dim}D")
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

    return _sitk_to_nifti(sitk.ReadImage(str(path)))


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
        return all(image_suffix(n) or Path(n).is_dir() for n in names)

    def read(self, data, **kwargs):
        names = data if isinstance(data, (list, tuple)) else [data]
        self.filenames = names
        images = [read_image(n) for n in names]
        return images if len(images) > 1 else images[0]
