"""PNG montage of one case: axial / coronal / sagittal slices through the largest predicted lesion.

Rows (:func:`montage_rows`): the prediction's region contours on FLAIR and on T1ce (enhancing tumour is judged
on T1ce), the ground truth's, one row per attention map, the predictive entropy and the ensemble variance.
Which slices, and how each becomes a panel in the radiological convention at true voxel size, is
``export.slices``'s; the heat maps' colour scales (shared with the interactive viewer) are ``export.scales``'s.
This module draws: the grey underlay, the outlines, the heat maps, colour bars, legends and captions.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib import patheffects
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from medseg_diff.data.conventions import REGIONS
from medseg_diff.export.scales import OVER_RGB, HeatScale, colour_bar_ticks, heat_rgba, heat_scale
from medseg_diff.export.slices import (
    EDGES,
    Panel,
    Slicer,
)
from medseg_diff.data.vocabulary import REGION_NAMES, REGION_RGB
from medseg_diff.predictions.types import CaseOverlay

#: region -> contour line width in points, drawn widest first: where outlines coincide the narrower line lies on
#: the wider one, so every colour shows. Every line is solid and sits on a dark halo (visible on bright FLAIR).
CONTOUR_WIDTHS: dict[str, float] = {"WT": 4.0, "TC": 3.0, "ET": 1.2}
HALO_POINTS = 2.0  # the halo is this much wider than its line
HALO_RGB = (0.0, 0.0, 0.0)
_DIM = 0.6  # brightness of the grey underlay under heat maps
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
_FINE = 4  # contour grid refinement, so outlines follow voxel edges
_BACKGROUND = "#111111"
_TEXT = "#eeeeee"


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


def render_montage(overlay: CaseOverlay, affine: np.ndarray, dpi: int = 120) -> RenderedMontage:
    """The montage PNG (rows of :func:`montage_rows`, columns axial / coronal / sagittal) and its rows."""
    slicer = Slicer(overlay, affine)
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
