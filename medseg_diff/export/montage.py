"""PNG montage of one case: axial / coronal / sagittal slices through the tumour centre.

Display orientation does not depend on how the file stores its voxels: every array is first
reoriented to RAS (``nibabel.orientations``, closest axes of the affine), then sliced in the
**radiological convention** — the patient's right on the image left; axial seen from the feet with
anterior up, coronal seen from the front with superior up, sagittal with anterior on the left and
superior up. Pixels are drawn at their size in mm, so anisotropic voxels keep their true aspect.
An LPS file and a RAS file of the same head give identical panels (:func:`montage_panels`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib import patheffects
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from matplotlib.lines import Line2D
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from medseg_diff.data.conventions import REGIONS
from medseg_diff.export.types import REGION_NAMES, REGION_RGB, CaseOverlay

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: letters at the (left, right, top, bottom) edges of each view
EDGES: dict[str, tuple[str, str, str, str]] = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
CAPTION = (
    "Radiological convention: patient's right on the image left (see the letters at the panel edges).\n"
    "Axial seen from the feet, anterior up; coronal seen from the front; sagittal with anterior on the left.\n"
    "Slices through the tumour centre, at true voxel size. Attention maps are model-internal weights, "
    "not a clinical finding.\nResearch use only - not for clinical decisions."
)
_ROW_INCHES = 3.0
_SIDE_INCHES = 2.1
_MARGIN = 4  # voxels kept around the brain's bounding box
_FINE = 4  # contour grid refinement, so outlines follow voxel edges
#: region -> (line width in points, matplotlib line style), drawn in this order. WT is wider than the
#: others and TC/ET dashes interleave, so an edge shared by several regions shows every colour
#: (a yellow rim around alternating blue/orange dashes) instead of the last one hiding the rest.
_CONTOUR_STYLES = {"WT": (3.2, "solid"), "TC": (1.6, (0, (3, 3))), "ET": (1.6, (3, (3, 3)))}
_CMAPS = {"attention": "inferno", "uncertainty": "viridis"}
_BACKGROUND = "#111111"
_TEXT = "#eeeeee"


@dataclass(frozen=True)
class Panel:
    """One view's 2D arrays, already in display orientation (row 0 at the top, column 0 at the left)."""

    view: str  # "axial" | "coronal" | "sagittal"
    image: np.ndarray  # [rows, cols] grey MRI (raw intensities)
    regions: np.ndarray  # [3, rows, cols] bool, REGIONS order (TC, WT, ET)
    truth: np.ndarray | None  # [3, rows, cols] bool, ground-truth regions
    attention: dict[str, np.ndarray]  # name -> [rows, cols] normalised to [0, 1]
    uncertainty: np.ndarray | None  # [rows, cols]
    pixel_mm: tuple[float, float]  # (row height, column width) in mm
    position: str  # where the slice is, e.g. "S +12.0 mm"

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


@dataclass(frozen=True)
class _RasLayers:
    """Every layer of the montage as a RAS-ordered, brain-cropped volume."""

    grey: np.ndarray  # [x, y, z]
    regions: np.ndarray  # [x, y, z, 3] bool
    truth: np.ndarray | None  # [x, y, z, 3] bool
    attention: dict[str, np.ndarray]  # name -> [x, y, z] in [0, 1]
    uncertainty: np.ndarray | None  # [x, y, z]

    def panel(self, view: str, index: int, pixel_mm: tuple[float, float], position: str) -> Panel:
        def cut(volume: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(display_slice(volume, view, index))

        def cut_regions(volume: np.ndarray) -> np.ndarray:
            return np.stack([cut(volume[..., r]) for r in range(volume.shape[-1])])

        return Panel(
            view=view,
            image=cut(self.grey),
            regions=cut_regions(self.regions),
            truth=None if self.truth is None else cut_regions(self.truth),
            attention={name: cut(volume) for name, volume in self.attention.items()},
            uncertainty=None if self.uncertainty is None else cut(self.uncertainty),
            pixel_mm=pixel_mm,
            position=position,
        )


def montage_panels(overlay: CaseOverlay, affine: np.ndarray) -> list[Panel]:
    """The three panels (axial, coronal, sagittal) the montage draws, in display orientation.

    ``affine`` is the reference's voxel-to-world matrix (the grid of every array in ``overlay``).
    Slices go through the centre of the predicted whole tumour (of the ground truth if the
    prediction is empty; the brain's centre if both are).
    """
    frame = RasFrame.from_affine(np.asarray(affine, dtype=float), overlay.brain_mask)

    def regions_of(labels: np.ndarray) -> np.ndarray:
        return frame(np.moveaxis(overlay.convention.to_regions(labels), 0, -1))

    layers = _RasLayers(
        grey=frame(np.asarray(overlay.images[overlay.grey_modality], dtype=np.float32)),
        regions=regions_of(overlay.labels),
        truth=None if overlay.ground_truth is None else regions_of(overlay.ground_truth),
        attention={name: frame(overlay.normalised_attention(name)) for name in overlay.attention},
        uncertainty=None if overlay.uncertainty is None else frame(np.asarray(overlay.uncertainty, np.float32)),
    )
    whole = layers.regions[..., REGIONS.index("WT")]
    if not whole.any() and layers.truth is not None:
        whole = layers.truth[..., REGIONS.index("WT")]
    centre = tumour_centre(whole)
    world = frame.world(centre)
    return [
        layers.panel(view, centre[axis], _pixel_mm(frame.zooms, view), f"{'RAS'[axis]} {world[axis]:+.1f} mm")
        for axis, view in ((2, "axial"), (1, "coronal"), (0, "sagittal"))
    ]


def render_montage(overlay: CaseOverlay, affine: np.ndarray, dpi: int = 100) -> bytes:
    """PNG bytes: a row of segmentation contours, one per ground truth / attention map / uncertainty."""
    panels = montage_panels(overlay, affine)
    rows = _row_kinds(overlay)
    fig, grid = _figure(panels, len(rows))
    grey_range = _window(overlay)
    unc_max = _uncertainty_max(overlay)
    for r, (kind, name) in enumerate(rows):
        for c, panel in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            _draw_panel(ax, panel, kind, name, grey_range, unc_max)
            if c == 0:
                _row_title(ax, kind, name)
        _draw_side(fig.add_subplot(grid[r, len(panels)]), kind, overlay, unc_max)
    _titles(fig, overlay)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor=_BACKGROUND, metadata={"Software": "medseg-diff"})
    return buffer.getvalue()


def _row_kinds(overlay: CaseOverlay) -> list[tuple[str, str | None]]:
    rows: list[tuple[str, str | None]] = [("seg", None)]
    if overlay.ground_truth is not None:
        rows.append(("truth", None))
    rows += [("attention", name) for name in overlay.attention]
    if overlay.uncertainty is not None:
        rows.append(("uncertainty", None))
    return rows


def _figure(panels: list[Panel], n_rows: int) -> tuple[Figure, GridSpec]:
    """A figure and its grid of cells; the panel cells share one mm-to-inch scale."""
    height_mm = max(p.size_mm[0] for p in panels)
    widths = [_ROW_INCHES * p.size_mm[1] / height_mm for p in panels] + [_SIDE_INCHES]
    top, bottom, left, gap = 0.95, 0.85, 0.45, 0.12
    width = left + sum(widths) + gap * len(widths)
    height = top + bottom + n_rows * (_ROW_INCHES + gap)
    fig = Figure(figsize=(width, height), facecolor=_BACKGROUND)
    grid = fig.add_gridspec(
        n_rows, len(widths), width_ratios=widths,
        left=left / width, right=1 - 0.05 / width, top=1 - top / height, bottom=bottom / height,
        wspace=gap * len(widths) / sum(widths), hspace=gap / _ROW_INCHES,
    )
    return fig, grid


def _window(overlay: CaseOverlay) -> tuple[float, float]:
    """Grey display range: 0.5th-99.5th percentile of the brain voxels of the grey modality."""
    values = np.asarray(overlay.images[overlay.grey_modality], dtype=np.float32)[overlay.brain_mask]
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1.0)


def _uncertainty_max(overlay: CaseOverlay) -> float:
    """Top of the uncertainty colour scale: the 99.9th percentile inside the brain (else the maximum)."""
    if overlay.uncertainty is None:
        return 1.0
    values = np.asarray(overlay.uncertainty, dtype=np.float32)
    top = float(np.percentile(values[overlay.brain_mask], 99.9))
    return top if top > 0 else (float(values.max()) or 1.0)


def _rgb(region: str) -> tuple[float, float, float]:
    return tuple(v / 255 for v in REGION_RGB[region])


def _draw_panel(ax, panel: Panel, kind: str, name: str | None, grey_range, unc_max: float) -> None:
    height, width = panel.size_mm
    extent = (0.0, width, height, 0.0)
    ax.imshow(panel.image, cmap="gray", vmin=grey_range[0], vmax=grey_range[1], extent=extent,
              interpolation="nearest")
    if kind in ("seg", "truth"):
        masks = panel.regions if kind == "seg" else panel.truth
        for region, (width_pt, style) in _CONTOUR_STYLES.items():
            _contour(ax, panel, masks[REGIONS.index(region)], _rgb(region), width_pt, style)
    else:
        values = panel.attention[name] if kind == "attention" else panel.uncertainty / unc_max
        ax.imshow(_heat_rgba(values, _CMAPS[kind]), extent=extent, interpolation="nearest")
        _contour(ax, panel, panel.regions[REGIONS.index("WT")], (1.0, 1.0, 1.0), 1.0, "dashed")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_facecolor("black")
    ax.set_anchor("N")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    _edge_letters(ax, panel.view)
    if kind == "seg":
        ax.set_title(f"{panel.view.capitalize()}   {panel.position}", color=_TEXT, fontsize=10)


def _heat_rgba(values: np.ndarray, cmap_name: str) -> np.ndarray:
    """Colour-mapped [0, 1] values; opacity rises linearly from 0 (at 0) to 75 % (from 0.5 upward),
    so low values leave the anatomy visible."""
    values = np.clip(values, 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap_name](values)
    rgba[..., 3] = 0.75 * np.clip(values / 0.5, 0.0, 1.0)
    return rgba


def _contour(ax, panel: Panel, mask: np.ndarray, colour, width: float, style: str) -> None:
    """Outline of ``mask`` that follows the voxel edges (drawn on a 4x finer grid, padded so it closes)."""
    if not mask.any():
        return
    fine = np.pad(np.kron(mask.astype(np.float32), np.ones((_FINE, _FINE), np.float32)), 1)
    step_r, step_c = panel.pixel_mm[0] / _FINE, panel.pixel_mm[1] / _FINE
    rows = (np.arange(fine.shape[0]) - 0.5) * step_r
    cols = (np.arange(fine.shape[1]) - 0.5) * step_c
    ax.contour(cols, rows, fine, levels=[0.5], colors=[colour], linewidths=width, linestyles=[style])


def _edge_letters(ax, view: str) -> None:
    left, right, top, bottom = EDGES[view]
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    style = dict(transform=ax.transAxes, color="white", fontsize=10, fontweight="bold", path_effects=outline)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _row_title(ax, kind: str, name: str | None) -> None:
    title = {
        "seg": "Prediction",
        "truth": "Ground truth",
        "attention": f"Attention: {name}",
        "uncertainty": "Uncertainty",
    }[kind]
    ax.text(-0.04, 0.5, title, transform=ax.transAxes, rotation=90, ha="right", va="center",
            color=_TEXT, fontsize=11, fontweight="bold")


def _draw_side(ax, kind: str, overlay: CaseOverlay, unc_max: float) -> None:
    """Legend (contour rows) or colour bar (heat-map rows) to the right of a row."""
    ax.axis("off")
    if kind in ("seg", "truth"):
        handles = [
            Line2D([], [], color=_rgb(r), linewidth=w, linestyle="solid" if style == "solid" else (0, (3, 3)),
                   label=f"{r}  {REGION_NAMES[r]}")
            for r, (w, style) in _CONTOUR_STYLES.items()
        ]
        legend = ax.legend(handles=handles, loc="center left", frameon=False, fontsize=9, labelcolor=_TEXT,
                           title="Contours", title_fontsize=9, borderaxespad=0)
        legend.get_title().set_color(_TEXT)
        return
    label = "normalised attention (0-1)" if kind == "attention" else f"entropy ({overlay.uncertainty_units})"
    vmax = 1.0 if kind == "attention" else unc_max
    cax = ax.inset_axes([0.05, 0.12, 0.12, 0.76])
    bar = ax.figure.colorbar(ScalarMappable(Normalize(0.0, vmax), _CMAPS[kind]), cax=cax)
    bar.set_label(label, color=_TEXT, fontsize=9)
    bar.ax.tick_params(colors=_TEXT, labelsize=8)
    bar.outline.set_edgecolor(_TEXT)
    ax.text(0.05, 0.04, "- - -  WT outline", transform=ax.transAxes, color=_TEXT, fontsize=8)


def _titles(fig: Figure, overlay: CaseOverlay) -> None:
    inches = fig.get_figheight()
    run = f"   \u00b7   run {overlay.run_id}" if overlay.run_id else ""
    # parse_math=False: a '$' in a case id or model name is text, not mathtext
    fig.text(0.5, 1 - 0.12 / inches, overlay.case_id, ha="center", va="top", color=_TEXT, fontsize=14,
             fontweight="bold", parse_math=False)
    fig.text(0.5, 1 - 0.42 / inches, f"model {overlay.model_name}{run}   \u00b7   grey image: "
             f"{overlay.grey_modality.upper()}", ha="center", va="top", color=_TEXT, fontsize=10,
             parse_math=False)
    fig.text(0.5, 0.1 / inches, CAPTION, ha="center", va="bottom", color=_TEXT, fontsize=8.5,
             linespacing=1.4)
