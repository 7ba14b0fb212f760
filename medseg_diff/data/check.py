"""``medseg-diff check MANIFEST``: verify that every case of a manifest is usable.

Per case: the manifest entry names every image the pipeline reads (the four modalities, or "4d" for
MSD); every file exists, stays inside the data root (unless the manifest was built with
``follow_symlinks``), its checksum matches, and it decodes fully (no truncation; a header claiming more
voxels than the file holds is refused before decoding); image modalities agree in shape and affine
(tolerance ``AFFINE_ATOL`` on every affine entry: mm for the translation, mm per voxel for the rotation-zoom
part); no NaN/Inf; the brain is not empty (some non-zero voxels in every modality); label values are
integers of the convention and the label grid matches the images. Each problem names case, file and what is
wrong.

One case is one patient: ``check_manifest`` reports the ``manifest.identity_problems`` of every case (a file in
another case's folder, one file for two modalities or two cases, two images of a case with the same SHA-256), and,
from the voxels ``check_case`` decodes anyway (a digest of each image: no image is decoded twice), two images of a
case whose voxels are identical though their bytes differ (a re-saved copy); in a 4D (MSD) image, two identical
channels. An image identical to another case's image (same SHA-256, or same voxels) is a warning naming the pair
(``duplicate_images``): one patient in two cases, or two patients mixed.

One patient, one side of every split: a patient whose (labelled) cases are in two subsets or two folds
(``manifest.split_problems``) is an error of the later case, naming the patient and both cases. ``load_manifest``
refuses such a manifest already, so ``medseg-diff check`` reports it as the manifest's error (status 2);
``check_manifest`` reports it too for a ``Manifest`` built or edited in memory.

Warnings do not fail a case: a modality whose background (the volume's border) is a constant offset > 0
(``background_offset``) breaks "brain = any modality > 0" masks, so it is reported with the fix.

``verify_checksums`` / ``ensure_checksums`` re-hash a manifest's files for ``train`` and ``predict``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg_diff.data.conventions import get_convention
from medseg_diff.data.io import read_array
from medseg_diff.data.manifest import (Manifest, ManifestCase, duplicate_images, identity_problems, sha256_file,
                                       split_problems)
from medseg_diff.errors import DataError, ManifestError

log = logging.getLogger(__name__)

#: Largest allowed absolute difference between two modalities' affine entries.
AFFINE_ATOL = 1e-3
#: Fewest slices along any axis of an image: every network here halves the grid first and uses 3x3x3 kernels, so a
#: thinner slab leaves deeper layers only padding (``inference.case.MIN_VOXELS`` is the same number).
MIN_SLICES = 4
#: At most this many offending values are listed in a message.
_LIST_MAX = 10


@dataclass(frozen=True)
class Problem:
    """One finding of ``check``: ``severity`` "error" (the case is unusable) or "warning" (usable, but see
    the message)."""

    case: str
    file: str
    message: str
    severity: str = "error"

    @property
    def is_warning(self) -> bool:
        return self.severity == "warning"

    def __str__(self) -> str:
        return f"case {self.case}: {self.file}: {'warning: ' if self.is_warning else ''}{self.message}"


def check_manifest(
    manifest: Manifest,
    continue_on_error: bool = False,
    verify_checksums: bool = True,
    on_case: Callable[[ManifestCase, list[Problem]], None] | None = None,
    on_warning: Callable[[Problem], None] | None = None,
) -> list[Problem]:
    """Check every case; stop at the first case with problems unless ``continue_on_error``.

    Returns the errors only (empty: every case is usable); ``on_case`` gets each case's errors. Warnings go
    to ``on_warning`` (default: logged on the ``medseg_diff.data.check`` logger, i.e. stderr in the CLI).
    Files that make a case more than one patient's (``identity_problems``) are errors of the later case, naming
    the earlier file, and so is a patient in two subsets or folds (``split_problems``); images equal to an earlier
    case's (same SHA-256, or same voxels) are warnings naming the pair.
    """
    warn = on_warning or _log_warning
    identity: dict[str, list[Problem]] = {}
    for case_id, file, message in identity_problems(manifest):
        identity.setdefault(case_id, []).append(Problem(case_id, file, message))
    for case_id, message in split_problems(manifest):
        identity.setdefault(case_id, []).append(Problem(case_id, str(manifest.source or "manifest"), message))
    for case_id, file, message in duplicate_images(manifest):
        warn(Problem(case_id, file, message, severity="warning"))
    seen: dict[str, tuple[str, str, Path, str | None]] = {}  # voxel digest -> (case, modality, file, SHA-256)
    problems: list[Problem] = []
    for case in manifest.cases:
        found = identity.get(case.id, []) + list(check_case(manifest, case, verify_checksums, on_warning=on_warning,
                                                            seen=seen))
        if on_case is not None:
            on_case(case, found)
        problems.extend(found)
        if found and not continue_on_error:
            break
    return problems


def check_case(manifest: Manifest, case: ManifestCase, verify_checksums: bool = True,
               on_warning: Callable[[Problem], None] | None = None,
               seen: dict[str, tuple[str, str, Path, str | None]] | None = None) -> Iterator[Problem]:
    """Yield every error of one case (an empty iterator for a good case); warnings go to ``on_warning``
    (default: logged). ``seen``: voxel digests of the images of the cases checked before (filled in), to warn of an
    image whose voxels are another case's."""
    warn = on_warning or _log_warning
    conv = get_convention(manifest.convention)
    # 0. the entry names every image the pipeline reads
    yield from _entry_problems(manifest, case)
    # 1. files exist, stay inside the root, checksums match
    found = list(_file_problems(manifest, case, verify_checksums))
    yield from found
    if any(p.message == "file not found" for p in found):
        return
    # 2. images decode, are finite and non-empty, and agree in grid
    grid: tuple[tuple[int, ...], np.ndarray, str] | None = None
    local: dict[str, tuple[str, str, Path, str | None]] = {}
    for modality, rel in case.images.items():
        path = manifest.path_of(rel)
        try:
            data, affine = read_array(path)
        except DataError as err:
            yield Problem(case.id, str(path), err.problem)
            continue
        errors = list(_image_problems(case.id, path, modality, data, manifest.image_layout))
        yield from errors
        if not errors:
            for warning in _image_warnings(case.id, path, modality, data, manifest.image_layout):
                warn(warning)
            yield from _same_voxels(case, modality, path, _voxel_digest(data), local, seen, warn)
        shape = data.shape[:3]
        if grid is None:
            grid = (shape, affine, str(path))
        else:
            yield from _grid_problems(case.id, path, shape, affine, grid)
    # 3. label decodes, matches the grid, holds only the convention's (integral) values
    if case.label:
        path = manifest.path_of(case.label)
        try:
            label, affine = read_array(path, dtype=np.float64)  # float32 would round 1.0000001 to 1
        except DataError as err:
            yield Problem(case.id, str(path), err.problem)
            return
        if label.ndim != 3:
            yield Problem(case.id, str(path), f"label must be 3D, got shape {label.shape}")
            return
        if not np.all(np.isfinite(label)):
            yield Problem(case.id, str(path), "label contains NaN/Inf")
            return
        for message in label_value_problems(label, conv):
            yield Problem(case.id, str(path), message)
        if grid is not None:
            yield from _grid_problems(case.id, path, label.shape, affine, grid)


def label_value_problems(label: np.ndarray, convention) -> list[str]:
    """What is wrong with the values of a label map under ``convention`` (a ``LabelConvention``): values that
    are not integers (e.g. 1.5 from linear resampling — never rounded silently), and integers the convention
    does not define (e.g. 7, or 4 in BraTS 2023). Empty when every value is valid."""
    values = np.unique(np.asarray(label, dtype=np.float64))
    fractional = values[values != np.round(values)]
    integral = values[values == np.round(values)]
    unknown = [int(v) for v in integral if int(v) not in convention.labels]
    problems = []
    if fractional.size:
        problems.append(
            f"non-integral label values {_short_list([float(v) for v in fractional])}; a label map holds integers "
            "(resampled with linear interpolation? use nearest neighbour)"
        )
    if unknown:
        problems.append(
            f"unknown label values {_short_list(unknown)}; {convention.name} allows {list(convention.labels)}"
        )
    return problems


def background_level(volume: np.ndarray, border: int | None = None, rel_tol: float = 1e-4,
                     min_fraction: float = 0.5) -> float | None:
    """The constant background intensity of a 3D volume, **of either sign**, or None when it is 0 (or noisy, or
    the head fills the border).

    Skull-stripped BraTS volumes are exactly 0 outside the head. Some exports add a constant offset (a TCGA FLAIR:
    0.0219 everywhere outside the head); signed, shifted or z-scored data have a negative one (an int8 volume's
    -128, a z-scored volume's -0.8). The background is read from the volume's border, a shell ``border`` voxels
    thick (default 2% of the smallest side, at least 1): its 25th percentile is the level when at least
    ``min_fraction`` of the border lies within ``rel_tol`` × (max − min of the volume) of it (the rest may be head
    touching the frame); a level within 1e-6 of that span of 0 is a zero background (None). Invariant to
    ``x -> a x + b`` (a > 0): it returns ``a level + b``. Non-finite voxels are ignored; a constant volume gives
    None. Preprocessing subtracts it (``transforms.remove_background_offset``).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"background_level needs a 3D volume, got shape {volume.shape}")
    width = border if border is not None else max(1, int(round(0.02 * min(volume.shape))))
    width = max(1, min(width, min(volume.shape) // 2))
    shell = np.ones(volume.shape, dtype=bool)
    shell[width:-width, width:-width, width:-width] = False
    values = volume[shell].astype(np.float64)
    values = values[np.isfinite(values)]
    finite = volume if np.all(np.isfinite(volume)) else volume[np.isfinite(volume)]
    if values.size == 0 or finite.size == 0:
        return None
    span = float(np.max(finite)) - float(np.min(finite))
    if not span > 0:
        return None
    level = float(np.percentile(values, 25))
    if abs(level) <= 1e-6 * span:  # a zero background, up to float noise
        return None
    if float(np.mean(np.abs(values - level) <= rel_tol * span)) < min_fraction:
        return None  # a noisy background (or head on most of the border), not a constant
    return level


def background_offset(volume: np.ndarray, border: int | None = None, rel_tol: float = 1e-4,
                      min_fraction: float = 0.5) -> float | None:
    """The constant background of ``background_level`` when it is > 0 (what ``check`` warns about: tools that take
    "brain = any modality > 0" would cover the whole frame), else None."""
    level = background_level(volume, border, rel_tol, min_fraction)
    return level if level is not None and level > 0 else None


def verify_checksums(
    manifest: Manifest,
    cases: Iterable[ManifestCase] | None = None,
    on_case: Callable[[ManifestCase, list[Problem]], None] | None = None,
) -> list[Problem]:
    """Re-hash the files of ``cases`` (default: every case of the manifest) and compare with the SHA-256 the
    manifest recorded. Returns one ``Problem`` per missing file, file without a recorded checksum or changed
    file (empty: every byte is what the manifest saw); ``on_case(case, problems)`` after each case."""
    problems: list[Problem] = []
    for case in manifest.cases if cases is None else cases:
        found = list(_file_problems(manifest, case, verify=True, containment=False))
        if on_case is not None:
            on_case(case, found)
        problems.extend(found)
    return problems


def ensure_checksums(manifest: Manifest, cases: Iterable[ManifestCase] | None = None,
                     on_case: Callable[[ManifestCase, list[Problem]], None] | None = None) -> None:
    """``verify_checksums``, raising ``ManifestError`` (naming the first bad file and case, and how many
    others) when anything differs; what ``train`` and ``predict`` call before using a manifest."""
    problems = verify_checksums(manifest, cases, on_case)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more; see `medseg-diff check {manifest.source or 'MANIFEST'} " \
               f"--continue-on-error`)" if len(problems) > 1 else ""
        raise ManifestError(first.file, f"{first.message}{more}", case=first.case)


def _entry_problems(manifest: Manifest, case: ManifestCase) -> Iterator[Problem]:
    where = str(manifest.source) if manifest.source else "manifest"
    missing = manifest.missing_images(case)
    if missing:
        yield Problem(case.id, where, f"manifest entry has no image for {', '.join(repr(k) for k in missing)} "
                                      f"(it has {', '.join(repr(k) for k in case.images) or 'none'}; "
                                      f"{manifest.image_layout} layout needs {', '.join(manifest.image_keys)})")
    extra = [k for k in case.images if k not in manifest.image_keys]
    if extra:
        yield Problem(case.id, where, f"manifest entry has unknown image key(s) {', '.join(repr(k) for k in extra)} "
                                      f"(expected {', '.join(manifest.image_keys)})")


def _file_problems(manifest: Manifest, case: ManifestCase, verify: bool, containment: bool = True
                   ) -> Iterator[Problem]:
    """Missing files, files resolving outside the root (``containment``) and checksum mismatches (``verify``)."""
    for rel in list(case.images.values()) + ([case.label] if case.label else []):
        path = manifest.path_of(rel)
        if not path.exists():
            yield Problem(case.id, str(path), "file not found")
            continue
        if containment and not manifest.follow_symlinks:
            target = path.resolve()
            if not target.is_relative_to(manifest.root.resolve()):
                yield Problem(case.id, str(path), f"resolves outside the data root {manifest.root} (to {target}); "
                                                  "rebuild the manifest with follow_symlinks to allow it")
        expected = case.sha256.get(rel)
        if verify and expected is None:
            yield Problem(case.id, str(path), "no checksum recorded in the manifest")
        elif verify and sha256_file(path) != expected:
            yield Problem(case.id, str(path), "checksum changed since the manifest was built (SHA-256 mismatch)")


def _channels(data: np.ndarray, modality: str, layout: str) -> list[tuple[str, np.ndarray]]:
    if layout == "4d":
        return [(f"channel {c}", data[..., c]) for c in range(data.shape[-1])]
    return [(modality, data)]


def _image_problems(case_id: str, path: Path, modality: str, data: np.ndarray, layout: str) -> Iterator[Problem]:
    expected_ndim = 4 if layout == "4d" else 3
    if data.ndim != expected_ndim:
        yield Problem(case_id, str(path), f"{modality}: expected a {expected_ndim}D image, got shape {data.shape}")
        return
    if layout == "4d" and data.shape[3] != 4:
        yield Problem(case_id, str(path), f"expected 4 channels (FLAIR, T1w, t1gd, T2w), got {data.shape[3]}")
    thin = [(axis, n) for axis, n in enumerate(data.shape[:3]) if n < MIN_SLICES]
    if thin:  # the networks halve the grid first and use 3x3x3 kernels (inference.case.MIN_VOXELS, the same number)
        axis, n = thin[0]
        yield Problem(case_id, str(path), f"{modality}: {n} slice{'s' if n != 1 else ''} along axis {axis + 1} "
                                          f"({'ijk'[axis]}); the model needs at least {MIN_SLICES}: a slab this thin "
                                          "is an image, not a volume")
        return
    finite = np.isfinite(data)
    if not finite.all():
        yield Problem(case_id, str(path), f"{modality}: {int((~finite).sum())} NaN/Inf voxels")
        return
    usable = []
    for what, channel in _channels(data, modality, layout):
        if not np.any(channel):
            yield Problem(case_id, str(path), f"{what}: empty volume (all voxels are zero)")
        elif float(channel.max()) == float(channel.min()):
            yield Problem(case_id, str(path), f"{what}: constant volume (value {float(channel.max())})")
        else:
            usable.append((what, channel))
    for i, (what, channel) in enumerate(usable):  # 4D: one modality copied into another's channel
        same = next((other for other, earlier in usable[:i] if np.array_equal(channel, earlier)), None)
        if same is not None:
            yield Problem(case_id, str(path), f"{what} holds the same voxels as {same}: a modality copied into "
                                              "another's channel; each channel needs its own image")


def _voxel_digest(data: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and values (in Fortran order, the order NIfTI readers return)."""
    array = np.asfortranarray(data)
    digest = hashlib.sha256(f"{array.shape} {array.dtype}\n".encode())
    digest.update(array.T.data)  # the transpose of a Fortran-ordered array is C-contiguous: no copy
    return digest.hexdigest()


def _same_voxels(case: ManifestCase, modality: str, path: Path, digest: str,
                 local: dict[str, tuple[str, str, Path, str | None]],
                 seen: dict[str, tuple[str, str, Path, str | None]] | None,
                 warn: Callable[[Problem], None]) -> Iterator[Problem]:
    """An image whose voxels equal another modality's of the case (``local``: an error) or another case's image
    (``seen``: a warning); pairs with equal SHA-256 are left to ``identity_problems`` / ``duplicate_images``
    (reported once)."""
    entry = (case.id, modality, path, _sha_of(case, modality))
    if digest in local:
        _, other, other_path, other_sha = local[digest]
        if not (entry[3] and entry[3] == other_sha):
            yield Problem(case.id, str(path), f"{modality} has the same voxels as {other} ({other_path}), though not "
                                              "the same bytes: a modality copied over another; each modality needs "
                                              "its own image")
        return
    local[digest] = entry
    if seen is None:
        return
    if digest in seen and seen[digest][0] != case.id:
        other_case, other, other_path, other_sha = seen[digest]
        if not (entry[3] and entry[3] == other_sha):
            warn(Problem(case.id, str(path), f"{modality} has the same voxels as case {other_case}'s {other} "
                                             f"({other_path}), though not the same bytes: one patient in two cases, "
                                             "or two patients mixed; remove the duplicate", severity="warning"))
        return
    seen.setdefault(digest, entry)


def _sha_of(case: ManifestCase, key: str) -> str | None:
    rel = case.images.get(key)
    return case.sha256.get(rel) if rel is not None else None


def _image_warnings(case_id: str, path: Path, modality: str, data: np.ndarray, layout: str) -> Iterator[Problem]:
    for what, channel in _channels(data, modality, layout):
        offset = background_offset(channel)
        if offset is not None:
            yield Problem(
                case_id, str(path),
                f"{what}: constant background {offset:.4g} outside the head (not 0); preprocessing subtracts it, but "
                "other tools that take 'brain = any modality > 0' would cover the whole frame",
                severity="warning",
            )


def _log_warning(problem: Problem) -> None:
    log.warning("%s", problem)


def _short_list(values: list) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:_LIST_MAX])
    return f"[{shown}{', ...' if len(values) > _LIST_MAX else ''}]"


def grid_mismatch(shape, affine, ref_shape, ref_affine, ref_path) -> list[str]:
    """What differs between a volume's grid and a reference grid (shape; affine beyond ``AFFINE_ATOL`` mm):
    the one grid rule of the package, used by ``check``, ``predict`` and ``evaluate``. Empty when they agree."""
    problems = []
    if tuple(shape[:3]) != tuple(ref_shape[:3]):
        problems.append(f"shape {tuple(shape[:3])} differs from {tuple(ref_shape[:3])} of {ref_path}")
    diff = float(np.max(np.abs(np.asarray(affine) - np.asarray(ref_affine))))
    if diff > AFFINE_ATOL:
        problems.append(f"affine differs from that of {ref_path} by up to {diff:.4g} (tolerance {AFFINE_ATOL})")
    return problems


def _grid_problems(case_id, path, shape, affine, grid) -> Iterator[Problem]:
    ref_shape, ref_affine, ref_path = grid
    for problem in grid_mismatch(shape, affine, ref_shape, ref_affine, ref_path):
        yield Problem(case_id, str(path), problem)
