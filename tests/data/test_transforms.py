import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose

from factories import BRATS2021, BRATS2023, LPS_AFFINE, MSD, RAS_AFFINE, write_case
from medseg_diff.data.conventions import MODALITIES, MSD_CHANNEL_ORDER
from medseg_diff.data.discovery import discover
from medseg_diff.data.transforms import (
    IMAGE, LABEL, PRED, PRIOR, eval_transforms, invert_prediction, load_transforms, train_transforms,
)


def _record(case):
    rec = {IMAGE: [str(case.images[m]) for m in MODALITIES] if "4d" not in case.images else str(case.images["4d"])}
    if case.label:
        rec[LABEL] = str(case.label)
    return rec


def test_train_pipeline_crops_and_regions(tmp_path):
    write_case(tmp_path, "BraTS2021_00000", BRATS2021, shape=(24, 20, 18))
    conv, cases = discover(tmp_path)
    samples = train_transforms(conv, spacing=(2.0, 2.0, 2.0), roi_size=(16, 16, 16), num_samples=3)(_record(cases[0]))
    assert len(samples) == 3
    for s in samples:
        assert tuple(s[IMAGE].shape) == (4, 16, 16, 16) and tuple(s[LABEL].shape) == (3, 16, 16, 16)
        lab = s[LABEL].numpy().astype(bool)
        assert set(np.unique(s[LABEL].numpy())) <= {0.0, 1.0}
        tc, wt, et = lab
        assert not (et & ~tc).any() and not (tc & ~wt).any()  # nested regions survive augmentation
    assert any(s[LABEL].sum() > 0 for s in samples)  # positive crops are drawn


def test_msd_channels_reordered_to_canonical(tmp_path):
    write_case(tmp_path, "BRATS_001", MSD)
    conv, cases = discover(tmp_path)
    data = Compose(load_transforms([IMAGE], conv))({IMAGE: str(cases[0].images["4d"])})
    raw = np.asarray(nib.load(str(cases[0].images["4d"])).dataobj)
    for i, m in enumerate(MODALITIES):
        np.testing.assert_array_equal(data[IMAGE][i].numpy(), raw[..., MSD_CHANNEL_ORDER.index(m)])


@pytest.mark.parametrize("affine", [LPS_AFFINE, RAS_AFFINE], ids=["LPS", "RAS"])
@pytest.mark.parametrize("spacing", [None, (3.0, 2.5, 1.5)], ids=["native", "resampled"])
def test_inverse_restores_grid_and_labels(tmp_path, affine, spacing):
    write_case(tmp_path, "BraTS-GLI-00000-000", BRATS2023, shape=(20, 18, 16), affine=affine)
    conv, cases = discover(tmp_path)
    t = eval_transforms(conv, spacing)
    data = t(_record(cases[0]))
    assert nib.aff2axcodes(data[IMAGE].affine.numpy()) == ("R", "A", "S")
    data[PRED] = data[LABEL].clone()
    inv = invert_prediction(data, t, nearest=True)[PRED]
    ref = nib.load(str(cases[0].images["t1"]))
    assert tuple(inv.shape[1:]) == ref.shape
    np.testing.assert_allclose(inv.affine.numpy(), ref.affine, atol=1e-5)
    truth = conv.to_regions(np.asarray(nib.load(str(cases[0].label)).dataobj))
    agreement = ((inv.numpy() > 0.5) == truth).mean()
    if spacing is None:
        assert agreement == 1.0
    else:
        assert agreement > 0.97


def test_external_prior_outline_becomes_wt(tmp_path):
    write_case(tmp_path, "BraTS2021_00000", BRATS2021)
    conv, cases = discover(tmp_path)
    outline = (np.asarray(nib.load(str(cases[0].label)).dataobj) > 0).astype(np.float32)
    prior_path = tmp_path / "outline.nii.gz"
    nib.save(nib.Nifti1Image(outline, LPS_AFFINE), str(prior_path))
    rec = _record(cases[0]) | {PRIOR: str(prior_path)}
    data = eval_transforms(conv, None, with_prior=True, crop_foreground=False)(rec)
    prior = data[PRIOR].numpy()
    assert prior.shape[0] == 3 and prior[0].sum() == 0 and prior[2].sum() == 0
    np.testing.assert_array_equal(prior[1], data[LABEL].numpy()[1])


@pytest.mark.real_data
@pytest.mark.parametrize("case_id", ["BraTS-GLI-99999-000", "BraTS-GLI-00001-000", "BraTS-MET-00110-000"])
def test_inverse_on_real_cases_is_exact(real_data, case_id):
    """LPS (GLI) and RAS (MET) real cases: transform, predict on the RAS grid, invert: same grid, same voxels."""
    conv, cases = discover(real_data)
    case = next(c for c in cases if c.case_id == case_id)
    t = eval_transforms(conv, spacing=None, with_label=case.label is not None)
    data = t(_record(case))
    ref = nib.load(str(case.images["flair"]))
    if case.label:
        data[PRED] = data[LABEL].clone()
        truth = conv.to_regions(np.asarray(nib.load(str(case.label)).dataobj))
    else:
        data[PRED] = (data[IMAGE][3:4] != 0).float()
        truth = np.asarray(ref.dataobj)[None] != 0
    assert tuple(data[IMAGE].shape[1:]) != ref.shape  # the foreground crop really changed the grid
    inv = invert_prediction(data, t, nearest=True)[PRED]
    assert tuple(inv.shape[1:]) == ref.shape
    np.testing.assert_allclose(inv.affine.numpy(), ref.affine, atol=1e-5)
    np.testing.assert_array_equal(inv.numpy() > 0.5, truth)


def test_external_prior_seg_file_is_a_label_map_even_if_only_label_1(tmp_path):
    """A baseline prediction with only necrotic core (max label 1) is labels, not an outline."""
    write_case(tmp_path, "BraTS2021_00000", BRATS2021)
    conv, cases = discover(tmp_path)
    core = (np.asarray(nib.load(str(cases[0].label)).dataobj) == conv.core).astype(np.uint8)
    prior_path = tmp_path / "pred" / "BraTS2021_00000_seg.nii.gz"
    prior_path.parent.mkdir()
    nib.save(nib.Nifti1Image(core, LPS_AFFINE), str(prior_path))
    data = eval_transforms(conv, None, with_prior=True, crop_foreground=False)(_record(cases[0]) | {PRIOR: str(prior_path)})
    tc, wt, et = data[PRIOR].numpy()
    assert tc.sum() == core.sum() > 0 and np.array_equal(tc, wt) and et.sum() == 0
