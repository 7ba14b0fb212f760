"""Self-contained HTML report of one case (montage embedded as a data URI, inline CSS, no scripts).

Every piece of text that comes from the input (case id, model name, run id, file names) goes
through ``html.escape``; the page loads nothing from the network.

Over 400 lines on purpose: the sections of one HTML page (research note, agreement, maps and their definitions,
provenance, files, how to open them in Slicer / ITK-SNAP); each is a short function, the page is one reading.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg_diff import __version__
from medseg_diff.data.conventions import LabelConvention
from medseg_diff.evaluation.metrics import dice_scores, region_volumes_ml
from medseg_diff.kinds import REGISTRY
from medseg_diff.predictions import layout
from medseg_diff.export.montage import MontageRow
from medseg_diff.export.slices import SAME_SLICES_MM
from medseg_diff.data.vocabulary import REGION_NAMES, REGION_RGB, label_entries
from medseg_diff.export.types import (
    ATTENTION_SCALE_TOP, ENTROPY_SCALE_TOP, VARIANCE_MAX, VARIANCE_SCALE_TOP, OutputFile,
)
from medseg_diff.predictions.types import ATTENTION_PERCENTILE, CaseOverlay

REPORT_NAME = "report.html"
_TIMES = " \u00d7 "
_REGION_ORDER = ("WT", "TC", "ET")  # outermost first, as clinicians read them
RESEARCH_NOTE = "Research use only \u2014 not for clinical decisions"
SYNTHETIC_NOTE = "This model was trained only on synthetic phantoms and has never seen a real scan"
_CASE_META = re.compile(r'<meta name="medseg-diff-case" content="([^"]*)">')
_NONE = '<span class="muted">not recorded</span>'
#: what each attention map is (models/attention.py), in plain words
_ATTENTION_TEXT = {
    "self": "attention received: in its linear self-attention layers every location gathers information from all "
    "other locations of the part of the scan being processed; this map shows how much of that gathering draws on "
    "each voxel (column sums of the attention matrix), at the last DDIM step, averaged over the levels that have it (the two finest in "
    "the default design), the heads and the ensemble members, and stitched across sliding windows. The file holds it divided by its "
    "99.5th percentile in the brain (1 = that percentile); the pictures show it as a multiple of the brain's average. It is not a tumour probability and says nothing by "
    "itself about whether the segmentation is right",
    "cross": "attention on the tumour prior: the network first makes a rough, blocky guess of the tumour regions "
    "(the prior); while refining, every location consults it, and this map shows the share of that consultation "
    "landing on each place of the guess, mapped back to the image at block resolution, at the last DDIM step, "
    "averaged over heads and ensemble members, stitched across sliding windows; the file holds it divided by its "
    "99.5th percentile in the brain (1 = that percentile), the pictures as a multiple of the brain's average. High values mean the network relied on its rough guess there. "
    "In models trained with an attention loss (loss.attention > 0, the demo's default) this map was *taught* to "
    "point at the tumour during training: it shows where the model thinks the tumour is, not an unsupervised "
    "finding; `medseg-diff diagnose` measures on a checkpoint how much it concentrates on the tumour and whether "
    "blanking what it points at changes the prediction",
    "gate": "attention gates of the Attention U-Net (Oktay et al. 2018): at each level of its decoder a learned gate "
    "between 0 and 1 decides how much of the image detail passed along from the encoder is let through at each "
    "place; this map is those gates resized to the image and averaged over the levels, stitched across sliding "
    "windows; the file holds it divided by its 99.5th percentile in the brain (1 = that percentile), the pictures as "
    "a multiple of the brain's average. The gates are learned from the segmentation alone, without being told where to look; "
    "they are not a tumour probability",
}
#: words for the direction a voxel axis runs (nibabel axis codes: the direction of increasing index)
_AXIS_WORDS = {"L": "right to left", "R": "left to right", "P": "front to back", "A": "back to front",
               "S": "feet to head", "I": "head to feet"}
_STYLE = """
body { font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #1a1a1a; line-height: 1.45; padding: 0 16px; }
.ruo { border: 3px solid #b00020; background: #fdecee; color: #7a0015; padding: 12px 16px;
       font-size: 1.15em; border-radius: 6px; }
.ruo strong { font-size: 1.2em; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 3px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #555; margin-right: 6px; }
figure { margin: 0; } figure img { max-width: 100%; height: auto; border: 1px solid #999; }
figcaption, .muted { color: #555; font-size: 0.92em; }
dt { font-weight: bold; margin-top: 8px; }
code { background: #f4f4f4; padding: 1px 4px; border-radius: 3px; }
"""


@dataclass(frozen=True)
class ReportContext:
    """What the report needs beyond the overlay: the montage and the written files."""

    montage_png: bytes
    files: list[OutputFile]  # files written into the report's folder
    voxel_volume_mm3: float
    voxel_size_mm: tuple[float, float, float]
    axcodes: str  # e.g. "LPS": orientation of the file's voxel axes
    shape: tuple[int, int, int]
    montage_rows: list[MontageRow] = field(default_factory=list)  # rows of the montage, top to bottom
    out_dir: Path | None = None  # the report's folder
    viewer_html: str | None = None  # the interactive viewer's section (export/viewer.py), placed after the montage


def case_of_report(path: Path) -> str | None:
    """The case id recorded in an existing medseg-diff report, or None (no such file, or not ours)."""
    try:
        head = Path(path).read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return None
    match = _CASE_META.search(head)
    return html.unescape(match.group(1)) if match else None


def region_volumes_cm3(labels: np.ndarray, convention: LabelConvention, voxel_mm3: float) -> dict[str, float]:
    """Volume in cm³ of each region (TC, WT, ET) and each label (by its short name)."""
    labels = np.asarray(labels)
    volumes = region_volumes_ml(convention.to_regions(labels), voxel_mm3 / 1000.0)
    for entry in label_entries(convention):
        volumes[entry.short] = float((labels == entry.value).sum()) * voxel_mm3 / 1000.0
    return volumes


def _synthetic_note(overlay: CaseOverlay) -> str:
    """A warning near the top when the model never saw a real scan (its checkpoint's training record says so)."""
    if not overlay.provenance.synthetic_training:
        return ""
    data = html.escape(overlay.provenance.training_data or "synthetic phantoms")
    return (f'<div class="ruo" role="note"><strong>{SYNTHETIC_NOTE}.</strong> It was trained on {data}. On a real scan '
            "its output shows what the pipeline does, not what a trained model would find.</div>")


def render_report(overlay: CaseOverlay, context: ReportContext) -> str:
    """The HTML page, as a string."""
    e = html.escape
    title = f"medseg-diff report: {overlay.case_id}"
    sections = [
        f'<div class="ruo" role="alert"><strong>{RESEARCH_NOTE}.</strong><br>This report was made '
        "automatically by a research model. It has not been validated for diagnosis or treatment "
        "planning; every finding must be checked by a qualified clinician on the original images.</div>",
        _synthetic_note(overlay),
        f"<h1>Case {e(overlay.case_id)}</h1>",
        _case_table(overlay, context),
        _volume_section(overlay, context),
        _dice_section(overlay),
        _montage_section(overlay, context),
        # the interactive three-plane viewer (export/viewer.py) goes here, next to the static montage
        context.viewer_html or "",
        _maps_section(overlay),
        _provenance_section(overlay),
        _files_section(overlay, context),
        f'<p class="muted">Generated by medseg-diff {e(__version__)} on '
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC. {RESEARCH_NOTE}.</p>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="medseg-diff {e(__version__)}">\n'
        f'<meta name="medseg-diff-case" content="{e(overlay.case_id)}">\n'
        f"<title>{e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(x for x in sections if x)
        + "\n</body>\n</html>\n"
    )


def map_definitions(overlay: CaseOverlay) -> dict[str, str]:
    """Plain-text definition of each map the overlay holds: ``uncertainty``, ``variance``, ``attention_NAME``.
    Used by the report and by the file list; exact about what each number is."""
    kind, members = overlay.provenance.model_kind, overlay.provenance.ensemble
    n = f"{members} " if members else ""
    units = overlay.uncertainty_units
    top = "3\u00b7ln 2 \u2248 2.08 nats" if units == "nats" else "3 bits"
    formula = ("binary entropy \u2212p\u00b7log p \u2212 (1\u2212p)\u00b7log(1\u2212p) of each region's probability p, "
               f"summed over the 3 regions (TC, WT, ET), in {units}: 0 when every region is certain, at most {top}")
    if kind in REGISTRY and not REGISTRY[kind].samples:
        entropy = ("predictive entropy of the U-Net's own probabilities from its single forward pass (no sampling, "
                   f"so no disagreement between runs is measured): the {formula}")
    elif (kind in REGISTRY and REGISTRY[kind].samples) or overlay.variance is not None:
        entropy = (f"predictive entropy of the mean probabilities of the {n}DDIM ensemble members: the {formula}, "
                   "with p the members' mean")
    else:
        entropy = f"predictive entropy of the region probabilities: the {formula}"
    definitions = {
        "uncertainty": entropy,
        "variance": (f"variance across the {n}DDIM ensemble members of each region's probability (population "
                     f"variance), averaged over the 3 regions: 0 when all members agree, at most {VARIANCE_MAX:g}. "
                     "On the demo's phantoms the members differ by little (mean variance near the tumour about "
                     "3e-4; `medseg-diff diagnose` measures it for this model), and the variance ranked the "
                     "model's errors worse than a plain U-Net's entropy: read a dark map as 'the members agree', "
                     "not as 'the segmentation is right'"),
    }
    for name in overlay.attention:
        definitions[f"attention_{name}"] = _ATTENTION_TEXT.get(name, "an internal attention map of the network")
    return definitions


def _rows(pairs: list[tuple[str, str]]) -> str:
    """Table rows; both cells must already be escaped HTML."""
    return "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in pairs)


def _case_table(overlay: CaseOverlay, context: ReportContext) -> str:
    e = html.escape
    size = _TIMES.join(f"{z:g}" for z in context.voxel_size_mm)
    order = ", ".join(f"{ordinal} axis {_AXIS_WORDS.get(code, code)}"
                      for ordinal, code in zip(("first", "second", "third"), context.axcodes))
    pairs = [
        ("Case", e(overlay.case_id)),
        ("Model", e(overlay.model_name)),
        ("Run id", e(overlay.run_id) if overlay.run_id else _NONE),
        ("Label convention", e(overlay.convention.name)),
        ("Reference image", f"<code>{e(str(_absolute(overlay.reference)))}</code><br><span class=\"muted\">the "
                            "input scan whose grid every output copies; it stays where it is (not in this "
                            "report's folder)</span>"),
        ("Grid", f"{_TIMES.join(str(n) for n in context.shape)} voxels of {size} mm. Voxel order in the file: "
                 f"{e(order)}. The montage is always shown in the radiological convention, whatever this order."),
    ]
    return f"<table>{_rows(pairs)}</table>"


def _swatch(rgb: tuple[int, int, int]) -> str:
    return f'<span class="swatch" style="background: rgb{rgb}"></span>'


def _volume_section(overlay: CaseOverlay, context: ReportContext) -> str:
    e = html.escape
    predicted = region_volumes_cm3(overlay.labels, overlay.convention, context.voxel_volume_mm3)
    truth = None
    if overlay.ground_truth is not None:
        truth = region_volumes_cm3(overlay.ground_truth, overlay.convention, context.voxel_volume_mm3)
    head = "<tr><th>Region / label</th><th>Predicted (cm\u00b3)</th>" + (
        "<th>Ground truth (cm\u00b3)</th>" if truth else "")
    rows = []
    names = [(r, _swatch(REGION_RGB[r]), f"region {r} \u2014 {REGION_NAMES[r]} (outline colour)")
             for r in _REGION_ORDER]
    names += [(x.short, _swatch(x.rgb), f"label {x.value}: {x.description} (label colour)")
              for x in label_entries(overlay.convention)]
    for key, swatch, name in names:
        cells = f'<td class="num">{predicted[key]:.2f}</td>'
        if truth:
            cells += f'<td class="num">{truth[key]:.2f}</td>'
        rows.append(f"<tr><td>{swatch}{e(name)}</td>{cells}</tr>")
    note = (
        f"Volumes = voxel count \u00d7 voxel volume ({context.voxel_volume_mm3:.4g} mm\u00b3, from the image "
        "affine). Regions are nested: WT = all tumour labels, TC = necrotic/non-enhancing core + enhancing tumour, "
        "ET = enhancing tumour; the montage draws them as outlines in the region colours. Labels are the values "
        "stored in the segmentation file; 3D Slicer and ITK-SNAP colour them with the label colours. Each colour "
        "means one thing: only enhancing tumour, which is both a region and a label, shares its colour."
    )
    return f"<h2>Tumour volumes</h2><table>{head}</tr>{''.join(rows)}</table><p class=\"muted\">{note}</p>"


def _dice_section(overlay: CaseOverlay) -> str:
    if overlay.dice:
        scores = overlay.dice
        source = overlay.dice_source or "given with the prediction (where it was computed was not recorded)"
    elif overlay.ground_truth is not None:
        scores = dice_scores(overlay.labels, overlay.ground_truth, overlay.convention)
        source = overlay.dice_source or "computed when this report was made, against the ground-truth label given " \
                                        "with the case"
    else:
        return '<h2>Agreement with ground truth</h2><p class="muted">No ground-truth label for this case.</p>'
    rows = "".join(
        f'<tr><td>{r} \u2014 {REGION_NAMES[r]}</td><td class="num">{scores[r]:.3f}</td></tr>'
        for r in _REGION_ORDER if r in scores
    )
    return (
        "<h2>Agreement with ground truth</h2><table><tr><th>Region</th><th>Dice</th></tr>"
        f'{rows}</table><p class="muted">Dice {html.escape(source)}. 1 = perfect overlap, 0 = none; both empty '
        "counts as 1.</p>"
    )


def _montage_section(overlay: CaseOverlay, context: ReportContext) -> str:
    e = html.escape
    data = base64.b64encode(context.montage_png).decode("ascii")
    alt = e(f"Montage of case {overlay.case_id}: axial, coronal and sagittal slices", quote=True)
    legend = ", ".join(f"{_swatch(REGION_RGB[r])}{r} {REGION_NAMES[r]}" for r in _REGION_ORDER)
    rows = "".join(f"<li>{_row_text(overlay, row)}</li>" for row in context.montage_rows)
    return (
        f'<h2>Slices through the tumour</h2><figure><img src="data:image/png;base64,{data}" alt="{alt}">'
        f"<figcaption>Region outlines: {legend}; solid lines on a dark halo, where outlines coincide the narrower "
        "line lies on the wider one. The slices go through the centre of the largest connected lesion of the "
        "predicted whole tumour (small separate spots do not move them). Radiological convention: the "
        "patient's right is on the image left; letters at the panel edges give the direction (R/L right/left, "
        "A/P anterior/posterior, S/I superior/inferior); positions above the columns are scanner coordinates in "
        f"mm.<br>Rows, top to bottom, each on the grey image (underlay) it names:<ol>{rows}</ol></figcaption>"
        "</figure>"
    )


def _row_text(overlay: CaseOverlay, row: MontageRow) -> str:
    e = html.escape
    underlay = e(overlay.modality_name(row.underlay))
    if row.kind == "seg":
        why = " (enhancing tumour is judged on T1ce)" if underlay == "T1ce" else ""
        return f"<b>Prediction</b> on {underlay}{why}: the predicted region outlines."
    if row.kind == "truth":
        where = (f"through the centre of the truth's own largest lesion, which lies more than {SAME_SLICES_MM:g} mm "
                 "from the prediction's, so the positions differ from the rows above" if row.own_slices
                 else "the same slices as the prediction")
        return f"<b>Ground truth</b> on {underlay}: the reference outlines, {where}."
    if row.kind == "attention":
        return f"<b>Attention: {e(row.name)}</b> on {underlay}, with the predicted WT outline."
    what = "Entropy" if row.kind == "uncertainty" else "Member variance"
    return f"<b>{what}</b> on {underlay}, with the predicted WT outline."


def _maps_section(overlay: CaseOverlay) -> str:
    e = html.escape
    definitions = map_definitions(overlay)
    items = [
        "<dt>Segmentation</dt><dd>The model's outline of the tumour regions. Check it against the images: "
        "models miss small lesions and can mark normal tissue.</dd>"
    ]
    if overlay.attention:
        described = "".join(
            f"<li><b>{e(name)}</b>: {e(definitions['attention_' + name])}. In this case the highest value is "
            f"{float(overlay.relative_attention(name)[overlay.brain_mask].max()):.2f}\u00d7 the brain's "
            "average.</li>"
            for name in overlay.attention
        )
        items.append(
            "<dt>Attention maps</dt><dd>Where the network put its internal weight while computing the "
            f"segmentation:<ul>{described}</ul>Each map file is divided by its "
            f"{ATTENTION_PERCENTILE:g}th percentile inside the brain, so 1 is that percentile; the hottest 0.5 % keep "
            "their values above 1 (not clipped: the file's maximum is the map's), and the display window 0\u20131 "
            "stored in the file shows them at the top of the scale. The montage and "
            "the viewer show each map as a multiple of its average inside the brain, on one fixed scale for every "
            "model and case: only voxels inside the brain above the average (1\u00d7) are coloured, full colour "
            f"from {ATTENTION_SCALE_TOP:g}\u00d7 the average (the colour bar reads \u2265), in the montage at most "
            "60 % opaque so the anatomy stays visible (the viewer has an opacity slider); a map that is nearly flat therefore shows nearly nothing. "
            "<b>These are model-internal weights, not a clinical finding</b>: a bright area is not a lesion, "
            "a probability of disease or a measure of correctness.</dd>"
        )
    if overlay.uncertainty is not None:
        units = overlay.uncertainty_units
        one = "ln 2 \u2248 0.69 nats" if units == "nats" else "1 bit"
        items.append(
            f"<dt>Uncertainty: entropy</dt><dd>{e(_sentence(definitions['uncertainty']))}. <b>Colour scale</b> "
            f"(fixed, the same for every case and model): 0 to {one} ({ENTROPY_SCALE_TOP[units]:.3g} {e(units)}), "
            "the entropy of one region at p = 0.5; higher values (two or three regions uncertain at once) are "
            "drawn orange in the montage (in the viewer, in the colour map's top colour) and the top of the colour bar "
            "reads \u2265. Highest value in this case's brain: "
            f"{_peak(overlay.uncertainty, overlay):.3g}. High values along the tumour border are usual; high values "
            "elsewhere mark places to review with extra care. Low uncertainty does not mean the segmentation is "
            "right.</dd>"
        )
    if overlay.variance is not None:
        items.append(
            f"<dt>Uncertainty: ensemble variance</dt><dd>{e(_sentence(definitions['variance']))}. This is the "
            "disagreement between the model's repeated samples; the entropy above also counts uncertainty every "
            "sample shares. <b>Colour scale</b> (fixed, the same for every case and model): 0 to 1/12 \u2248 "
            f"{VARIANCE_SCALE_TOP:.3f}, the value when the members split evenly between 0 and 1 on one of the "
            "three regions; higher values are drawn orange in the montage (in the viewer, in the colour map's top colour) and "
            "the top of the colour bar reads \u2265. Highest "
            f"value in this case's brain: {_peak(overlay.variance, overlay):.3g}.</dd>"
        )
    return f"<h2>How to read the maps</h2><dl>{''.join(items)}</dl>"


def _count(n: int | None, noun: str) -> str:
    """HTML: "4 ensemble members". ``n`` comes from prediction.json, so it is escaped (it may not be a number)."""
    if n is None:
        return f"{_NONE} {noun}s"
    return f"{html.escape(str(n))} {noun}" + ("" if n == 1 else "s")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _peak(values: np.ndarray, overlay: CaseOverlay) -> float:
    return float(np.asarray(values, dtype=np.float32)[overlay.brain_mask].max())


def _provenance_section(overlay: CaseOverlay) -> str:
    e = html.escape
    p = overlay.provenance

    def value(x) -> str:
        return _NONE if x is None or x == "" else e(str(x))

    if p.model_kind in REGISTRY and not REGISTRY[p.model_kind].samples:
        sampler = "none: one forward pass of the U-Net (deterministic)"
    elif p.sample_steps is not None or p.ensemble is not None:
        sampler = (f"DDIM, {_count(p.sample_steps, 'step')}, {_count(p.ensemble, 'ensemble member')}, seed "
                   f"{value(p.seed)}; output = mean member probability")
    else:
        sampler = _NONE
    window = _NONE
    if p.roi_size is not None or p.overlap is not None:
        roi = _TIMES.join(str(n) for n in p.roi_size) if p.roi_size else "?"
        window = (f"{e(roi)} voxel windows, overlap {value(p.overlap)}; probabilities blended with Gaussian weights, "
                  "attention maps stitched with feathered weights")
    spacing = "the input's own voxels" if p.spacing_mm is None else f"{_TIMES.join(f'{z:g}' for z in p.spacing_mm)} mm"
    pairs = [
        ("Model kind", value(p.model_kind)),
        ("Checkpoint", f"<code>{value(p.checkpoint)}</code>" if p.checkpoint else _NONE),
        ("MLflow model URI", f"<code>{value(p.model_uri)}</code>" if p.model_uri else _NONE),
        ("Training run id", value(p.run_id or overlay.run_id)),
        ("Checkpoint epoch", value(p.epoch)),
        ("Training data", value(p.training_data)),
        ("Training manifest", f"<code>{value(p.training_manifest)}</code>" if p.training_manifest else _NONE),
        ("Sampler", sampler),
        ("Sliding window", window),
        ("Model grid", e(f"resampled to {spacing}" if p.spacing_mm else spacing) if p.model_kind else _NONE),
        ("Region threshold", value(p.threshold)),
        ("Predicted at", value(p.predicted_at)),
    ]
    return ("<h2>Provenance</h2><p class=\"muted\">Where this prediction came from, as recorded by "
            f"<code>medseg-diff predict</code>.</p><table>{_rows(pairs)}</table>")


def _files_section(overlay: CaseOverlay, context: ReportContext) -> str:
    e = html.escape
    here = [f for f in context.files if context.out_dir is None or f.path.parent == Path(context.out_dir)]
    rows = "".join(
        f'<tr><td><a href="{e(f.path.name, quote=True)}"><code>{e(f.path.name)}</code></a></td>'
        f"<td>{e(f.description)}</td></tr>"
        for f in here
    )
    names = {f.path.name for f in here}
    seg = next(n for n in names if n.endswith(layout.seg("")))
    ctbl = next(n for n in names if n.endswith(layout.slicer_table("")))
    snap = next(n for n in names if n.endswith(layout.itksnap_table("")))
    maps = sorted(n for n in names if layout.is_map_file(n))
    maps_text = ", ".join(f"<code>{e(n)}</code>" for n in maps) or "the map files"
    inputs = _input_files(overlay)
    ref = f"<code>{e(str(_absolute(overlay.reference)))}</code>"
    input_rows = "".join(f"<tr><td>{e(name)}</td><td><code>{e(str(path))}</code></td></tr>"
                         for name, path in inputs.items())
    slicer = [
        f"Drag <code>{e(ctbl)}</code> into Slicer first; it loads as a colour table.",
        f"Add Data: the input image {ref} (outside this folder) and <code>{e(seg)}</code>. Tick <i>Show "
        f"Options</i> and <i>LabelMap</i> for <code>{e(seg)}</code>; in the Volumes module set its <i>Lookup "
        f"Table</i> to <code>{e(ctbl.removesuffix('.ctbl'))}</code>. (To edit it: right-click it in the Data "
        "module, <i>Convert labelmap to segmentation node</i>.)",
        f"Maps ({maps_text}): add them as volumes, show one as the <i>foreground</i> layer of the slice views "
        "with opacity about 0.5, and pick a colour map such as <i>Inferno</i> in the Volumes module.",
    ]
    itksnap = [
        f"<i>File \u2192 Open Main Image</i>: the input image {ref}.",
        f"<i>Segmentation \u2192 Open Segmentation</i>: <code>{e(seg)}</code>.",
        f"<i>Segmentation \u2192 Import Label Descriptions</i>: <code>{e(snap)}</code> (names and colours).",
        f"<i>File \u2192 Add Another Image</i>: a map ({maps_text}), shown as a semi-transparent overlay; "
        "choose its colour map in <i>Tools \u2192 Layer Inspector</i>.",
    ]
    folder = f" (<code>{e(str(_absolute(context.out_dir)))}</code>)" if context.out_dir is not None else ""
    return (
        f"<h2>Files</h2><p>These files are in the folder of this report{folder}. The NIfTI files lie exactly on "
        "the grid of the input images (same size, voxel order and position), so they overlay the original scan "
        f"without resampling.</p><table><tr><th>File</th><th>Content</th></tr>{rows}</table>"
        "<p>The input images are <b>not</b> in this folder; they are read from where they are:</p>"
        f"<table><tr><th>Input</th><th>Path</th></tr>{input_rows}</table>"
        f"<h3>Open in 3D Slicer</h3>{_ordered(slicer)}<h3>Open in ITK-SNAP</h3>{_ordered(itksnap)}"
    )


def _input_files(overlay: CaseOverlay) -> dict[str, Path]:
    """Input files by plain name, one row per file (an MSD 4D file holds every modality); the reference image,
    whose grid every output copies, is named as such."""
    reference = _absolute(overlay.reference)
    by_path: dict[Path, list[str]] = {reference: []}
    for modality, path in overlay.image_paths.items():
        by_path.setdefault(_absolute(path), []).append(overlay.modality_name(modality))
    rows = {}
    for path, names in by_path.items():
        role = ["reference image (defines the grid)"] if path == reference else []
        rows[" \u2014 ".join(filter(None, [", ".join(names)] + role))] = path
    return rows


def _absolute(path: str | Path) -> Path:
    return Path(path).expanduser().absolute()


def _ordered(items: list[str]) -> str:
    """An ordered list of already-escaped HTML items."""
    return "<ol>" + "".join(f"<li>{x}</li>" for x in items) + "</ol>"
