"""NIfTI overlays, colour tables, montage orientation and fault handling of medseg_diff.export."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from medseg_diff.data.conventions import BRATS2021, BRATS2023, CONVENTIONS, MSD, REGIONS, LabelConvention
from medseg_diff.errors import DataError
from medseg_diff.export import CaseOverlay, export_case, itksnap_label_file, load_reference_grid, montage_panels
from medseg_diff.export import montage as montage_module
from medseg_diff.export import overlays as overlays_module
from medseg_diff.export import slicer_colour_table
from medseg_diff.export.montage import CONTOUR_WIDTHS, HALO_POINTS, montage_rows
from medseg_diff.export.scales import OVER_RGB, colour_bar_ticks, heat_rgba, heat_scale
from medseg_diff.export.slices import largest_lesion, montage_slices, tumour_centre
from medseg_diff.data.vocabulary import REGION_RGB, label_entries
from medseg_diff.export.types import ATTENTION_SCALE_TOP

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
SHAPE = (20, 24, 14)  # RAS voxels of the phantom
ZOOMS = (1.0, 1.2, 2.0)  # anisotropic on purpose
BLOB = (4, 19, 7)  # bright blob: low x = patient's LEFT, high y = ANTERIOR


def ras_phantom(convention: LabelConvention = BRATS2021) -> dict[str, np.ndarray]:
    """World content in RAS voxel order: a head, a left-anterior blob, a nested tumour, maps."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    brain = ((x - 10) / 9) ** 2 + ((y - 12) / 11) ** 2 + ((z - 7) / 6.5) ** 2 <= 1
    flair = np.where(brain, 100.0 + x + 0.5 * y, 0.0).astype(np.float32)
    flair[(x - BLOB[0]) ** 2 + (y - BLOB[1]) ** 2 + (z - BLOB[2]) ** 2 <= 4] = 400.0
    r = np.sqrt((x - 13) ** 2 + (y - 9) ** 2 + ((z - 7) * 2) ** 2)
    labels = np.zeros(SHAPE, np.uint8)
    labels[r <= 5] = convention.edema
    labels[r <= 3] = convention.core
    labels[(r > 2) & (r <= 3)] = convention.enhancing
    regions = convention.to_regions(labels).astype(np.float32)
    attention = np.exp(-r / 3).astype(np.float32) * 7.0
    attention[BLOB] = 500.0  # one extreme voxel: the robust max must ignore it
    return {
        "flair": flair,
        "t1ce": (flair * 0.5).astype(np.float32),
        "labels": labels,
        "probabilities": (0.05 + 0.9 * regions).astype(np.float32),
        "uncertainty": (np.exp(-((r - 5) ** 2)) * 0.69 * brain).astype(np.float32),
        "attention": attention,
    }


def ras_affine() -> np.ndarray:
    affine = np.diag([*ZOOMS, 1.0])
    affine[:3, 3] = (-10.0, -14.0, -12.0)
    return affine


def reorient(volume: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The RAS phantom volume stored in voxel order ``codes`` (same world content), and its affine."""
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    affine = ras_affine() @ inv_ornt_aff(transform, SHAPE)
    return apply_orientation(volume, transform), affine


def make_overlay(tmp_path: Path, codes: str = "LPS", convention: LabelConvention = BRATS2021,
                 case_id: str = "case001", **changes) -> CaseOverlay:
    """A CaseOverlay whose reference FLAIR is written to tmp_path in orientation ``codes``."""
    world = ras_phantom(convention)
    data = {k: reorient(v, codes)[0] for k, v in world.items() if k != "probabilities"}
    affine = reorient(world["flair"], codes)[1]
    probs = np.stack([reorient(p, codes)[0] for p in world["probabilities"]])
    folder = tmp_path / f"input_{codes}"
    folder.mkdir(exist_ok=True)
    reference = folder / f"{case_id}_flair.nii.gz"
    nib.Nifti1Image(data["flair"], affine).to_filename(reference)
    fields = dict(
        case_id=case_id, reference=reference, images={"flair": data["flair"], "t1ce": data["t1ce"]},
        labels=data["labels"], convention=convention, probabilities=probs, uncertainty=data["uncertainty"],
        attention={"self": data["attention"], "cross": np.sqrt(data["attention"])}, model_name="diffusion",
        run_id="run42", ground_truth=None, dice=None,
    )
    fields.update(changes)
    return CaseOverlay(**fields)


def assert_on_reference_grid(path: Path, reference: Path) -> nib.Nifti1Image:
    out, ref = nib.load(path), nib.load(reference)
    assert out.shape[:3] == ref.shape[:3]
    assert np.array_equal(out.affine, ref.affine)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine)
    for form in ("sform", "qform"):
        assert int(out.header[f"{form}_code"]) == int(ref.header[f"{form}_code"])
        assert np.allclose(getattr(out.header, f"get_{form}")(), getattr(ref.header, f"get_{form}")(), atol=1e-6)
    return out


# --- NIfTI outputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("codes", ["LPS", "RAS", "PSL"])
def test_nifti_outputs_lie_on_the_reference_grid(tmp_path, codes):
    overlay = make_overlay(tmp_path, codes)
    overlay.variance = (overlay.uncertainty / 20).astype(np.float32)  # an ensemble's member variance
    result = export_case(overlay, tmp_path / "out")
    nifti = [result.seg, result.uncertainty, result.variance, result.probabilities, *result.attention.values()]
    for path in nifti:
        assert_on_reference_grid(path, overlay.reference)
    seg = nib.load(result.seg)
    assert seg.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(seg.dataobj), overlay.labels)
    unc = nib.load(result.uncertainty)
    assert unc.get_data_dtype() == np.float32
    assert np.array_equal(np.asanyarray(unc.dataobj), overlay.uncertainty)
    assert np.array_equal(np.asanyarray(nib.load(result.variance).dataobj), overlay.variance)
    probs = np.asanyarray(nib.load(result.probabilities).dataobj)
    assert probs.shape == (*overlay.labels.shape, len(REGIONS))
    assert np.array_equal(np.moveaxis(probs, -1, 0), overlay.probabilities)
    for name, path in result.attention.items():
        image = nib.load(path)
        att = np.asanyarray(image.dataobj)
        assert att.dtype == np.float32 and att.min() >= 0.0
        assert np.allclose(att, overlay.normalised_attention(name))
        # the file's maximum is the map's (not one of hundreds tied at a clipped 1), shown in a 0-1 window
        raw = np.asarray(overlay.attention[name])
        assert np.unravel_index(np.argmax(att), att.shape) == np.unravel_index(np.argmax(raw), raw.shape)
        assert (float(image.header["cal_min"]), float(image.header["cal_max"])) == (0.0, 1.0)


def test_header_geometry_copied_with_its_codes(tmp_path):
    """sform 'aligned' + qform 'unknown' + int16 scaling on the reference: codes kept, labels unscaled."""
    overlay = make_overlay(tmp_path, "LPS")
    ref = nib.load(overlay.reference)
    header = ref.header.copy()
    header.set_data_dtype(np.int16)
    header.set_sform(ref.affine, code="aligned")
    header.set_qform(ref.affine, code="unknown")
    header.set_slope_inter(2.0, 5.0)
    odd = overlay.reference.with_name("odd_flair.nii.gz")
    nib.Nifti1Image(np.round(overlay.images["flair"]).astype(np.int16), ref.affine, header).to_filename(odd)
    overlay.reference = odd
    result = export_case(overlay, tmp_path / "out")
    out = assert_on_reference_grid(result.seg, odd)
    assert int(out.header["sform_code"]) == 2 and int(out.header["qform_code"]) == 0
    assert np.array_equal(np.asanyarray(out.dataobj), overlay.labels)


def test_attention_scaled_by_robust_max(tmp_path):
    overlay = make_overlay(tmp_path, "RAS")
    scaled = overlay.normalised_attention("self")
    raw = overlay.attention["self"]
    brain_p995 = np.percentile(raw[overlay.brain_mask], 99.5)
    # the extreme voxel does not set the scale (1 is the brain's 99.5th percentile) but keeps its rank and value:
    # it stays the map's maximum, far above 1, instead of tying with the other top 0.5 % at a clipped 1
    assert scaled[BLOB] == pytest.approx(500.0 / brain_p995, rel=1e-5) and scaled[BLOB] > 1.0
    assert np.unravel_index(np.argmax(scaled), scaled.shape) == BLOB
    assert np.allclose(scaled, raw / brain_p995, atol=1e-6)
    assert (scaled >= 0.99).mean() < 0.05
    overlay.attention["zero"] = np.zeros_like(raw)
    assert not overlay.normalised_attention("zero").any()


def _sitk_image(overlay: CaseOverlay):
    """The reference FLAIR as a SimpleITK image with the same world geometry (LPS, z-y-x array)."""
    import SimpleITK as sitk

    ref = nib.load(overlay.reference)
    spacing = np.sqrt((ref.affine[:3, :3] ** 2).sum(axis=0))
    image = sitk.GetImageFromArray(np.round(np.transpose(overlay.images["flair"], (2, 1, 0))).astype(np.int16))
    image.SetSpacing(spacing.tolist())
    flip = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS
    image.SetDirection((flip @ ref.affine[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin((flip @ ref.affine[:3, 3]).tolist())
    return image


def _write_dicom_series(image, folder: Path) -> None:
    import locale

    import SimpleITK as sitk

    locale_before = locale.setlocale(locale.LC_ALL)  # GDCM's writer sets the process locale to "C"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = list(direction[0:7:3]) + list(direction[1:8:3])
    for z in range(image.GetDepth()):
        plane = image[:, :, z]
        corner = image.TransformIndexToPhysicalPoint((0, 0, z))
        plane.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in corner))
        plane.SetMetaData("0020|0037", "\\".join(f"{v:.6f}" for v in orientation))
        plane.SetMetaData("0020|0013", str(z))
        plane.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.7")
        plane.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(plane)
    locale.setlocale(locale.LC_ALL, locale_before)


@pytest.mark.parametrize("kind", ["mha", "dicom"])
def test_itk_references_keep_their_geometry(tmp_path, kind):
    """MHA file or DICOM folder as the reference: the NIfTI outputs sit where ITK puts the input."""
    sitk = pytest.importorskip("SimpleITK")
    overlay = make_overlay(tmp_path, "LPS")
    image = _sitk_image(overlay)
    if kind == "mha":
        overlay.reference = overlay.reference.with_name("case001_flair.mha")
        sitk.WriteImage(image, str(overlay.reference))
    else:
        overlay.reference = overlay.reference.parent / "case001_flair_dicom"
        _write_dicom_series(image, overlay.reference)
    result = export_case(overlay, tmp_path / "out")
    seg = sitk.ReadImage(str(result.seg))
    assert np.allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.allclose(seg.GetSpacing(), image.GetSpacing(), atol=1e-5)
    assert np.allclose(seg.GetDirection(), image.GetDirection(), atol=1e-5)
    assert np.array_equal(np.transpose(sitk.GetArrayFromImage(seg), (2, 1, 0)), overlay.labels)


# --- colour tables --------------------------------------------------------------------------------

_ITKSNAP_ROW = re.compile(r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([01])\s+([01])\s+"([^"]*)"\s*$')


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_slicer_colour_table_parses(name):
    convention = CONVENTIONS[name]
    rows = [line.split() for line in slicer_colour_table(convention).splitlines() if not line.startswith("#")]
    assert all(len(row) == 6 for row in rows)
    table = {int(row[0]): (row[1], [int(v) for v in row[2:]]) for row in rows}
    assert sorted(table) == list(convention.labels)
    assert all(0 <= v <= 255 for _, rgba in table.values() for v in rgba)
    assert len({tuple(rgba) for _, rgba in table.values()}) == len(table)  # distinct colours
    if convention.name.startswith("brats"):
        assert table[convention.enhancing][0] == "ET" and table[1][0] == "NCR" and table[2][0] == "ED"
    else:
        assert table[1][0] == "edema" and table[3][0] == "enhancing_tumour"


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_itksnap_label_file_parses(name):
    convention = CONVENTIONS[name]
    lines = [line for line in itksnap_label_file(convention).splitlines() if not line.startswith("#")]
    parsed = [_ITKSNAP_ROW.match(line) for line in lines]
    assert all(parsed), lines
    values = {int(m.group(1)): m.group(8) for m in parsed}
    assert sorted(values) == list(convention.labels)
    assert values[0] == "Clear Label"
    assert "enhancing" in values[convention.enhancing].lower()


#: Okabe & Ito (2008) colour-blind-safe palette
OKABE_ITO = {(0, 0, 0), (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
             (204, 121, 167)}


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_one_colour_per_concept_across_montage_and_label_tables(name):
    """A region outline colour (montage) is never reused for another concept in the label tables: NCR is not TC's
    blue, edema is not WT's yellow; only enhancing tumour -- region ET and label ET are the same voxels -- shares."""
    convention = CONVENTIONS[name]
    concepts: dict[tuple[int, int, int], set[str]] = {}
    for region, rgb in REGION_RGB.items():
        concepts.setdefault(rgb, set()).add(region)
    for entry in label_entries(convention):
        concepts.setdefault(entry.rgb, set()).add("ET" if entry.value == convention.enhancing else entry.short)
    assert all(len(names) == 1 for names in concepts.values()), concepts
    assert set(concepts) <= OKABE_ITO
    entries = {e.value: e.rgb for e in label_entries(convention)}
    slicer = [line.split() for line in slicer_colour_table(convention).splitlines() if not line.startswith("#")]
    assert {int(r[0]): tuple(int(v) for v in r[2:5]) for r in slicer if r[0] != "0"} == entries
    snap = [_ITKSNAP_ROW.match(line) for line in itksnap_label_file(convention).splitlines()
            if not line.startswith("#")]
    assert {int(m.group(1)): tuple(int(m.group(i)) for i in (2, 3, 4)) for m in snap if m.group(1) != "0"} == entries


# --- montage --------------------------------------------------------------------------------------


def test_montage_png_written(tmp_path):
    result = export_case(make_overlay(tmp_path, "LPS"), tmp_path / "out")
    assert result.montage.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(result.montage)
    assert pixels.shape[0] >= 600 and pixels.shape[1] >= 600
    assert pixels[..., :3].std() > 0.05


def test_display_is_the_same_for_every_file_orientation(tmp_path):
    panels = {codes: montage_panels(o, nib.load(o.reference).affine)
              for codes in ("RAS", "LPS", "PSL", "ILA")
              for o in [make_overlay(tmp_path, codes)]}
    for codes, views in panels.items():
        for panel, ras in zip(views, panels["RAS"]):
            assert panel.view == ras.view
            assert np.array_equal(panel.image, ras.image), (codes, panel.view)
            assert np.array_equal(panel.regions, ras.regions), (codes, panel.view)
            assert np.array_equal(panel.attention["self"], ras.attention["self"]), (codes, panel.view)
            assert panel.pixel_mm == pytest.approx(ras.pixel_mm)


def test_display_is_radiological_with_true_aspect(tmp_path):
    """The left-anterior blob: image right + top in the axial view, image right in the coronal one."""
    overlay = make_overlay(tmp_path, "LPS")  # slices through the tumour centre = the blob
    overlay.labels = np.where(reorient(_blob_mask(), "LPS")[0], BRATS2021.edema, 0).astype(np.uint8)
    axial, coronal, sagittal = montage_panels(overlay, nib.load(overlay.reference).affine)
    for panel, side in ((axial, "right"), (coronal, "right"), (sagittal, "left")):
        rows, cols = np.nonzero(panel.image == 400.0)
        assert rows.size, panel.view
        half = panel.image.shape[1] / 2
        assert (cols.mean() > half) if side == "right" else (cols.mean() < half), panel.view
    rows, _ = np.nonzero(axial.image == 400.0)
    assert rows.mean() < axial.image.shape[0] / 2  # anterior up
    assert axial.pixel_mm == pytest.approx((ZOOMS[1], ZOOMS[0]))  # (row: A-P, column: R-L) mm
    assert coronal.pixel_mm == pytest.approx((ZOOMS[2], ZOOMS[0]))
    assert sagittal.pixel_mm == pytest.approx((ZOOMS[2], ZOOMS[1]))


def _blob_mask() -> np.ndarray:
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    return (x - BLOB[0]) ** 2 + (y - BLOB[1]) ** 2 + (z - BLOB[2]) ** 2 <= 4


def test_tumour_centre_lies_on_tumour_slices():
    crescent = np.zeros((30, 30, 5), bool)
    x, y = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    ring = (np.hypot(x - 15, y - 15) <= 12) & (np.hypot(x - 15, y - 15) >= 10) & (x < 15)
    crescent[ring, 2] = True
    i, j, k = tumour_centre(crescent)
    assert crescent[i].any() and crescent[:, j].any() and crescent[:, :, k].any()
    assert tumour_centre(np.zeros((8, 10, 6), bool)) == (4, 5, 3)


def test_slices_follow_ground_truth_when_prediction_is_empty(tmp_path):
    overlay = make_overlay(tmp_path, "LPS")
    overlay.ground_truth = np.where(reorient(_blob_mask(), "LPS")[0], BRATS2021.edema, 0).astype(np.uint8)
    overlay.labels = np.zeros_like(overlay.labels)
    axial = montage_panels(overlay, nib.load(overlay.reference).affine)[0]
    assert not axial.regions.any() and axial.truth[REGIONS.index("WT")].any()
    assert (axial.image == 400.0).any()  # the slice goes through the blob


def _far_false_positive() -> np.ndarray:
    """RAS: a 150-voxel block far from the phantom's 260-voxel tumour (centred at x 13, y 9, z 7)."""
    block = np.zeros(SHAPE, bool)
    block[2:7, 15:20, 3:9] = True
    return block


def test_largest_lesion_keeps_the_biggest_component():
    mask = np.zeros((12, 12, 12), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[6:10, 6:10, 6:9] = True  # 48 voxels
    mask[0, 11, 11] = True
    assert np.array_equal(largest_lesion(mask), np.pad(np.ones((4, 4, 3), bool), ((6, 2), (6, 2), (6, 3))))
    assert not largest_lesion(np.zeros((3, 3, 3), bool)).any()


@pytest.mark.parametrize("codes", ["LPS", "RAS"])
def test_slices_go_through_the_largest_lesion_despite_a_far_false_positive(tmp_path, codes):
    """A far-away false positive pulls the centre of mass of the whole prediction off the tumour; the slices must
    stay where they are without it: through the centre of the largest predicted lesion."""
    clean = make_overlay(tmp_path, codes)
    noisy = make_overlay(tmp_path, codes)
    noisy.labels = noisy.labels.copy()
    noisy.labels[reorient(_far_false_positive(), codes)[0]] = BRATS2021.edema
    affine = nib.load(clean.reference).affine
    expected, got = montage_panels(clean, affine), montage_panels(noisy, affine)
    assert [p.position for p in got] == [p.position for p in expected]
    whole = REGIONS.index("WT")
    for panel in got:  # every view cuts the main tumour, the one with the core in it
        assert panel.regions[REGIONS.index("TC")].any() and panel.regions[whole].any(), panel.view


def test_truth_row_uses_its_own_slices_when_its_lesion_lies_elsewhere(tmp_path):
    overlay = make_overlay(tmp_path, "LPS")
    affine = nib.load(overlay.reference).affine
    overlay.ground_truth = overlay.labels.copy()
    assert montage_slices(overlay, affine)[1] is None  # same lesion: the truth row shares the prediction's slices
    assert all("own slices" not in row.subtitle for row in montage_rows(overlay))
    world = ras_phantom()["labels"]
    overlay.ground_truth = reorient(np.roll(world, 8, axis=1), "LPS")[0]  # 8 voxels x 1.2 mm anterior
    predicted, truth = montage_slices(overlay, affine)
    assert truth is not None
    axial, coronal, _ = truth
    assert coronal.position != predicted[1].position  # the truth's own A-P position
    assert float(coronal.position.split()[1]) - float(predicted[1].position.split()[1]) == pytest.approx(9.6)
    for panel in truth:
        assert panel.truth[REGIONS.index("TC")].any(), panel.view
    truth_row = next(row for row in montage_rows(overlay, own_truth_slices=True) if row.kind == "truth")
    assert truth_row.own_slices and "own slices" in truth_row.subtitle
    result = export_case(overlay, tmp_path / "out")
    assert "truth's own largest lesion" in result.report.read_text(encoding="utf-8")


def test_montage_rows_name_their_underlay_with_t1ce_for_the_prediction(tmp_path):
    overlay = make_overlay(tmp_path, "RAS", variance=None)
    overlay.variance = overlay.uncertainty / 10
    rows = montage_rows(overlay)
    assert [(r.kind, r.underlay) for r in rows] == [
        ("seg", "flair"), ("seg", "t1ce"), ("attention", "flair"), ("attention", "flair"),
        ("uncertainty", "flair"), ("variance", "flair")]
    assert [r.subtitle for r in rows[:2]] == ["on FLAIR", "on T1ce"]
    panel = montage_panels(overlay, nib.load(overlay.reference).affine)[0]
    assert np.array_equal(panel.underlays["t1ce"], panel.image * 0.5)  # the phantom's T1ce is FLAIR / 2


def test_region_outlines_are_solid_thick_and_on_a_dark_halo(tmp_path):
    """TC and ET were thin dashed lines that vanished on bright FLAIR tumour."""
    from matplotlib.contour import ContourSet
    from matplotlib.figure import Figure

    overlay = make_overlay(tmp_path, "RAS")
    panel = montage_panels(overlay, nib.load(overlay.reference).affine)[0]
    ax = Figure().add_subplot()
    montage_module._draw_panel(ax, panel, montage_rows(overlay)[0], (0.0, 400.0), None)
    drawn = [(tuple(int(round(v * 255)) for v in c.get_edgecolor()[0][:3]), float(c.get_linewidth()[0]),
              c.get_linestyle()[0]) for c in ax.collections if isinstance(c, ContourSet)]
    assert all(dashes is None for _, _, (_, dashes) in drawn)  # every line solid
    halos = [i for i, (rgb, _, _) in enumerate(drawn) if rgb == (0, 0, 0)]
    for region in ("WT", "TC", "ET"):
        index = next(i for i, (rgb, _, _) in enumerate(drawn) if rgb == REGION_RGB[region])
        width = drawn[index][1]
        assert width == CONTOUR_WIDTHS[region] and width >= 1.2
        assert any(drawn[h][1] == pytest.approx(width + HALO_POINTS) for h in halos), region
        assert max(halos) < index  # every halo lies under every colour
    assert CONTOUR_WIDTHS["WT"] > CONTOUR_WIDTHS["TC"] > CONTOUR_WIDTHS["ET"]  # coinciding outlines all show


def test_attention_is_coloured_only_inside_the_brain_above_its_mean(tmp_path):
    overlay = make_overlay(tmp_path, "LPS")
    panel = montage_panels(overlay, nib.load(overlay.reference).affine)[0]
    scale = heat_scale(overlay, "attention", "self")
    assert (scale.low, scale.top) == (1.0, ATTENTION_SCALE_TOP)  # multiples of the brain's average, fixed
    relative = overlay.relative_attention("self")
    assert float(relative[overlay.brain_mask].mean()) == pytest.approx(1.0, rel=1e-5)
    # the pictures and the exported file show one map: they differ by a constant factor only
    exported = overlay.normalised_attention("self")
    np.testing.assert_allclose(relative, exported / exported[overlay.brain_mask].mean(dtype=np.float64), rtol=1e-5)
    values = panel.attention["self"]
    rgba = heat_rgba(values, scale, panel.brain)
    outside = ~panel.brain
    assert (values[outside] > 0.05).any()  # the map itself is not zero in the air around the head
    assert not rgba[outside, 3].any()  # but nothing of it is drawn there
    below = panel.brain & (values <= scale.low)
    above = panel.brain & (values > scale.low + 0.1)
    assert below.any() and not rgba[below, 3].any()
    assert above.any() and (rgba[above, 3] > 0).all()


def test_a_nearly_flat_attention_map_shows_nearly_nothing(tmp_path):
    """Stretching a map whose values differ by a few per cent over the whole colour map would paint noise as
    structure: on the fixed scale (multiples of the brain's average) a flat map stays transparent."""
    overlay = make_overlay(tmp_path, "LPS")
    rng = np.random.default_rng(0)
    overlay.attention = {"flat": (1.0 + 0.02 * rng.random(overlay.labels.shape)).astype(np.float32)}
    panel = montage_panels(overlay, nib.load(overlay.reference).affine)[0]
    rgba = heat_rgba(panel.attention["flat"], heat_scale(overlay, "attention", "flat"), panel.brain)
    assert rgba[..., 3].max() < 0.6 * 0.1  # at most a tenth of full opacity anywhere
    assert rgba[..., 3].max() <= 0.6 + 1e-6  # at most 60 % opaque: the anatomy shows through (was 75 %)


def test_entropy_and_variance_use_one_fixed_scale_with_over_range_marked(tmp_path):
    """Two cases whose maps peak at 0.1 and 2.0 nats get the same colour for the same value; values above the fixed
    top are drawn in the over-range colour and the colour bar's top reads "≥"."""
    quiet, loud = make_overlay(tmp_path, "RAS", case_id="quiet"), make_overlay(tmp_path, "RAS", case_id="loud")
    quiet.uncertainty = quiet.uncertainty * (0.1 / quiet.uncertainty.max())
    loud.uncertainty = loud.uncertainty * (2.0 / loud.uncertainty.max())
    quiet.variance, loud.variance = quiet.uncertainty / 100, loud.uncertainty / 5
    for kind, top in (("uncertainty", np.log(2.0)), ("variance", 0.25 / 3)):
        a, b = heat_scale(quiet, kind), heat_scale(loud, kind)
        assert a == b and a.low == 0.0 and a.top == pytest.approx(top) and a.over_range
        values = np.array([0.1 * top, 0.6 * top, 1.5 * top], np.float32)
        colours = heat_rgba(values, a)
        assert np.array_equal(colours, heat_rgba(values, b))
        assert tuple(colours[2, :3]) == pytest.approx(OVER_RGB) and colours[2, 3] > 0
        assert all(tuple(c[:3]) != pytest.approx(OVER_RGB) for c in colours[:2])
        ticks, labels = colour_bar_ticks(a)
        assert ticks[-1] == pytest.approx(top) and labels[-1].startswith("\u2265")
    quiet.uncertainty_units = "bits"
    assert heat_scale(quiet, "uncertainty").top == 1.0  # one region at p = 0.5 is 1 bit


def test_dollar_signs_are_text_not_mathtext(tmp_path):
    overlay = make_overlay(tmp_path, "RAS", case_id="a$b$", model_name="unet $\\nosuchcommand{$")
    result = export_case(overlay, tmp_path / "out", prefix="c1")
    assert result.montage.stat().st_size > 10_000


def test_4d_reference_uses_its_spatial_grid(tmp_path):
    """MSD stores the modalities as one 4D image; its first three axes are the grid."""
    overlay = make_overlay(tmp_path, "LPS", convention=MSD)
    ref = nib.load(overlay.reference)
    stacked = np.stack([overlay.images["flair"]] * 4, axis=-1)
    four_d = overlay.reference.with_name("BRATS_001.nii.gz")
    nib.Nifti1Image(stacked, ref.affine).to_filename(four_d)
    overlay.reference = four_d
    result = export_case(overlay, tmp_path / "out", prefix="BRATS_001")
    seg = assert_on_reference_grid(result.seg, four_d)
    assert seg.ndim == 3 and np.array_equal(np.asanyarray(seg.dataobj), overlay.labels)


# --- bad input and faults -------------------------------------------------------------------------


def test_shape_mismatch_names_case_and_file(tmp_path):
    overlay = make_overlay(tmp_path, "LPS", case_id="BraTS-XYZ-1")
    overlay.attention["self"] = overlay.attention["self"][:-1]
    with pytest.raises(DataError) as info:
        export_case(overlay, tmp_path / "out")
    message = str(info.value)
    assert "BraTS-XYZ-1" in message and str(overlay.reference) in message and "attention 'self'" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda o: o.attention["self"].__setitem__((1, 1, 1), np.nan), "NaN"),
        (lambda o: o.uncertainty.__setitem__((2, 2, 2), np.inf), "Inf"),
        (lambda o: o.labels.__setitem__((3, 3, 3), 3), "values [3]"),  # 3 is not a BraTS-2021 label
        (lambda o: setattr(o, "ground_truth", np.full(o.labels.shape, 7, np.uint8)), "ground_truth"),
        (lambda o: o.attention["cross"].__setitem__((0, 0, 0), -1.0), "negative"),
        (lambda o: setattr(o, "probabilities", o.probabilities * 2), "outside [0, 1]"),
        (lambda o: setattr(o, "probabilities", o.probabilities[:2]), "probabilities has shape"),
        (lambda o: setattr(o, "dice", {"WT": 1.5}), "dice"),
        (lambda o: setattr(o, "images", {"flair": np.zeros_like(o.images["flair"])}), "empty"),
        (lambda o: setattr(o, "uncertainty_units", "percent"), "uncertainty_units"),
        (lambda o: setattr(o, "variance", -o.uncertainty), "variance has negative values"),
        (lambda o: setattr(o, "reference", o.reference.with_name("missing.nii.gz")), "not found"),
    ],
)
def test_bad_input_raises_data_error(tmp_path, change, expected):
    overlay = make_overlay(tmp_path, "RAS")
    change(overlay)
    with pytest.raises(DataError, match=re.escape(expected)) as info:
        export_case(overlay, tmp_path / "out")
    assert "case001" in str(info.value)


def test_truncated_reference_is_a_data_error(tmp_path):
    overlay = make_overlay(tmp_path, "RAS")
    overlay.reference.write_bytes(overlay.reference.read_bytes()[:40])
    with pytest.raises(DataError, match=r"case001: .*flair\.nii\.gz: (unreadable|truncated)"):
        export_case(overlay, tmp_path / "out")


def test_unsafe_prefix_and_input_folder_are_refused(tmp_path):
    overlay = make_overlay(tmp_path, "RAS", case_id="../escape")
    with pytest.raises(DataError, match="file name"):
        export_case(overlay, tmp_path / "out")
    overlay = make_overlay(tmp_path, "RAS")
    with pytest.raises(DataError, match="folder of the input images"):
        export_case(overlay, overlay.reference.parent)


def test_failure_midway_keeps_previous_outputs_and_other_files(tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = export_case(make_overlay(tmp_path, "LPS"), out)
    unrelated = out / "notes.txt"
    unrelated.write_text("keep me")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_montage(*args, **kwargs):
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr(overlays_module, "render_montage", broken_montage)
    changed = make_overlay(tmp_path, "LPS")
    changed.labels = np.zeros_like(changed.labels)
    with pytest.raises(RuntimeError, match="disk full"):
        export_case(changed, out)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # seg written before the failure was not renamed over the old one
    assert np.array_equal(np.asanyarray(nib.load(first.seg).dataobj), make_overlay(tmp_path, "LPS").labels)


def test_rerun_replaces_own_outputs_only(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "other_case_seg.nii.gz").write_bytes(b"not ours")
    export_case(make_overlay(tmp_path, "LPS"), out)
    result = export_case(make_overlay(tmp_path, "LPS"), out)
    assert (out / "other_case_seg.nii.gz").read_bytes() == b"not ours" and (out / "sub").is_dir()
    expected = [p.name for p in result.paths()] + ["other_case_seg.nii.gz", "sub"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # no temporary files left


@pytest.mark.parametrize("convention", [BRATS2023, MSD])
def test_other_conventions_round_trip(tmp_path, convention):
    overlay = make_overlay(tmp_path, "LPS", convention=convention)
    result = export_case(overlay, tmp_path / "out", prefix="p1")
    assert result.seg.name == "p1_seg.nii.gz"
    assert np.array_equal(np.asanyarray(nib.load(result.seg).dataobj), overlay.labels)


# --- real cases (full 240 x 240 x 155 grids) -----------------------------------------------------


def _real_case(case: str) -> Path:
    folder = REAL / case
    if not folder.is_dir():
        pytest.skip(f"real data not found: {folder} (needs ../shared/data/real beside the repository)")
    return folder


@pytest.mark.real_data
@pytest.mark.parametrize("case, axcodes", [("BraTS-GLI-00001-000", "LPS"), ("BraTS-MET-00110-000", "RAS")])
def test_real_case_outputs_on_the_full_reference_grid(tmp_path, case, axcodes):
    folder = _real_case(case)
    reference = folder / f"{case}-t2f.nii.gz"
    flair = np.asarray(nib.load(reference).dataobj, dtype=np.float32)
    labels = np.zeros(flair.shape, np.uint8)  # fake prediction: thresholded FLAIR
    labels[flair > np.percentile(flair[flair > 0], 98)] = BRATS2023.edema
    labels[flair > np.percentile(flair[flair > 0], 99.5)] = BRATS2023.enhancing
    overlay = CaseOverlay(
        case_id=case, reference=reference, images={"flair": flair}, labels=labels, convention=BRATS2023,
        probabilities=None, uncertainty=None, attention={"self": flair}, model_name="threshold", run_id=None,
        ground_truth=None, dice=None,
    )
    result = export_case(overlay, tmp_path / "out")
    assert "".join(nib.aff2axcodes(nib.load(reference).affine)) == axcodes
    assert load_reference_grid(reference).shape == (240, 240, 155)
    for path in (result.seg, result.attention["self"]):
        assert_on_reference_grid(path, reference)
    assert np.array_equal(np.asanyarray(nib.load(result.seg).dataobj), labels)
    assert mpimg.imread(result.montage).shape[0] > 600


@pytest.mark.real_data
def test_real_label_file_round_trips_on_a_float64_reference(tmp_path):
    """BraTS-GLI-99999-000: float64 images, a 0/1/2/3 label file (a model's output, used here as labels)."""
    case = "BraTS-GLI-99999-000"
    folder = _real_case(case)
    reference = folder / f"{case}-t2f.nii.gz"
    labels = np.asanyarray(nib.load(folder / f"{case}-seg.nii.gz").dataobj)
    flair = np.asarray(nib.load(reference).dataobj, dtype=np.float32)
    overlay = CaseOverlay(
        case_id=case, reference=reference, images={"flair": flair}, labels=labels, convention=BRATS2023,
        probabilities=None, uncertainty=None, attention={}, model_name="given", run_id=None,
        ground_truth=labels, dice=None,
    )
    result = export_case(overlay, tmp_path / "out")
    out = assert_on_reference_grid(result.seg, reference)
    assert out.get_data_dtype() == np.uint8 and np.array_equal(np.asanyarray(out.dataobj), labels)
    assert ">1.000</td>" in result.report.read_text(encoding="utf-8")  # Dice of the labels with themselves
