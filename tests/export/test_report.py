"""report.html of medseg_diff.export: self-contained, escaped, complete; rendered in headless Chromium."""

from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from medseg_diff.data.conventions import BRATS2021, BRATS2023
from medseg_diff.errors import DataError
from medseg_diff.export import CaseOverlay, Provenance, dice_scores, export_case, region_volumes_cm3
from medseg_diff.export.report import RESEARCH_NOTE, ReportContext, case_of_report, render_report

ZOOMS = (1.0, 1.2, 2.5)  # voxel volume 3 mm^3
HOSTILE_ID = '<script>alert("x")</script> & Co'
CHROMIUM = Path("/usr/bin/chromium")


def make_overlay(tmp_path: Path, case_id: str = "case7", **changes) -> CaseOverlay:
    """A 24 x 20 x 16 LPS phantom with a nested tumour; its FLAIR is written as the reference."""
    shape = (24, 20, 16)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    brain = ((x - 12) / 11) ** 2 + ((y - 10) / 9) ** 2 + ((z - 8) / 7) ** 2 <= 1
    flair = np.where(brain, 100.0 + 2 * x, 0.0).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[8:14, 6:12, 5:11] = BRATS2021.edema  # 216 voxels in WT
    labels[9:13, 7:11, 6:10] = BRATS2021.core  # 64 in TC
    labels[10:12, 8:10, 7:9] = BRATS2021.enhancing  # 8 in ET
    affine = np.diag([-ZOOMS[0], -ZOOMS[1], ZOOMS[2], 1.0])
    folder = tmp_path / "input"
    folder.mkdir(exist_ok=True)
    reference = folder / "flair.nii.gz"
    nib.Nifti1Image(flair, affine).to_filename(reference)
    fields = dict(
        case_id=case_id, reference=reference, images={"flair": flair}, labels=labels, convention=BRATS2021,
        probabilities=None, uncertainty=np.where(labels > 0, 0.3, 0.0).astype(np.float32),
        attention={"self": flair / 10}, model_name="diffusion <v2>", run_id="run&1", ground_truth=None, dice=None,
    )
    fields.update(changes)
    return CaseOverlay(**fields)


def test_region_volumes_use_the_affine_voxel_volume():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, :2] = 1
    labels[1, 1, 1] = 2
    labels[2, 2, :3] = 4
    volumes = region_volumes_cm3(labels, BRATS2021, voxel_mm3=1000.0)
    assert volumes == {"TC": 5.0, "WT": 6.0, "ET": 3.0, "NCR": 2.0, "ED": 1.0}


def test_dice_scores_follow_brats_empty_rule():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[0, 0, :2] = 2
    pred = truth.copy()
    pred[1, 1, 1] = 2
    scores = dice_scores(pred, truth, BRATS2021)
    assert scores["WT"] == pytest.approx(2 * 2 / 5)
    assert scores["TC"] == 1.0 and scores["ET"] == 1.0  # both empty


def test_report_is_self_contained_and_complete(tmp_path):
    result = export_case(make_overlay(tmp_path), tmp_path / "out")
    page = result.report.read_text(encoding="utf-8")
    # the only scripts are inline (the NiiVue viewer: bundle, data, code); nothing outside them loads anything
    assert all("src" not in attrs for attrs in re.findall(r"<script\b([^>]*)>", page, flags=re.I))
    outside = re.sub(r"<script\b[^>]*>.*?</script>", "", page, flags=re.S | re.I)
    assert 'src="http' not in outside and "<link" not in outside.lower() and "<script" not in outside.lower()
    assert "url(" not in outside and "@import" not in outside and "@font-face" not in outside
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert base64.b64decode(srcs[0].split(",", 1)[1]) == result.montage.read_bytes()
    assert RESEARCH_NOTE in page
    # volumes in cm^3: WT 216, TC 64, ET 8 voxels of 3 mm^3; NCR 56, ED 152
    for cm3 in ("0.65", "0.19", "0.02", "0.17", "0.46"):
        assert f">{cm3}</td>" in page
    assert "case7" in page and "run&amp;1" in page and "diffusion &lt;v2&gt;" in page
    assert "not a clinical finding" in page and "nats" in page
    for path in result.paths():
        if path != result.report:
            assert f'href="{path.name}"' in page
    assert "Import Label Descriptions" in page and "3D Slicer" in page and "LabelMap" in page
    assert "No ground-truth label" in page


def test_case_id_and_names_are_escaped(tmp_path):
    overlay = make_overlay(tmp_path, case_id=HOSTILE_ID)
    result = export_case(overlay, tmp_path / "out", prefix="case7")
    page = result.report.read_text(encoding="utf-8")
    assert HOSTILE_ID not in page and "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; Co" in page
    assert case_of_report(result.report) == HOSTILE_ID


def test_dice_given_or_computed_from_ground_truth(tmp_path):
    given = make_overlay(tmp_path, dice={"WT": 0.912, "TC": 0.805, "ET": 0.733})
    page = export_case(given, tmp_path / "a").report.read_text(encoding="utf-8")
    assert all(f">{v}</td>" in page for v in ("0.912", "0.805", "0.733"))
    overlay = make_overlay(tmp_path)
    truth = overlay.labels.copy()
    truth[truth == BRATS2021.enhancing] = BRATS2021.core  # GT without ET, prediction with ET
    overlay.ground_truth = truth
    page = export_case(overlay, tmp_path / "b").report.read_text(encoding="utf-8")
    assert "Ground truth (cm\u00b3)" in page and ">1.000</td>" in page and ">0.000</td>" in page


def test_report_of_another_case_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    export_case(make_overlay(tmp_path, case_id="first"), out)
    before = (out / "report.html").read_bytes()
    with pytest.raises(DataError, match="first"):
        export_case(make_overlay(tmp_path, case_id="second"), out)
    assert (out / "report.html").read_bytes() == before
    assert not list(out.glob("second*"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "report.html").write_text("<html>someone else's</html>")
    with pytest.raises(DataError, match="not written by medseg-diff"):
        export_case(make_overlay(tmp_path), foreign)
    assert (foreign / "report.html").read_text(encoding="utf-8") == "<html>someone else's</html>"


def test_brats2023_label_names_in_report(tmp_path):
    overlay = make_overlay(tmp_path, convention=BRATS2023)
    overlay.labels[overlay.labels == 4] = BRATS2023.enhancing
    page = export_case(overlay, tmp_path / "out").report.read_text(encoding="utf-8")
    assert "label 3: ET - enhancing tumour" in page and "brats2023" in page


DIFFUSION = Provenance(
    model_kind="diffusion", checkpoint="/models/diff/best.pt", model_uri="models:/medseg-diffusion/3",
    run_id="0f1e2d3c", epoch=40, training_data="synthetic BraTS-like phantoms (medseg-diff synth), 3 mm voxels: "
    "data set 'synthetic-brats', 24 cases, brats2021 labels", training_manifest="/data/synth/manifest.json",
    sample_steps=10, ensemble=4, seed=7, overlap=0.25, roi_size=(32, 32, 32), threshold=0.5,
    predicted_at="2026-11-27 12:00 UTC",
)


def _text(page: str) -> str:
    """The page's text, tags removed and entities decoded, whitespace collapsed."""
    import html

    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def _section(page: str, heading: str) -> str:
    start = page.index(f"<h2>{heading}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start:end if end > 0 else None]


def test_file_list_holds_only_files_in_the_folder_and_inputs_are_given_by_path(tmp_path):
    overlay = make_overlay(tmp_path, images={"flair": make_overlay(tmp_path).images["flair"]})
    overlay.image_paths = {"flair": overlay.reference, "t1": tmp_path / "input" / "t1.nii.gz"}
    result = export_case(overlay, tmp_path / "out")
    page = result.report.read_text(encoding="utf-8")
    files = _section(page, "Files")
    linked = re.findall(r'href="([^"]+)"', files)
    assert linked and all((result.out_dir / name).is_file() for name in linked)
    assert sorted(linked) == sorted(p.name for p in result.paths() if p != result.report)
    assert "All files are in the folder" not in page
    reference = str(overlay.reference.resolve())
    assert reference in page[:page.index("<h2>Tumour volumes</h2>")] and reference in files  # the case table
    assert str((tmp_path / "input" / "t1.nii.gz").resolve()) in files
    assert "not</b> in this folder" in files and f'href="{overlay.reference.name}"' not in page
    assert "FLAIR \u2014 reference image (defines the grid)" in _text(files)


def test_provenance_table_names_checkpoint_training_data_and_sampler(tmp_path):
    page = export_case(make_overlay(tmp_path, provenance=DIFFUSION), tmp_path / "a").report.read_text("utf-8")
    table = _text(_section(page, "Provenance"))
    for expected in ("/models/diff/best.pt", "models:/medseg-diffusion/3", "0f1e2d3c", "40",
                     "synthetic BraTS-like phantoms", "'synthetic-brats'", "/data/synth/manifest.json",
                     "DDIM, 10 steps, 4 ensemble members, seed 7", "overlap 0.25", "32 \u00d7 32 \u00d7 32"):
        assert expected in table, expected
    unet = Provenance(model_kind="unet", checkpoint="/models/unet/best.pt", overlap=0.5, roi_size=(32, 32, 32))
    page = export_case(make_overlay(tmp_path, provenance=unet), tmp_path / "b").report.read_text("utf-8")
    table = _text(_section(page, "Provenance"))
    assert "one forward pass of the U-Net" in table and "DDIM" not in table and "not recorded" in table


def test_dice_says_where_it_came_from_and_never_claims_an_evaluation(tmp_path):
    label = tmp_path / "input" / "case7_seg.nii.gz"
    source = f"computed at predict time against the case's label file {label}"
    overlay = make_overlay(tmp_path, dice={"WT": 0.9, "TC": 0.8, "ET": 0.7}, dice_source=source)
    page = export_case(overlay, tmp_path / "a").report.read_text(encoding="utf-8")
    assert f"Dice {source}." in _text(page)
    unsourced = make_overlay(tmp_path, dice={"WT": 0.9, "TC": 0.8, "ET": 0.7})
    page = export_case(unsourced, tmp_path / "b").report.read_text(encoding="utf-8")
    assert "as computed by the evaluation" not in page and "where it was computed was not recorded" in page


def test_each_map_says_exactly_what_it_is(tmp_path):
    unet = make_overlay(tmp_path, attention={}, provenance=Provenance(model_kind="unet"))
    text = _text(_section(export_case(unet, tmp_path / "u").report.read_text("utf-8"), "How to read the maps"))
    assert "single forward pass" in text and "no disagreement" in text
    assert "repeated samples disagree" not in text and "ensemble" not in text
    overlay = make_overlay(tmp_path, provenance=DIFFUSION)
    overlay.variance = overlay.uncertainty / 10
    overlay.attention["cross"] = overlay.attention["self"] / 2
    page = export_case(overlay, tmp_path / "d").report.read_text(encoding="utf-8")
    text = _text(_section(page, "How to read the maps"))
    assert "Predictive entropy of the mean probabilities of the 4 DDIM ensemble members" in text
    assert "summed over the 3 regions (TC, WT, ET), in nats" in text and "3\u00b7ln 2" in text
    assert "Variance across the 4 DDIM ensemble members" in text
    assert "how much of that gathering draws on each voxel" in text and "not a tumour probability" in text
    assert "rough, blocky guess of the tumour regions" in text and "99.5th percentile in the brain" in text
    assert "case7_variance.nii.gz" in _section(page, "Files")


def test_scales_and_thresholds_are_stated(tmp_path):
    overlay = make_overlay(tmp_path, provenance=DIFFUSION)
    overlay.variance = overlay.uncertainty / 10
    text = _text(export_case(overlay, tmp_path / "out").report.read_text(encoding="utf-8"))
    assert "fixed, the same for every case and model): 0 to ln 2 \u2248 0.69 nats" in text
    assert "0 to 1/12 \u2248 0.083" in text and "colour bar reads \u2265" in text and "drawn orange" in text
    assert "full colour from 2\u00d7 the average" in text and "nearly flat therefore shows nearly nothing" in text
    peak = float(overlay.relative_attention("self")[overlay.brain_mask].max())
    assert f"the highest value is {peak:.2f}\u00d7 the brain's average" in text


def test_grid_orientation_in_plain_words_and_rows_name_their_underlay(tmp_path):
    overlay = make_overlay(tmp_path)
    overlay.images["t1ce"] = overlay.images["flair"] * 0.7
    page = export_case(overlay, tmp_path / "out").report.read_text(encoding="utf-8")
    text = _text(page)
    assert "axes LPS" not in text and "LPS" not in text
    assert "first axis right to left, second axis front to back, third axis feet to head" in text  # LPS
    assert "Prediction on FLAIR" in text and "Prediction on T1ce (enhancing tumour is judged on T1ce)" in text
    assert "Attention: self on FLAIR" in text and "Entropy on FLAIR" in text


def test_viewer_section_goes_after_the_montage(tmp_path):
    from medseg_diff.export.types import OutputFile

    overlay = make_overlay(tmp_path)
    files = [OutputFile(tmp_path / f"case7{suffix}", "x") for suffix in ("_seg.nii.gz", "_labels.ctbl",
                                                                          "_labels_itksnap.txt")]
    context = ReportContext(montage_png=b"png", files=files, voxel_volume_mm3=1.0, voxel_size_mm=(1.0, 1.0, 1.0),
                            axcodes="RAS", shape=(24, 20, 16), viewer_html='<section id="viewer"></section>')
    page = render_report(overlay, context)
    assert page.index("<h2>Slices through the tumour</h2>") < page.index('<section id="viewer">') \
        < page.index("<h2>How to read the maps</h2>")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    result = export_case(make_overlay(tmp_path, case_id=HOSTILE_ID), tmp_path / "out", prefix="case7")
    shot = tmp_path / "shot.png"
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
        result.report.resolve().as_uri(),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert shot.exists(), f"no screenshot; chromium said:\n{completed.stderr[-2000:]}"
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 0.05  # not blank
    banner = (np.abs(pixels - np.array([0xFD, 0xEC, 0xEE]) / 255).max(axis=-1) < 0.02).mean()
    assert banner > 0.01  # the research-use banner is painted near the top
    dark = (pixels.max(axis=-1) < 0.1).mean()
    assert dark > 0.02  # the embedded montage (dark background) is displayed
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_report_embeds_the_viewer_with_every_map_or_says_why_not(tmp_path, monkeypatch):
    """With NiiVue installed the report carries the viewer (every attention map, the entropy on its fixed scale,
    the labels); without it, a note that says why, and the static montage stays either way."""
    import json as _json

    from medseg_diff.export import viewer

    overlay = make_overlay(tmp_path)
    if viewer.niivue_available():
        page = export_case(overlay, tmp_path / "with").report.read_text(encoding="utf-8")
        data = _json.loads(re.search(r'<script type="application/json" data-role="data">(.*?)</script>', page,
                                     flags=re.S).group(1))
        names = [m["name"] for m in data["maps"]]
        assert names == [f"attention: {n}" for n in overlay.attention] + ["uncertainty"]
        entropy = data["maps"][-1]
        assert entropy["vmax"] == pytest.approx(math.log(2.0)) and entropy["vmin"] == 0.0
        assert {e["value"] for e in data["labels"]["entries"]} == {1, 2, 4}
        assert page.index('id="viewer"') > page.index("montage")
    monkeypatch.setattr(viewer, "BUNDLE_PATH", tmp_path / "missing.js")
    page = export_case(overlay, tmp_path / "without").report.read_text(encoding="utf-8")
    assert "<script" not in page and "not installed" in page and 'src="data:image/png;base64,' in page


def test_provenance_values_from_prediction_json_are_escaped(tmp_path):
    """prediction.json is a file anyone can edit: a non-number where a count belongs must not become HTML."""
    import dataclasses

    hostile = dataclasses.replace(DIFFUSION, sample_steps='<img src=x onerror="alert(1)">', ensemble="<b>4</b>")
    page = export_case(make_overlay(tmp_path, provenance=hostile), tmp_path / "out").report.read_text("utf-8")
    assert "<img src=x" not in page and "<b>4</b>" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt; step" in page
