"""The NiiVue viewer fragment of report.html: embedded volumes, legend, fallback; driven in headless Chromium.

The browser test talks to Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated
JSON on file descriptors 3 and 4), so it needs no Python package beyond the standard library; it sends real
(trusted) mouse-wheel input, reads NiiVue's crosshair, and compares screenshots of the canvas.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
import re
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_diff.data.conventions import BRATS2021
from medseg_diff.export import viewer
from browser import CHROMIUM, DevTools
from factories import LPS_AFFINE, tiny_images, tiny_label

LABELS = [(1, "NCR - necrotic tumour core", (86, 180, 233)), (2, "ED - peritumoural edema", (240, 228, 66)),
          (4, "ET - enhancing tumour", (213, 94, 0))]
DATA_BLOCK = re.compile(r'<script type="application/json" data-role="data">(.*?)</script>', re.S)


def phantom(n: int = 24):
    """A BraTS-2021-like n^3 case: four modalities, nested labels, an attention and an uncertainty map."""
    labels = tiny_label((n, n, n), BRATS2021)
    images = tiny_images(labels, BRATS2021)
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"))
    attention = np.exp(-((grid - n / 2) ** 2).sum(0) / (2 * (n / 5) ** 2)).astype(np.float32)
    uncertainty = np.where(labels > 0, 0.2 + 0.4 * (labels == 4), 0.0).astype(np.float32)
    maps = [("attention: self", attention, 0.0, 1.0, "fraction of robust max", "Model-internal weights <b>."),
            viewer.HeatMap("uncertainty", uncertainty, 0.0, np.log(2), "nats", "Predictive entropy.", "viridis")]
    return images, labels, maps


@pytest.fixture
def fake_bundle(tmp_path, monkeypatch):
    """A stand-in NiiVue bundle with a matching record, so the fragment is built without npm."""
    js = tmp_path / "niivue.umd.js"
    js.write_text("window.niivue = {fake: '</script><!--'};\n", encoding="utf-8")
    info = tmp_path / "niivue.json"
    info.write_text(json.dumps({"version": "0.0-test", "sha256": hashlib.sha256(js.read_bytes()).hexdigest()}))
    monkeypatch.setattr(viewer, "BUNDLE_PATH", js)
    monkeypatch.setattr(viewer, "BUNDLE_INFO", info)
    return js


def payload_of(fragment: str) -> dict:
    blocks = DATA_BLOCK.findall(fragment)
    assert len(blocks) == 1
    return json.loads(blocks[0])


def decode(b64: str) -> nib.Nifti1Image:
    raw = base64.b64decode(b64)
    assert raw[:2] == b"\x1f\x8b"  # gzip
    return nib.Nifti1Image.from_bytes(gzip.decompress(raw))


def test_fragment_embeds_the_volumes_and_affine(fake_bundle):
    images, labels, maps = phantom()
    fragment = viewer.viewer_section(images, labels, LABELS, maps, LPS_AFFINE)
    data = payload_of(fragment)
    seg = decode(data["labels"]["b64"])
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(seg.dataobj), labels)
    assert [x["value"] for x in data["labels"]["entries"]] == [1, 2, 4]
    # FLAIR first (the default underlay), then the others in the caller's order
    assert [g["name"] for g in data["images"]] == ["flair", "t1", "t1ce", "t2"]
    for entry in data["images"]:
        image = decode(entry["b64"])
        assert image.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, LPS_AFFINE)
        np.testing.assert_allclose(image.header.get_qform(), LPS_AFFINE)
        assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
        original = images[entry["name"]]
        step = entry["step"]
        top = float(image.dataobj.inter) + 255 * step  # values above are clipped
        np.testing.assert_allclose(image.get_fdata(), np.minimum(original, top), atol=step / 2 + 1e-4)
        assert image.dataobj.slope == pytest.approx(step)
        assert (np.asarray(image.dataobj.get_unscaled())[original == 0] == 0).all()  # background stays exactly 0
        assert np.mean(original > top) <= 0.002  # only the top 0.1 % of the brain is clipped
    expected = [(m.name, m.array, m.vmin, m.vmax, m.units) if isinstance(m, viewer.HeatMap) else m[:5] for m in maps]
    for entry, (name, array, vmin, vmax, units) in zip(data["maps"], expected, strict=True):
        image = decode(entry["b64"])
        assert entry["name"] == name and entry["units"] == units and image.get_data_dtype() == np.uint8
        assert entry["step"] == pytest.approx((vmax - vmin) / 255)
        np.testing.assert_allclose(image.get_fdata(), np.clip(array, vmin, vmax), atol=entry["step"] / 2 + 1e-6)
        np.testing.assert_allclose(image.affine, LPS_AFFINE)
    assert [m["colormap"] for m in data["maps"]] == ["inferno", "viridis"]
    # the start position is the centre of the segmentation, in world mm
    centre = np.rint(np.argwhere(labels > 0).mean(0))
    np.testing.assert_allclose(data["start_mm"], (LPS_AFFINE @ np.append(centre, 1))[:3])


def test_legend_controls_and_escaping(fake_bundle):
    images, labels, maps = phantom()
    hostile = [(1, "<img onerror=x>", (1, 2, 3))] + LABELS[1:]
    fragment = viewer.viewer_section(images, labels, hostile, maps, LPS_AFFINE, element_id="case-viewer")
    assert fragment.startswith('<section class="mdv" id="case-viewer"')
    for value, name, rgb in hostile:
        assert f"label {value}: {html.escape(name)}" in fragment
        assert f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})" in fragment
    assert "<img onerror" not in fragment and "Model-internal weights &lt;b&gt;." in fragment
    for name, units in (("attention: self", "fraction of robust max"), ("uncertainty", "nats")):
        assert f"<b>{name}</b>" in fragment and units in fragment and f">{name}</option>" in fragment
    for control in ("grey", "map", "seg", "seg-opacity", "map-opacity", "layout", "plane", "slice"):
        assert f'data-role="{control}"' in fragment
    for option in (">FLAIR<", ">T1ce<", ">T1<", ">T2<", ">3 planes + 3D<", ">axial<", ">coronal<", ">sagittal<"):
        assert option in fragment
    # the inlined bundle cannot close its <script>: exactly one </script> per element
    assert fragment.count("<script") == fragment.count("</script>") == 3
    assert "window.niivue = {fake: '<\\/script><\\!--'}" in fragment
    # nothing is loaded from elsewhere
    assert "src=" not in fragment and "http" not in fragment.split('data-role="data"')[0]


def test_no_bundle_gives_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(viewer, "BUNDLE_PATH", tmp_path / "missing.js")
    assert not viewer.niivue_available() and viewer.niivue_version() is None
    images, labels, maps = phantom(8)
    note = viewer.viewer_section(images, labels, LABELS, maps, LPS_AFFINE)
    assert "<script" not in note and "<canvas" not in note
    assert "interactive viewer is not available" in note and "not installed" in note
    assert "make setup" in note and "fetch_niivue.sh" in note and "static slice montage of this report" in note


def test_tampered_bundle_is_not_used(fake_bundle):
    fake_bundle.write_text("window.niivue = {evil: true};\n", encoding="utf-8")
    available, reason = viewer.niivue_status()
    assert not available and "SHA-256" in reason
    note = viewer.viewer_section(*phantom(8)[:2], LABELS, [], LPS_AFFINE)
    assert "SHA-256" in note and "<script" not in note


@pytest.mark.parametrize("change, message", [
    (lambda i, l, m: (i, l[:-1], m), "shape"),
    (lambda i, l, m: (i, np.where(l == 4, 3, l), m), "no entry in label_colours"),
    (lambda i, l, m: (i, l, [("x", m[0][1], 1.0, 1.0, "u", "d")]), "vmin < vmax"),
    (lambda i, l, m: (i, l, [("x", m[0][1], 0.0, 1.0, "u", "d", "rainbow")]), "colormap"),
    (lambda i, l, m: ({}, l, m), "grey image"),
])
def test_inconsistent_inputs_are_refused(fake_bundle, change, message):
    images, labels, maps = change(*phantom(8))
    with pytest.raises(ValueError, match=message):
        viewer.viewer_section(images, labels, LABELS, maps, LPS_AFFINE)


def test_unknown_grey_and_bad_affine_are_refused(fake_bundle):
    images, labels, maps = phantom(8)
    with pytest.raises(ValueError, match="grey image 't1c'"):
        viewer.viewer_section(images, labels, LABELS, maps, LPS_AFFINE, grey="t1c")
    with pytest.raises(ValueError, match="affine"):
        viewer.viewer_section(images, labels, LABELS, maps, np.zeros((4, 4)))


def test_vendored_bundle_matches_the_pinned_release():
    """The installed bundle (when there is one) is the release and hash that tools/fetch_niivue.sh pins."""
    script = (Path(__file__).resolve().parents[2] / "tools" / "fetch_niivue.sh").read_text(encoding="utf-8")
    version = re.search(r"^VERSION=(\S+)$", script, re.M).group(1)
    sha256 = re.search(r"^SHA256=([0-9a-f]{64})$", script, re.M).group(1)
    if not viewer.niivue_available():
        pytest.skip("NiiVue bundle not installed (sh tools/fetch_niivue.sh needs npm and network)")
    info = json.loads(viewer.BUNDLE_INFO.read_text(encoding="utf-8"))
    assert (info["version"], info["sha256"]) == (version, sha256) and viewer.niivue_version() == version
    text = viewer.BUNDLE_PATH.read_text(encoding="utf-8")
    assert viewer._script_safe(text) == text  # inlined byte for byte
    assert text.lstrip().startswith("(function(") and "sA.niivue={}" in text[:400]  # UMD defining window.niivue


@pytest.mark.slow
@pytest.mark.real_data
def test_full_size_case_stays_a_few_megabytes(real_data, fake_bundle):
    """A 240 x 240 x 155 BraTS case: a few MB per image, well under one per map."""
    folder = real_data / "BraTS-GLI-99999-000"
    load = lambda suffix: nib.load(folder / f"BraTS-GLI-99999-000-{suffix}.nii.gz")  # noqa: E731
    reference = load("t2f")
    images = {m: np.asarray(load(m).dataobj, np.float32) for m in ("t2f", "t1c", "t1n", "t2w")}
    labels = np.asarray(load("seg").dataobj).astype(np.uint8)
    brain = images["t2f"] > 0
    smooth = np.linspace(0, 1, brain.shape[0], dtype=np.float32)[:, None, None] * brain
    maps = [("attention: self", smooth, 0.0, 1.0, "fraction", "a smooth map"),
            ("uncertainty", np.where(labels > 0, 0.4, 0.0), 0.0, np.log(2), "nats", "entropy", "viridis")]
    colours = [(1, "NCR", (86, 180, 233)), (2, "ED", (240, 228, 66)), (3, "ET", (213, 94, 0))]
    fragment = viewer.viewer_section(images, labels, colours, maps, reference.affine)
    data = payload_of(fragment)
    assert [g["name"] for g in data["images"]][0] == "t2f"
    assert all(len(g["b64"]) < 2.5e6 for g in data["images"])
    assert all(len(m["b64"]) < 1e6 for m in data["maps"]) and len(data["labels"]["b64"]) < 0.5e6
    assert len(fragment) < 8e6  # plus the 2.3 MB NiiVue bundle in a real report


# --------------------------------------------------------------------------------------- headless Chromium


def write_page(path: Path, fragment: str) -> Path:
    path.write_text(f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>viewer</title></head>'
                    f'<body style="margin: 8px; font-family: sans-serif">{fragment}</body></html>', encoding="utf-8")
    return path


def open_viewer(tmp_path: Path, fragment: str, width=1000, height=1000) -> DevTools:
    page = write_page(tmp_path / "viewer.html", fragment)
    browser = DevTools(tmp_path / "profile", width, height)
    try:
        browser.call("Page.navigate", url=page.resolve().as_uri())
        deadline = time.monotonic() + 20
        state = None
        while time.monotonic() < deadline:
            state = browser.js("(document.querySelector('section.mdv') || {dataset: {}}).dataset.state || null")
            if state in ("ready", "error"):
                break
            time.sleep(0.1)
        status = browser.js("(document.querySelector('[data-role=status]') || {}).textContent || ''")
        assert state == "ready", f"viewer state {state!r}: {status}; errors: {browser.errors()}"
        browser.js("window.medsegViewers[0].ready")
    except BaseException:
        browser.close()
        raise
    return browser


VIEWER = "window.medsegViewers[0]"
CROSSHAIR = f"Array.from({VIEWER}.nv.frac2vox({VIEWER}.nv.scene.crosshairPos)).map(Math.round)"


def canvas_clip(browser: DevTools) -> dict:
    return browser.js(
        "(() => { const r = document.querySelector('[data-role=canvas]').getBoundingClientRect();"
        " return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; })()")


def set_control(browser: DevTools, role: str, value) -> None:
    """Change a control as a user would (value, then its input/change event), and wait for the viewer."""
    browser.js(f"(() => {{ const c = document.querySelector('[data-role=\"{role}\"]');"
               f" if (c.type === 'checkbox') c.checked = {json.dumps(value)}; else c.value = {json.dumps(str(value))};"
               " c.dispatchEvent(new Event('input', {bubbles: true}));"
               f" c.dispatchEvent(new Event('change', {{bubbles: true}})); return {VIEWER}.apply(); }})()")


def near(pixels: np.ndarray, rgb, tolerance=0.06) -> float:
    """Fraction of pixels within ``tolerance`` (0..1 per channel) of the colour ``rgb`` (0..255)."""
    return float((np.abs(pixels - np.array(rgb) / 255).max(axis=-1) < tolerance).mean())


needs_browser = pytest.mark.skipif(
    not CHROMIUM.exists() or not viewer.niivue_available(),
    reason="needs /usr/bin/chromium and the vendored NiiVue bundle (make setup with npm; sh tools/fetch_niivue.sh)",
)


@needs_browser
@pytest.mark.timeout(60)
def test_viewer_draws_scrolls_and_switches_layers_in_headless_chromium(tmp_path):
    images, labels, maps = phantom(32)
    fragment = viewer.viewer_section(images, labels, LABELS, maps, LPS_AFFINE, height_px=600)
    browser = open_viewer(tmp_path, fragment)
    try:
        clip = canvas_clip(browser)
        assert clip["width"] > 500 and clip["height"] == 600
        first = browser.screenshot(clip)
        assert first.std() > 0.05 and (first.max(axis=-1) > 0.1).mean() > 0.1  # drawn, not blank
        nv = f"{VIEWER}.nv"
        assert browser.js(f"{nv}.volumes.length") == 2  # FLAIR + segmentation
        assert browser.js(f"{nv}.volumes[0].dims.slice(1, 4)") == [32, 32, 32]
        start = browser.js(CROSSHAIR)
        # the read-out names the label under the crosshair, which starts in the tumour
        assert "label " in browser.js("document.querySelector('[data-role=status]').textContent")

        # segmentation fully opaque: every label colour of the table is painted; opacity 0: none is
        set_control(browser, "seg-opacity", 100)
        opaque = browser.screenshot(clip)
        for value, name, rgb in LABELS:
            assert near(opaque, rgb) > 1e-4, f"label {value} colour {rgb} not drawn"
        set_control(browser, "seg-opacity", 0)
        hidden = browser.screenshot(clip)
        assert all(near(hidden, rgb) < near(opaque, rgb) / 5 for _, _, rgb in LABELS)

        # trusted mouse-wheel input over the axial tile scrolls the axial slice
        tile = browser.js(
            f"(() => {{ const nv = {nv}, r = nv.canvas.getBoundingClientRect(), d = nv.uiData.dpr || 1;"
            " const s = nv.screenSlices.find(s => s.axCorSag === 0); const [l, t, w, h] = s.leftTopWidthHeight;"
            " return [r.left + (l + w / 2) / d, r.top + (t + h / 2) / d]; })()")
        browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=tile[0], y=tile[1])
        before = browser.screenshot(clip)
        for _ in range(3):
            browser.call("Input.dispatchMouseEvent", type="mouseWheel", x=tile[0], y=tile[1], deltaX=0, deltaY=120)
        scrolled = browser.js(CROSSHAIR)
        assert scrolled[:2] == start[:2] and abs(scrolled[2] - start[2]) == 3, (start, scrolled)
        after = browser.screenshot(clip)
        assert np.abs(after - before).max(axis=-1).astype(bool).mean() > 0.005  # the picture changed
        assert after.std() > 0.05
        assert browser.js("document.querySelector('[data-role=slice]').value") == str(scrolled[2])

        # the slice slider moves the chosen plane (sagittal here); then arrow keys step it
        set_control(browser, "plane", 0)
        set_control(browser, "slice", 5)
        assert browser.js(CROSSHAIR) == [5, scrolled[1], scrolled[2]]
        slid = browser.screenshot(clip)
        assert np.abs(slid - after).max(axis=-1).astype(bool).mean() > 0.005
        browser.js(f"{nv}.canvas.focus()")
        for key, code in (("ArrowUp", 38), ("ArrowUp", 38), ("PageDown", 34)):
            for kind in ("rawKeyDown", "keyUp"):
                browser.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)
        assert browser.js(CROSSHAIR) == [0, scrolled[1], scrolled[2]]  # 5 + 1 + 1 - 10, clamped at 0
        assert browser.js("document.querySelector('[data-role=slice]').value") == "0"
        assert np.abs(browser.screenshot(clip) - slid).max(axis=-1).astype(bool).mean() > 0.005

        # a heat map as a third layer, with its colour bar; then the T1ce underlay
        set_control(browser, "seg-opacity", 50)
        no_map = browser.screenshot(clip)
        set_control(browser, "map", 0)
        assert browser.js(f"{nv}.volumes.length") == 3 and browser.js(f"{nv}.opts.isColorbar") is True
        with_map = browser.screenshot(clip)
        assert np.abs(with_map - no_map).max(axis=-1).astype(bool).mean() > 0.01
        assert "attention: self" in browser.js("document.querySelector('[data-role=status]').textContent")
        set_control(browser, "grey", 2)  # T1ce
        assert browser.js(f"{nv}.volumes.map(v => v.medsegName)") == ["T1ce", "label", "attention: self"]
        set_control(browser, "map", -1)
        set_control(browser, "seg", False)
        assert browser.js(f"{nv}.volumes.length") == 1 and browser.screenshot(clip).std() > 0.05
        assert browser.errors() == []
    finally:
        browser.close()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_the_viewer_shows_the_montages_orientation(fake_bundle):
    """One orientation for both pictures: radiological (patient's right on the image left) and the sagittal view
    with anterior on the left, as the montage draws it (``export.slices.EDGES``); NiiVue's own default puts the
    nose right. The viewer script passes both settings to NiiVue."""
    from medseg_diff.export.slices import EDGES

    images, labels, maps = phantom()
    data = payload_of(viewer.viewer_section(images, labels, LABELS, maps, LPS_AFFINE))
    assert EDGES["sagittal"][:2] == ("A", "P") and EDGES["axial"][:2] == ("R", "L")
    assert data["sagittal_nose_left"] is True and data["radiological"] is True
    script = viewer._asset("viewer.js")
    assert "sagittalNoseLeft: data.sagittal_nose_left" in script
    assert "isRadiologicalConvention: data.radiological" in script


def _asymmetric_case(n: int = 32):
    """A head (sphere) with one lesion to its patient's right, front and top, stored in LPS voxel order with
    ``LPS_AFFINE``: whatever the voxel order, every view must draw the lesion up and to the left of the head's
    centre (radiological axial/coronal: patient's right on the left; sagittal: nose on the left; superior up)."""
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij")).astype(np.float32)
    centre = (n - 1) / 2
    head = ((grid - centre) ** 2).sum(0) <= 13 ** 2
    lesion = ((grid - (np.array([centre + 6, centre + 6, centre + 6])[:, None, None, None])) ** 2).sum(0) <= 4 ** 2
    # RAS index (a, b, c) -> LPS file index (n-1-a, n-1-b, c): LPS_AFFINE's first two axes point left and back
    to_file = lambda ras: np.ascontiguousarray(ras[::-1, ::-1, :])  # noqa: E731
    image = to_file(np.where(lesion, 220.0, np.where(head, 100.0, 0.0)).astype(np.float32))
    labels = to_file(np.where(lesion, 2, 0).astype(np.uint8))
    return {m: image for m in ("flair", "t1", "t1ce", "t2")}, labels


def _up_left_of_head(lesion: np.ndarray, head: np.ndarray) -> tuple[float, float]:
    """(rows, columns) from the head's centre to the lesion's, in pixels: both negative = up and left."""
    return tuple(np.argwhere(lesion).mean(0) - np.argwhere(head).mean(0))


def test_the_montage_draws_an_off_centre_lesion_up_and_left_in_every_view(tmp_path):
    from medseg_diff.export.slices import Slicer
    from medseg_diff.predictions.types import CaseOverlay

    images, labels = _asymmetric_case()
    reference = tmp_path / "case_flair.nii.gz"
    nib.save(nib.Nifti1Image(images["flair"], LPS_AFFINE), str(reference))
    overlay = CaseOverlay(case_id="case", reference=reference, images=images, labels=labels, convention=BRATS2021,
                          probabilities=None, uncertainty=None, attention={}, model_name="m", run_id=None,
                          ground_truth=None, dice=None)
    slicer = Slicer(overlay, LPS_AFFINE)
    for panel in slicer.panels(slicer.centres()[0]):
        rows, cols = _up_left_of_head(panel.regions[1], panel.image > 0)
        assert rows < -2 and cols < -2, (panel.view, rows, cols)


@needs_browser
@pytest.mark.timeout(90)
@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_the_viewer_draws_the_same_lesion_where_the_montage_does(tmp_path, view):
    """Rendered in headless Chromium: the single-view layout of each plane puts the lesion up and to the left of the
    head's centre, as the montage does (the test above) — one orientation for both pictures."""
    images, labels = _asymmetric_case()
    fragment = viewer.viewer_section(images, labels, LABELS, [], LPS_AFFINE, height_px=500)
    browser = open_viewer(tmp_path, fragment)
    try:
        set_control(browser, "seg-opacity", 100)
        set_control(browser, "layout", view)
        shot = browser.screenshot(canvas_clip(browser))
        lesion = np.abs(shot - np.array(LABELS[1][2]) / 255).max(axis=-1) < 0.06
        head = shot.max(axis=-1) > 0.2
        assert lesion.sum() > 50 and head.sum() > 3 * lesion.sum(), (view, lesion.sum(), head.sum())
        rows, cols = _up_left_of_head(lesion, head)
        assert rows < -5 and cols < -5, (view, rows, cols)
        assert browser.errors() == []
    finally:
        browser.close()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
