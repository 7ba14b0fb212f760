"""report.html of medseg_diff.export: self-contained, escaped, complete; rendered in headless Chromium."""

from __future__ import annotations

import base64
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
from medseg_diff.export import CaseOverlay, dice_scores, export_case, region_volumes_cm3
from medseg_diff.export.report import RESEARCH_NOTE, case_of_report

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
    assert 'src="http' not in page and "<link" not in page.lower() and "<script" not in page.lower()
    assert "url(" not in page and "@import" not in page and "@font-face" not in page
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
    assert HOSTILE_ID not in page and "<script" not in page
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
