"""PNG montage of one case: axial / coronal / sagittal slices through the largest predicted lesion.

Display orientation does not depend on how the file stores its voxels: every array is first
reoriented to RAS (``nibabel.orientations``, closest axes of the affine), then sliced in the
**radiological convention** — the patient's right on the image left; axial seen from the feet with
anterior up, coronal seen from the front with superior up, sagittal with anterior on the left and
superior up. Pixels are drawn at their size in mm, so anisotropic voxels keep their true aspect.
An LPS file and a RAS file of the same head give identical panels (:func:`montage_panels`).

Rows (:func:`montage_rows`): the prediction's region contours on FLAIR and on T1ce (enhancing tumour is judged
on T1ce), the ground truth's, one row per attention map, the predictive entropy and the ensemble variance.
Slices go through the centre of the **largest connected lesion** of the predicted whole tumour, so scattered
false positives do not pull them off the tumour; the ground-truth row goes through the truth's own largest
lesion when that lies more than ``SAME_SLICES_MM`` away. Heat maps use the scales of :func:`heat_scale`:
fixed, absolute ones for entropy and variance (one scale for every model and case, values above the top
marked); attention as a multiple of the brain's average, coloured inside the brain above 1x on the fixed
scale 1x to ``ATTENTION_SCALE_TOP``.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass, field

import matplotlib
import numpy as np
from matplotlib import patheffects
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from medseg_diff.data.conventions import REGIONS
from medseg_diff.export.types import (
    ATTENTION_SCALE_TOP,
    ENTROPY_SCALE_TOP,
    REGION_NAMES,
    REGION_RGB,
    VARIANCE_SCALE_TOP,
    CaseOverlay,
)

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: letters at the (left, right, top, bottom) edges of each view
EDGES: dict[str, tuple[str, str, str, str]] = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
#: the ground-truth row gets its own slices when its largest lesion's centre is farther than this (mm, any axis)
SAME_SLICES_MM = 5.0
#: region -> contour line width in points, drawn widest first: where outlines coincide the narrower line lies on
#: the wider one, so every colour shows. Every line is solid and sits on a dark halo (visible on bright FLAIR).
CONTOUR_WIDTHS: dict[str, float] = {"WT": 4.0, "TC": 3.0, "ET": 1.2}
HALO_POINTS = 2.0  # the halo is this much wider than its line
HALO_RGB = (0.0, 0.0, 0.0)
#: colour of heat-map values above the top of a fixed scale (the colour bar's top reads "≥ top"): Okabe-Ito
#: orange, used for nothing else (white would be lost on bright FLAIR tumour)
OVER_RGB = (230 / 255, 159 / 255, 0.0)
_DIM = 0.6  # brightness of the grey underlay under heat maps
_ALPHA_RAMP = 0.3  # heat-map opacity rises from 0 at the bottom of its scale to its maximum at 30 % of it
CAPTION = (
    "Radiological convention: patient's right on the image left (see the letters at the panel edges). Axial seen "
    "from the feet, anterior up; coronal seen from the front; sagittal with anterior on the left. "
    "Slices through the centre of the largest predicted lesion, at true voxel size; positions are scanner "
    "coordinates in mm. Each row names its grey underlay. Outlines are solid; where they coincide the narrower "
    "lies on the wider.",
    "Entropy and variance use fixed scales, the same for every case and model; orange marks values above the top "
    "of the scale. Attention (a multiple of the brain's average) is shown only inside the brain, where above "
    "average; it is a model-internal weight, not a clinical finding.",
    "Research use only - not for clinical decisions.",
)
_ROW_INCHES = 2.9
_SIDE_INCHES = 2.5
_MARGIN = 4  # voxels kept around the brain's bounding box
_FINE = 4  # contour grid refinement, so outlines follow voxel edges
_BACKGROUND = "#111111"
_TEXT = "#eeeeee"


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
class MontageRow:
    """One row of the montage: what it shows and on which grey underlay."""

    kind: str  # "seg" | "truth" | "attention" | "uncertainty" | "variance"
    name: str | None  # the attention map's name
    underlay: str  # modality key of the grey image
    title: str  # bold title at the left of the row
    subtitle: str  # smaller second line, e.g. "on FLAIR"
    own_slices: bool = False  # the ground-truth row through the truth's own largest lesion


@dataclass(frozen=True)
class RenderedMontage:
    """The PNG and the rows it shows (the report says which underlay each row uses)."""

    png: bytes
    rows: list[MontageRow]
    positions: tuple[str, ...]  # slice positions of the prediction rows (axial, coronal, sagittal)


@dataclass(frozen=True)
class HeatScale:
    """How a heat map's values become colours: ``cmap`` over [low, top]; values at or below ``low`` and outside
    the brain are transparent; with ``over_range``, values above ``top`` are drawn in ``OVER_RGB``."""

    low: float
    top: float
    cmap: str
    label: str  # colour-bar label
    max_alpha: float
    over_range: bool  # values can exceed ``top``: the colour bar's top reads "≥ top"
    over_colour: bool = True  # ... and they are drawn in ``OVER_RGB`` (else in the colour map's top colour)


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


class _Slicer:
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
    slicer = _Slicer(overlay, affine)
    centre, own = slicer.centres()
    return slicer.panels(centre), None if own is None else slicer.panels(own)


def montage_panels(overlay: CaseOverlay, affine: np.ndarray) -> list[Panel]:
    """The three panels of the prediction rows (see :func:`montage_slices`), in display orientation."""
    return montage_slices(overlay, affine)[0]


def montage_rows(overlay: CaseOverlay, own_truth_slices: bool = False) -> list[MontageRow]:
    """The rows of the montage, top to bottom, each with its grey underlay."""
    grey, contrast = overlay.grey_modality, overlay.contrast_modality

    def on(modality: str) -> str:
        return f"on {overlay.modality_name(modality)}"

    rows = [MontageRow("seg", None, grey, "Prediction", on(grey))]
    if contrast is not None and contrast != grey:
        rows.append(MontageRow("seg", None, contrast, "Prediction", on(contrast)))
    if overlay.ground_truth is not None:
        subtitle = on(grey) + (", own slices" if own_truth_slices else "")
        rows.append(MontageRow("truth", None, grey, "Ground truth", subtitle, own_slices=own_truth_slices))
    rows += [MontageRow("attention", name, grey, f"Attention: {name}", on(grey)) for name in overlay.attention]
    if overlay.uncertainty is not None:
        rows.append(MontageRow("uncertainty", None, grey, "Entropy", on(grey)))
    if overlay.variance is not None:
        rows.append(MontageRow("variance", None, grey, "Member variance", on(grey)))
    return rows


def heat_scale(overlay: CaseOverlay, kind: str, name: str | None = None) -> HeatScale:
    """The colour scale of a heat-map row. Entropy and variance: fixed and absolute, the same for every model and
    case (0 to ``ENTROPY_SCALE_TOP`` / ``VARIANCE_SCALE_TOP``, values above drawn in ``OVER_RGB``). Attention:
    multiples of the brain's average, 1 to ``ATTENTION_SCALE_TOP`` (fixed; values above in the top colour);
    voxels at or below the average are not coloured."""
    if kind == "attention":
        return HeatScale(1.0, ATTENTION_SCALE_TOP, "inferno",
                         "attention, \u00d7 the brain's average;\ncoloured above average", 0.6, True, False)
    if kind == "uncertainty":
        units = overlay.uncertainty_units
        return HeatScale(0.0, ENTROPY_SCALE_TOP[units], "viridis", f"predictive entropy ({units})", 0.8, True)
    if kind == "variance":
        return HeatScale(0.0, VARIANCE_SCALE_TOP, "viridis", "variance across members", 0.8, True)
    raise ValueError(f"no heat scale for row kind {kind!r}")


def heat_rgba(values: np.ndarray, scale: HeatScale, brain: np.ndarray | None = None) -> np.ndarray:
    """``[..., 4]`` colours of ``values`` on ``scale``: transparent at or below ``scale.low`` and outside
    ``brain``; opacity rising to ``scale.max_alpha`` over the first 30 % of the scale; above ``scale.top``
    (with ``over_range``) ``OVER_RGB`` at full ``max_alpha``."""
    values = np.asarray(values, dtype=np.float32)
    fraction = (values - scale.low) / max(scale.top - scale.low, 1e-12)
    rgba = matplotlib.colormaps[scale.cmap](np.clip(fraction, 0.0, 1.0))
    alpha = scale.max_alpha * np.clip(fraction / _ALPHA_RAMP, 0.0, 1.0)
    if scale.over_range and scale.over_colour:
        over = values > scale.top
        rgba[over, :3] = OVER_RGB
        alpha[over] = scale.max_alpha
    alpha[values <= scale.low] = 0.0
    if brain is not None:
        alpha[~np.asarray(brain, dtype=bool)] = 0.0
    rgba[..., 3] = alpha
    return rgba


def colour_bar_ticks(scale: HeatScale) -> tuple[list[float], list[str]]:
    """Tick values and labels of a heat scale's colour bar; an over-range top reads "≥ top"."""
    values = [scale.low, (scale.low + scale.top) / 2, scale.top]
    labels = [f"{v:.2g}" for v in values]
    if scale.over_range:
        labels[-1] = f"\u2265 {scale.top:.2g}"
    return values, labels


def render_montage(overlay: CaseOverlay, affine: np.ndarray, dpi: int = 120) -> RenderedMontage:
    """The montage PNG (rows of :func:`montage_rows`, columns axial / coronal / sagittal) and its rows."""
    slicer = _Slicer(overlay, affine)
    centre, own = slicer.centres()
    panels = slicer.panels(centre)
    truth_panels = panels if own is None else slicer.panels(own)
    rows = montage_rows(overlay, own_truth_slices=own is not None)
    fig, grid = _figure(panels, len(rows))
    windows = {m: _window(overlay, m) for m in {row.underlay for row in rows}}
    for r, row in enumerate(rows):
        scale = None if row.kind in ("seg", "truth") else heat_scale(overlay, row.kind, row.name)
        row_panels = truth_panels if row.kind == "truth" else panels
        for c, panel in enumerate(row_panels):
            ax = fig.add_subplot(grid[r, c])
            _draw_panel(ax, panel, row, windows[row.underlay], scale)
            if r == 0 or row.own_slices:
                ax.set_title(f"{panel.view.capitalize()}   {panel.position}", color=_TEXT, fontsize=10)
            if c == 0:
                _row_title(ax, row)
        _draw_side(fig.add_subplot(grid[r, len(panels)]), row, scale, _peak(overlay, row))
    _titles(fig, overlay)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor=_BACKGROUND, metadata={"Software": "medseg-diff"})
    return RenderedMontage(buffer.getvalue(), rows, tuple(p.position for p in panels))


def _figure(panels: list[Panel], n_rows: int) -> tuple[Figure, GridSpec]:
    """A figure and its grid of cells; the panel cells share one mm-to-inch scale."""
    height_mm = max(p.size_mm[0] for p in panels)
    widths = [_ROW_INCHES * p.size_mm[1] / height_mm for p in panels] + [_SIDE_INCHES]
    top, bottom, left, gap = 0.95, 1.3, 0.75, 0.3
    width = left + sum(widths) + gap * len(widths)
    height = top + bottom + n_rows * (_ROW_INCHES + gap)
    fig = Figure(figsize=(width, height), facecolor=_BACKGROUND)
    grid = fig.add_gridspec(
        n_rows, len(widths), width_ratios=widths,
        left=left / width, right=1 - 0.05 / width, top=1 - top / height, bottom=bottom / height,
        wspace=gap * len(widths) / sum(widths), hspace=gap / _ROW_INCHES,
    )
    return fig, grid


def _window(overlay: CaseOverlay, modality: str) -> tuple[float, float]:
    """Grey display range of a modality: 0.5th-99.5th percentile of its brain voxels."""
    values = np.asarray(overlay.images[modality], dtype=np.float32)[overlay.brain_mask]
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1.0)


def _rgb(region: str) -> tuple[float, float, float]:
    return tuple(v / 255 for v in REGION_RGB[region])


def _draw_panel(ax, panel: Panel, row: MontageRow, grey_range, scale: HeatScale | None) -> None:
    height, width = panel.size_mm
    extent = (0.0, width, height, 0.0)
    low, high = grey_range
    if scale is not None:  # heat-map rows: anatomy dimmed to 60 % so the colours stand out on bright tissue
        high = low + (high - low) / _DIM
    ax.imshow(panel.underlays.get(row.underlay, panel.image), cmap="gray", vmin=low, vmax=high, extent=extent,
              interpolation="nearest")
    if scale is None:
        masks = panel.regions if row.kind == "seg" else panel.truth
        _outlines(ax, panel, {r: masks[REGIONS.index(r)] for r in CONTOUR_WIDTHS}, CONTOUR_WIDTHS)
    else:
        values = panel.attention[row.name] if row.kind == "attention" else getattr(panel, row.kind)
        ax.imshow(heat_rgba(values, scale, panel.brain), extent=extent, interpolation="nearest")
        _outlines(ax, panel, {"WT": panel.regions[REGIONS.index("WT")]}, {"WT": 1.4})
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_facecolor("black")
    ax.set_anchor("N")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    _edge_letters(ax, panel.view)


def _outlines(ax, panel: Panel, masks: dict[str, np.ndarray], widths: dict[str, float]) -> None:
    """Solid region outlines on a dark halo: every halo first, then the colours, widest first."""
    for region, width in widths.items():
        _contour(ax, panel, masks[region], HALO_RGB, width + HALO_POINTS, alpha=0.85)
    for region, width in widths.items():
        _contour(ax, panel, masks[region], _rgb(region), width)


def _contour(ax, panel: Panel, mask: np.ndarray, colour, width: float, alpha: float = 1.0) -> None:
    """Outline of ``mask`` that follows the voxel edges (drawn on a 4x finer grid, padded so it closes)."""
    if not mask.any():
        return
    fine = np.pad(np.kron(mask.astype(np.float32), np.ones((_FINE, _FINE), np.float32)), 1)
    step_r, step_c = panel.pixel_mm[0] / _FINE, panel.pixel_mm[1] / _FINE
    rows = (np.arange(fine.shape[0]) - 0.5) * step_r
    cols = (np.arange(fine.shape[1]) - 0.5) * step_c
    ax.contour(cols, rows, fine, levels=[0.5], colors=[colour], linewidths=width, linestyles="solid", alpha=alpha)


def _edge_letters(ax, view: str) -> None:
    left, right, top, bottom = EDGES[view]
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    style = dict(transform=ax.transAxes, color="white", fontsize=10, fontweight="bold", path_effects=outline)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _row_title(ax, row: MontageRow) -> None:
    style = dict(transform=ax.transAxes, rotation=90, va="center", color=_TEXT, parse_math=False)
    ax.text(-0.13, 0.5, row.title, ha="right", fontsize=11, fontweight="bold", **style)
    ax.text(-0.05, 0.5, row.subtitle, ha="right", fontsize=9.5, **style)


def _halo_line(region: str, width: float) -> Line2D:
    return Line2D([], [], color=_rgb(region), linewidth=width, label=f"{region}  {REGION_NAMES[region]}",
                  path_effects=[patheffects.withStroke(linewidth=width + HALO_POINTS, foreground="black")])


def _peak(overlay: CaseOverlay, row: MontageRow) -> float | None:
    """The highest entropy / variance inside the brain (printed beside its fixed scale); None for other rows."""
    if row.kind not in ("uncertainty", "variance"):
        return None
    return float(np.asarray(getattr(overlay, row.kind), dtype=np.float32)[overlay.brain_mask].max())


def _draw_side(ax, row: MontageRow, scale: HeatScale | None, peak: float | None = None) -> None:
    """Legend (contour rows) or colour bar (heat-map rows) to the right of a row."""
    ax.axis("off")
    if scale is None:
        handles = [_halo_line(r, w) for r, w in CONTOUR_WIDTHS.items()]
        legend = ax.legend(handles=handles, loc="center left", frameon=False, fontsize=9, labelcolor=_TEXT,
                           title="Regions (outlines)", title_fontsize=9, borderaxespad=0, handlelength=2.4)
        legend.get_title().set_color(_TEXT)
        return
    cmap = matplotlib.colormaps[scale.cmap]
    cmap = cmap.with_extremes(over=OVER_RGB if scale.over_colour else cmap(1.0))
    cax = ax.inset_axes([0.05, 0.3, 0.11, 0.6])
    bar = ax.figure.colorbar(ScalarMappable(Normalize(scale.low, scale.top), cmap), cax=cax,
                             extend="max" if scale.over_range else "neither")
    ticks, labels = colour_bar_ticks(scale)
    bar.set_ticks(ticks, labels=labels)
    bar.set_label(scale.label, color=_TEXT, fontsize=9)
    bar.ax.tick_params(colors=_TEXT, labelsize=8)
    bar.outline.set_edgecolor(_TEXT)
    if peak is not None:
        ax.text(0.0, 0.99, f"highest in this case: {peak:.2g}", transform=ax.transAxes, ha="left", va="top",
                color=_TEXT, fontsize=8)
    handles = [_halo_line("WT", 1.4)]
    if scale.over_range and scale.over_colour:
        handles.insert(0, Patch(facecolor=OVER_RGB, edgecolor=_TEXT, label="above the top of the scale"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 0.0), frameon=False, fontsize=8,
              labelcolor=_TEXT, borderaxespad=0, handlelength=1.6)


def _titles(fig: Figure, overlay: CaseOverlay) -> None:
    inches = fig.get_figheight()
    run = f"   \u00b7   run {overlay.run_id}" if overlay.run_id else ""
    # parse_math=False: a '$' in a case id or model name is text, not mathtext
    fig.text(0.5, 1 - 0.12 / inches, overlay.case_id, ha="center", va="top", color=_TEXT, fontsize=14,
             fontweight="bold", parse_math=False)
    fig.text(0.5, 1 - 0.42 / inches, f"model {overlay.model_name}{run}   \u00b7   grey underlay named at the left "
             "of each row", ha="center", va="top", color=_TEXT, fontsize=10, parse_math=False)
    width = int(fig.get_figwidth() * 72 / (8.5 * 0.56))  # characters of 8.5 pt text across the figure
    caption = "\n".join(textwrap.fill(paragraph, width) for paragraph in CAPTION)
    fig.text(0.5, 0.1 / inches, caption, ha="center", va="bottom", color=_TEXT, fontsize=8.5, linespacing=1.4,
             parse_math=False)
