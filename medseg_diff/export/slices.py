"""Which slices the montage shows, and how a volume becomes a 2D panel in display orientation.

Display orientation does not depend on how the file stores its voxels: every array is first
reoriented to RAS (``nibabel.orientations``, closest axes of the affine), then sliced in the
**radiological convention** — the patient's right on the image left; axial seen from the feet with
anterior up, coronal seen from the front with superior up, sagittal with anterior on the left and
superior up. Pixels keep their size in mm (``Panel.pixel_mm``), so anisotropic voxels keep their true aspect.
An LPS file and a RAS file of the same head give identical panels (:func:`montage_panels`).

Slices go through the centre of the **largest connected lesion** of the predicted whole tumour, so scattered
false positives do not pull them off the tumour; the ground-truth row goes through the truth's own largest
lesion when that lies more than ``SAME_SLICES_MM`` away. Drawing the panels is ``export.montage``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from medseg_diff.data.conventions import REGIONS
from medseg_diff.predictions.types import CaseOverlay

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: letters at the (left, right, top, bottom) edges of each view
EDGES: dict[str, tuple[str, str, str, str]] = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
#: the ground-truth row gets its own slices when its largest lesion's centre is farther than this (mm, any axis)
SAME_SLICES_MM = 5.0
_MARGIN = 4  # voxels kept around the brain's bounding box


@dataclass(frozen=True)
class Panel:
    """One view's 2D arrays, already in display orientation (row 0 at the top, column 0 at the left)."""

    view: str  # "axial" | "coronal" | "sagittal"
    image: np.ndarray  # [rows, cols] grey MRI of the main underlay (FLAIR), raw intensities
    regions: np.ndarray  # [3, rows, cols] bool, REGIONS order (TC, WT, ET)
    truth: np.ndarray | None  # [3, rows, cols] bool, ground-truth regions
    attention: dict[str, np.ndarray]  # name -> [rows, cols] normalised to [0, 1]
    uncertainty: np.ndarray | None  # [rows, cols] predictive entropy
    pixel_mm: tuple[float, float]  # (row height, column width) in mm
    position: str  # where the slice is, e.g. "S +12.0 mm"
    brain: np.ndarray | None = None  # [rows, cols] bool
    variance: np.ndarray | None = None  # [rows, cols] ensemble member variance
    underlays: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> [rows, cols] grey, image included

    @property
    def size_mm(self) -> tuple[float, float]:
        """(height, width) of the panel in mm."""
        return self.image.shape[0] * self.pixel_mm[0], self.image.shape[1] * self.pixel_mm[1]


@dataclass(frozen=True)
class RasFrame:
    """How to turn a file-ordered ``[X, Y, Z]`` array into a RAS-ordered, brain-cropped one."""

    transform: np.ndarray  # nibabel orientation transform, file axes -> RAS
    affine: np.ndarray  # [4, 4] RAS voxel -> world
    box: tuple[slice, slice, slice]  # crop in RAS voxels

    @classmethod
    def from_affine(cls, affine: np.ndarray, brain: np.ndarray) -> "RasFrame":
        transform = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
        ras_affine = affine @ inv_ornt_aff(transform, brain.shape)
        ras_brain = apply_orientation(brain, transform)
        return cls(transform, ras_affine, _bounding_box(ras_brain))

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """``[X, Y, Z]`` file order -> ``[x, y, z]`` RAS order, cropped to the brain."""
        return np.ascontiguousarray(apply_orientation(np.asarray(array), self.transform)[self.box])

    @property
    def zooms(self) -> np.ndarray:
        """Voxel size in mm along R, A, S."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def world(self, index: tuple[int, int, int]) -> np.ndarray:
        """World (RAS mm) coordinates of a voxel of the cropped RAS array."""
        full = np.array([i + s.start for i, s in zip(index, self.box)] + [1.0])
        return (self.affine @ full)[:3]


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    nonzero = np.nonzero(mask)
    return tuple(
        slice(max(int(ax.min()) - _MARGIN, 0), min(int(ax.max()) + _MARGIN + 1, n))
        for ax, n in zip(nonzero, mask.shape)
    )


def display_slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """2D display array of a RAS-ordered ``[x, y, z]`` volume (radiological convention, see module doc)."""
    if view == "axial":  # rows anterior -> posterior, columns right -> left
        return volume[::-1, ::-1, index].T
    if view == "coronal":  # rows superior -> inferior, columns right -> left
        return volume[::-1, index, ::-1].T
    if view == "sagittal":  # rows superior -> inferior, columns anterior -> posterior
        return volume[index, ::-1, ::-1].T
    raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")


def _pixel_mm(zooms: np.ndarray, view: str) -> tuple[float, float]:
    zx, zy, zz = (float(z) for z in zooms)
    return {"axial": (zy, zx), "coronal": (zz, zx), "sagittal": (zz, zy)}[view]


def tumour_centre(whole_tumour: np.ndarray) -> tuple[int, int, int]:
    """Centre voxel of a RAS ``[x, y, z]`` mask: its centre of mass, each coordinate moved to the nearest
    slice that contains tumour (a crescent's centre of mass can lie outside it); the array centre if empty."""
    if not whole_tumour.any():
        return tuple(n // 2 for n in whole_tumour.shape)
    coords = np.nonzero(whole_tumour)
    centre = []
    for along_axis in coords:
        occupied = np.unique(along_axis)
        centre.append(int(occupied[np.argmin(np.abs(occupied - along_axis.mean()))]))
    return tuple(centre)


def largest_lesion(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a bool ``[x, y, z]`` mask (the first of equal ones); empty stays."""
    pieces, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return np.asarray(mask, dtype=bool)
    sizes = np.bincount(pieces.ravel())[1:]
    return pieces == int(np.argmax(sizes)) + 1


def lesion_centre(whole_tumour: np.ndarray) -> tuple[int, int, int]:
    """:func:`tumour_centre` of the :func:`largest_lesion`: scattered false positives do not move it."""
    return tumour_centre(largest_lesion(whole_tumour))


@dataclass(frozen=True)
class _RasLayers:
    """Every layer of the montage as a RAS-ordered, brain-cropped volume."""

    grey: dict[str, np.ndarray]  # underlay modality -> [x, y, z]; the first is the main one (FLAIR)
    regions: np.ndarray  # [x, y, z, 3] bool
    truth: np.ndarray | None  # [x, y, z, 3] bool
    attention: dict[str, np.ndarray]  # name -> [x, y, z] in [0, 1]
    uncertainty: np.ndarray | None  # [x, y, z]
    variance: np.ndarray | None  # [x, y, z]
    brain: np.ndarray  # [x, y, z] bool

    def panel(self, view: str, index: int, pixel_mm: tuple[float, float], position: str) -> Panel:
        def cut(volume: np.ndarray | None) -> np.ndarray | None:
            return None if volume is None else np.ascontiguousarray(display_slice(volume, view, index))

        def cut_regions(volume: np.ndarray | None) -> np.ndarray | None:
            return None if volume is None else np.stack([cut(volume[..., r]) for r in range(volume.shape[-1])])

        underlays = {name: cut(volume) for name, volume in self.grey.items()}
        return Panel(
            view=view, image=next(iter(underlays.values())), regions=cut_regions(self.regions),
            truth=cut_regions(self.truth), attention={name: cut(v) for name, v in self.attention.items()},
            uncertainty=cut(self.uncertainty), pixel_mm=pixel_mm, position=position, brain=cut(self.brain),
            variance=cut(self.variance), underlays=underlays,
        )


class Slicer:
    """The RAS layers of a case and the slices through a centre voxel."""

    def __init__(self, overlay: CaseOverlay, affine: np.ndarray):
        frame = RasFrame.from_affine(np.asarray(affine, dtype=float), overlay.brain_mask)

        def regions_of(labels: np.ndarray) -> np.ndarray:
            return frame(np.moveaxis(overlay.convention.to_regions(labels), 0, -1))

        def maybe(volume: np.ndarray | None) -> np.ndarray | None:
            return None if volume is None else frame(np.asarray(volume, dtype=np.float32))

        contrast = overlay.contrast_modality
        underlays = [overlay.grey_modality] + ([contrast] if contrast not in (None, overlay.grey_modality) else [])
        self.frame = frame
        self.layers = _RasLayers(
            grey={m: frame(np.asarray(overlay.images[m], dtype=np.float32)) for m in underlays},
            regions=regions_of(overlay.labels),
            truth=None if overlay.ground_truth is None else regions_of(overlay.ground_truth),
            attention={name: frame(overlay.relative_attention(name)) for name in overlay.attention},
            uncertainty=maybe(overlay.uncertainty), variance=maybe(overlay.variance), brain=frame(overlay.brain_mask),
        )

    def centres(self) -> tuple[tuple[int, int, int], tuple[int, int, int] | None]:
        """(centre of the prediction rows, the truth row's own centre or None when it uses the same slices).

        The prediction rows go through the predicted whole tumour's largest lesion (the truth's when nothing is
        predicted, the brain's centre when neither has tumour)."""
        whole = REGIONS.index("WT")
        predicted = self.layers.regions[..., whole]
        truth = None if self.layers.truth is None else self.layers.truth[..., whole]
        source = predicted if predicted.any() or truth is None else truth
        centre = lesion_centre(source)
        if truth is None or not truth.any() or source is truth:
            return centre, None
        own = lesion_centre(truth)
        apart_mm = np.abs(np.subtract(own, centre)) * self.frame.zooms
        return centre, (own if (apart_mm > SAME_SLICES_MM).any() else None)

    def panels(self, centre: tuple[int, int, int]) -> list[Panel]:
        world = self.frame.world(centre)
        return [
            self.layers.panel(view, centre[axis], _pixel_mm(self.frame.zooms, view),
                              f"{'RAS'[axis]} {world[axis]:+.1f} mm")
            for axis, view in ((2, "axial"), (1, "coronal"), (0, "sagittal"))
        ]


def montage_slices(overlay: CaseOverlay, affine: np.ndarray) -> tuple[list[Panel], list[Panel] | None]:
    """The panels (axial, coronal, sagittal) of the prediction rows, and those of the ground-truth row when it
    goes through the truth's own largest lesion (None: no truth, or it uses the prediction's slices).

    ``affine`` is the reference's voxel-to-world matrix (the grid of every array in ``overlay``).
    """
    slicer = Slicer(overlay, affine)
    centre, own = slicer.centres()
    return slicer.panels(centre), None if own is None else slicer.panels(own)


def montage_panels(overlay: CaseOverlay, affine: np.ndarray) -> list[Panel]:
    """The three panels of the prediction rows (see :func:`montage_slices`), in display orientation."""
    return montage_slices(overlay, affine)[0]
