"""Interactive NiiVue viewer for report.html: an HTML fragment that stays one offline file.

The NiiVue library (https://github.com/niivue/niivue, BSD-2-Clause) is vendored at install time by
``tools/fetch_niivue.sh`` (``make setup``): the single-file browser build ``dist/niivue.umd.js`` of a pinned
npm release, checked against a pinned SHA-256 and recorded in ``vendor/niivue.json``. :func:`viewer_section`
inlines it, with the case's volumes as base64 gzip-compressed NIfTI, so the page loads nothing at view time.
Without the bundle it returns a short note instead (the report keeps its static montage either way). The
viewer's own stylesheet and script are package data beside this module (``assets/viewer.css``,
``assets/viewer.js``), inlined as they are.

Display copies, not the analysis data: grey images are quantised to 8 bits over a robust intensity window,
heat maps to 8 bits over the caller's ``[vmin, vmax]``; the NIfTI ``scl_slope``/``scl_inter`` of each copy
give back values in the original units (to within half a step), which the viewer's read-out shows. The
segmentation is stored exactly (uint8).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import html
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from medseg_diff.data.vocabulary import DISPLAY_MODALITIES, MODALITY_NAMES
from medseg_diff.export.slices import EDGES

VENDOR_DIR = Path(__file__).resolve().parent / "vendor"
#: The vendored NiiVue bundle and its record (written by tools/fetch_niivue.sh, git-ignored).
BUNDLE_PATH = VENDOR_DIR / "niivue.umd.js"
BUNDLE_INFO = VENDOR_DIR / "niivue.json"
INSTALL_HINT = (
    "run <code>make setup</code> (or <code>sh tools/fetch_niivue.sh</code>) on a machine with Node.js/npm "
    "and network access, then export the case again"
)
#: Grey images: stored in 8 bits from 0 (from this low percentile of the non-zero voxels when the image has
#: negative values) to this high percentile (brighter voxels clipped); first shown with the window's top at
#: the 99.5th percentile (right-drag in the viewer changes the window).
GREY_LOW_PERCENTILE, GREY_WINDOW_PERCENTILE, GREY_HIGH_PERCENTILE = 0.5, 99.5, 99.9
#: The grey image shown first, and the modalities' plain names: the montage's and the report's (``export.types``).
_GREY_ORDER = DISPLAY_MODALITIES
_DISPLAY_NAMES = MODALITY_NAMES
#: NiiVue colour maps a heat map may name (a subset of NiiVue's built-in ones).
HEAT_COLORMAPS = ("inferno", "viridis", "plasma", "magma", "hot", "warm", "cool", "turbo")
DEFAULT_HEAT_COLORMAP = "inferno"
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class HeatMap:
    """One continuous map shown as a heat overlay: ``array`` clipped to ``[vmin, vmax]`` (in ``units``)."""

    name: str
    array: np.ndarray
    vmin: float
    vmax: float
    units: str
    description: str
    colormap: str = DEFAULT_HEAT_COLORMAP


def niivue_status() -> tuple[bool, str]:
    """``(available, reason)``: whether the vendored NiiVue bundle is installed and intact, and why not."""
    if not BUNDLE_PATH.is_file():
        return False, "the NiiVue library was not installed with this copy of medseg-diff"
    try:
        info = json.loads(BUNDLE_INFO.read_text(encoding="utf-8"))
        digest = hashlib.sha256(BUNDLE_PATH.read_bytes()).hexdigest()
    except (OSError, ValueError) as error:
        return False, f"the NiiVue library record could not be read ({type(error).__name__})"
    if digest != info.get("sha256"):
        return False, "the installed NiiVue library does not match its recorded SHA-256"
    return True, f"NiiVue {info.get('version', '?')}"


def niivue_available() -> bool:
    """True when :func:`viewer_section` can embed the interactive viewer."""
    return niivue_status()[0]


def niivue_version() -> str | None:
    """The vendored NiiVue version, or None when it is not available."""
    if not niivue_available():
        return None
    return str(json.loads(BUNDLE_INFO.read_text(encoding="utf-8")).get("version"))


def unavailable_note(reason: str, heading: str | None = "Interactive viewer") -> str:
    """The HTML that stands in for the viewer: why it is missing and how to get it."""
    head = f"<h2>{html.escape(heading)}</h2>" if heading else ""
    return (
        f'<section class="mdv mdv-unavailable">{head}<p class="muted">The interactive viewer is not available '
        f"in this report: {html.escape(reason)}. To include it, {INSTALL_HINT}. The static slice montage of "
        "this report (Slices through the tumour) shows the same images and segmentation.</p></section>"
    )


def viewer_section(
    images: Mapping[str, np.ndarray],
    labels: np.ndarray,
    label_colours: Sequence[tuple[int, str, tuple[int, int, int]]],
    maps: Iterable[HeatMap | tuple],
    affine: np.ndarray,
    *,
    grey: str | None = None,
    heading: str | None = "Interactive viewer",
    element_id: str = "viewer",
    label_opacity: float = 0.5,
    map_opacity: float = 0.7,
    height_px: int = 620,
    include_bundle: bool = True,
) -> str:
    """HTML fragment with an interactive NiiVue viewer of one case, or a note when NiiVue is not installed.

    ``images``: modality name -> ``[X, Y, Z]`` array (the grey underlay; a selector switches between them;
    ``grey`` or FLAIR, else T1ce, T2, T1 first). ``labels``: ``[X, Y, Z]`` integer labels, every non-zero value
    listed in ``label_colours`` as ``(value, name, (r, g, b))``. ``maps``: :class:`HeatMap` or tuples
    ``(name, array, vmin, vmax, units, description[, colormap])``, shown one at a time as heat overlays (values
    at or below ``vmin`` transparent). ``affine``: the 4 x 4 voxel-to-world (RAS mm) matrix of every array.
    ``include_bundle=False`` leaves the NiiVue library out (for a second viewer on a page that has one).
    Raises ``ValueError`` for inconsistent inputs; text from the inputs is escaped.
    """
    available, reason = niivue_status()
    if not available:
        return unavailable_note(reason, heading)
    if not _ID.match(element_id):
        raise ValueError(f"element_id {element_id!r} is not a plain HTML id")
    heat = [m if isinstance(m, HeatMap) else HeatMap(*m) for m in maps]
    labels, affine = np.asarray(labels), np.asarray(affine, dtype=np.float64)
    _check(images, labels, label_colours, heat, affine)
    names = _grey_order(images, grey)
    payload = {
        "images": [_grey_entry(name, np.asarray(images[name]), affine) for name in names],
        "labels": {
            "b64": _encode(labels.astype(np.uint8), affine),
            "entries": [{"value": int(v), "name": str(n), "rgb": [int(c) for c in rgb]} for v, n, rgb in
                        sorted(label_colours, key=lambda entry: entry[0])],
        },
        "maps": [_map_entry(m, affine) for m in heat],
        "opacity": {"labels": _unit(label_opacity), "map": _unit(map_opacity)},
        "start_mm": _start_mm(labels, affine),
        # the montage's orientation (export.slices.EDGES): radiological, and the sagittal view with anterior on the left
        "sagittal_nose_left": EDGES["sagittal"][0] == "A",
        "radiological": EDGES["axial"][0] == "R",
        "shape": [int(n) for n in labels.shape],
    }
    bundle = ""
    if include_bundle:
        bundle = f"<script>{_script_safe(BUNDLE_PATH.read_text(encoding='utf-8'))}</script>\n"
    return _render(payload, names, label_colours, heat, heading, element_id, height_px, bundle)


# ----------------------------------------------------------------------------------------------- encoding


def encode_nifti_gz(array: np.ndarray, affine: np.ndarray, slope: float = 1.0, inter: float = 0.0,
                    cal: tuple[float, float] | None = None) -> bytes:
    """``array`` stored as is (no rescaling) as gzip-compressed single-file NIfTI-1, with ``affine`` as sform
    and qform (code 1, scanner) and the given ``scl_slope``/``scl_inter`` and display range."""
    array = np.asarray(array)
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header.set_xyzt_units("mm")
    header.set_slope_inter(slope, inter)
    if cal is not None:
        header["cal_min"], header["cal_max"] = cal
    header["vox_offset"] = 352  # 348-byte header + 4-byte empty extension flag
    raw = header.binaryblock + b"\0\0\0\0" + array.astype(array.dtype.newbyteorder("="), copy=False).tobytes("F")
    return gzip.compress(raw, compresslevel=6, mtime=0)


def _encode(array: np.ndarray, affine: np.ndarray, **header) -> str:
    return base64.b64encode(encode_nifti_gz(array, affine, **header)).decode("ascii")


def quantise(values: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, float, float]:
    """``values`` clipped to ``[lo, hi]`` as uint8 0..255, with the ``(slope, inter)`` that map codes back."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        hi = lo + 1.0
    slope = (hi - lo) / 255.0
    codes = np.clip(np.rint((values - lo) / slope), 0, 255).astype(np.uint8)
    return codes, slope, lo


def _grey_entry(name: str, array: np.ndarray, affine: np.ndarray) -> dict:
    """8-bit display copy: codes over [0 (or the low percentile if negative values exist), high percentile]."""
    values = np.asarray(array, dtype=np.float32)
    finite = values[np.isfinite(values)]
    inside = finite[finite != 0]
    if inside.size == 0:
        inside = finite if finite.size else np.zeros(1, np.float32)
    low, window_high, high = (float(v) for v in np.percentile(inside, (GREY_LOW_PERCENTILE, GREY_WINDOW_PERCENTILE,
                                                                            GREY_HIGH_PERCENTILE)))
    low = 0.0 if float(finite.min(initial=0.0)) >= 0 else low
    high = max(high, low + 1e-6)
    codes, slope, inter = quantise(values, low, high)
    window = (low, min(max(window_high, low + slope), high))
    return {"name": name, "label": _DISPLAY_NAMES.get(name.lower(), name), "range": list(window),
            "step": slope, "b64": _encode(codes, affine, slope=slope, inter=inter, cal=window)}


def _map_entry(heat: HeatMap, affine: np.ndarray) -> dict:
    codes, slope, inter = quantise(heat.array, float(heat.vmin), float(heat.vmax))
    return {
        "name": heat.name, "units": heat.units, "description": heat.description, "colormap": heat.colormap,
        "vmin": float(heat.vmin), "vmax": float(heat.vmax), "step": slope,
        "b64": _encode(codes, affine, slope=slope, inter=inter, cal=(float(heat.vmin), float(heat.vmax))),
    }


def _start_mm(labels: np.ndarray, affine: np.ndarray) -> list[float]:
    """World position of the first view: the centre of the segmentation, else of the volume."""
    where = np.argwhere(labels > 0)
    centre = where.mean(axis=0) if len(where) else (np.array(labels.shape) - 1) / 2.0
    return [float(v) for v in (affine @ np.append(np.rint(centre), 1.0))[:3]]


# ----------------------------------------------------------------------------------------------- checks


def _check(images, labels, label_colours, heat: list[HeatMap], affine: np.ndarray) -> None:
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D [X, Y, Z], got shape {labels.shape}")
    if not images:
        raise ValueError("at least one grey image is needed")
    for name, array in list(images.items()) + [(f"map {m.name!r}", m.array) for m in heat]:
        if np.shape(array) != labels.shape:
            raise ValueError(f"{name} has shape {np.shape(array)}, the labels {labels.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("affine must be a finite, invertible 4 x 4 matrix")
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.rint(labels)):
        raise ValueError("labels must be integers")
    known = {int(v) for v, _, _ in label_colours}
    if any(not 0 < v < 256 for v in known):
        raise ValueError("label values must be 1..255")
    unknown = sorted({int(v) for v in np.unique(labels)} - known - {0})
    if unknown:
        raise ValueError(f"labels {unknown} have no entry in label_colours")
    for value, _, rgb in label_colours:
        if len(rgb) != 3 or any(not 0 <= int(c) <= 255 for c in rgb):
            raise ValueError(f"label {value}: colour {rgb} is not (r, g, b) in 0..255")
    for m in heat:
        if not (np.isfinite(m.vmin) and np.isfinite(m.vmax) and m.vmax > m.vmin):
            raise ValueError(f"map {m.name!r}: need finite vmin < vmax, got {m.vmin}, {m.vmax}")
        if m.colormap not in HEAT_COLORMAPS:
            raise ValueError(f"map {m.name!r}: colormap {m.colormap!r} is not one of {HEAT_COLORMAPS}")


def _grey_order(images: Mapping[str, np.ndarray], grey: str | None) -> list[str]:
    names = list(images)
    if grey is not None and grey not in images:
        raise ValueError(f"grey image {grey!r} is not one of {names}")
    first = grey or next((n for n in _GREY_ORDER if n in images), names[0])
    return [first] + [n for n in names if n != first]


# ----------------------------------------------------------------------------------------------- assets
#: The viewer's stylesheet and its own script (plain ES2017, no globals but window.medsegViewers, for tests and
#: debugging): package data in ``export/assets`` (shipped by ``[tool.setuptools.package-data]``), inlined into
#: every viewer section as they are.
ASSETS = "assets"


@functools.cache
def _asset(name: str) -> str:
    """The text of ``export/assets/NAME`` (read once per process)."""
    return importlib.resources.files(__package__).joinpath(ASSETS, name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------- HTML


def _script_safe(text: str) -> str:
    """Text that cannot end or re-open the <script> element it is inlined in."""
    return re.sub(r"(?i)</(script)", r"<\\/\1", text).replace("<!--", "<\\!--")


def _json_for_script(value) -> str:
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026")


def _unit(value: float) -> float:
    return min(max(float(value), 0.0), 1.0)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _render(payload, names, label_colours, heat: list[HeatMap], heading, element_id, height_px, bundle) -> str:
    e = html.escape
    grey_options = "".join(f'<option value="{i}">{e(_DISPLAY_NAMES.get(n.lower(), n))}</option>'
                           for i, n in enumerate(names))
    map_options = '<option value="-1">none</option>' + "".join(
        f'<option value="{i}">{e(m.name)}</option>' for i, m in enumerate(heat))
    swatches = "".join(
        f'<li><span class="mdv-swatch" style="background: rgb({int(r)}, {int(g)}, {int(b)})"></span>'
        f"label {int(v)}: {e(str(n))}</li>"
        for v, n, (r, g, b) in sorted(label_colours, key=lambda entry: entry[0]))
    map_items = "".join(
        f'<li data-map="{i}"><canvas class="mdv-cbar" data-role="cbar" data-map="{i}" width="128" height="10">'
        f"</canvas> <b>{e(m.name)}</b>: {_fmt(m.vmin)} (transparent) to {_fmt(m.vmax)} {e(m.units)}, "
        f"colour map {e(m.colormap)}; stored in 8 bits (steps of {_fmt((m.vmax - m.vmin) / 255)} {e(m.units)}). "
        f"{e(m.description)}</li>"
        for i, m in enumerate(heat)) or "<li>none for this case</li>"
    head = f"<h2>{e(heading)}</h2>" if heading else ""
    css, script = _asset("viewer.css"), _asset("viewer.js")  # each starts on the line after its opening tag
    return (
        f'<section class="mdv" id="{element_id}" data-state="loading">{head}<style>\n{css}</style>\n'
        '<div class="mdv-controls">'
        f'<label>Grey image <select data-role="grey">{grey_options}</select></label>'
        f'<label>Heat map <select data-role="map">{map_options}</select></label>'
        '<label><input type="checkbox" data-role="seg" checked> Segmentation</label>'
        f'<label>Segmentation opacity <input type="range" data-role="seg-opacity" min="0" max="100" '
        f'value="{round(payload["opacity"]["labels"] * 100)}"></label>'
        f'<label>Heat-map opacity <input type="range" data-role="map-opacity" min="0" max="100" '
        f'value="{round(payload["opacity"]["map"] * 100)}"></label>'
        '<label>View <select data-role="layout"><option value="grid">3 planes + 3D</option>'
        '<option value="axial">axial</option><option value="coronal">coronal</option>'
        '<option value="sagittal">sagittal</option><option value="render">3D</option></select></label>'
        '<label>Slice <select data-role="plane"><option value="2">axial</option>'
        '<option value="1">coronal</option><option value="0">sagittal</option></select> '
        '<input type="range" data-role="slice" min="0" max="0" value="0"> <output data-role="slice-out">'
        "</output></label></div>\n"
        f'<div class="mdv-stage" style="height: {int(height_px)}px"><canvas data-role="canvas" tabindex="0">'
        "</canvas></div>\n"
        '<div class="mdv-readout" data-role="status" aria-live="polite">Loading the viewer\u2026 '
        "(needs JavaScript and WebGL 2)</div>\n"
        '<div class="mdv-legend"><div><b>Segmentation</b><ul>'
        f"{swatches}</ul></div><div><b>Heat maps</b> (one at a time)<ul>{map_items}</ul></div></div>\n"
        '<p class="muted">Mouse wheel over a view, or the slice slider: scroll through slices. Click: move the '
        "crosshair (and give the viewer the keyboard). Arrow keys / Page Up, Down: step through the slices of the "
        "plane chosen under Slice. Right-drag: adjust brightness/contrast. Radiological convention: the patient's "
        f"right is on the image left. Display copies: grey images in 8 bits up to their {GREY_HIGH_PERCENTILE:g}th "
        "percentile (brighter voxels clipped), heat maps in 8 bits; the read-out shows values in their original "
        "units.</p>\n"
        '<noscript><p class="muted">The interactive viewer needs JavaScript; the static slice montage of this '
        "report shows the same images.</p></noscript>\n"
        f'<script type="application/json" data-role="data">{_json_for_script(payload)}</script>\n'
        f"{bundle}<script>\n{script}</script>\n</section>"
    )
