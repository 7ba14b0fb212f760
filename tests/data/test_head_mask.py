"""The head mask of preprocessing (``SuppressBackgroundd``): a constant background offset (a TCGA FLAIR: 0.0219
everywhere outside the head), noisy air and a bias field in the air must not make the whole frame "brain" --
the foreground crop is the head's box and normalisation statistics come from the head only -- while real
BraTS cases (background exactly 0) are preprocessed exactly as before."""

import numpy as np
import pytest
from monai.transforms import Compose

from factories import BRATS2021, BRATS2023, save
from medseg_diff.data.conventions import MODALITIES
from medseg_diff.data.discovery import discover
from medseg_diff.data.transforms import (
    HEAD, IMAGE, LABEL, SuppressBackgroundd, eval_transforms, head_mask, head_threshold, remove_background_offset,
    train_transforms,
)

SHAPE = (32, 30, 28)
CENTRE = np.array([15.0, 14.0, 13.5])
RADII = np.array([9.0, 8.0, 7.0])  # the head: an ellipsoid well inside the frame


def _phantom(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """``(images, label, head)``: clean-background (0 outside the head) images of an ellipsoidal head with a
    tumour, as BraTS after skull stripping."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in SHAPE], indexing="ij"))
    head = (((grid - CENTRE[:, None, None, None]) / RADII[:, None, None, None]) ** 2).sum(0) < 1
    tumour = ((grid - (CENTRE + [2, 1, 0])[:, None, None, None]) ** 2).sum(0) < 9
    label = np.where(tumour, BRATS2021.edema, 0).astype(np.uint8)
    label[((grid - (CENTRE + [2, 1, 0])[:, None, None, None]) ** 2).sum(0) < 3] = BRATS2021.core
    images = {}
    for i, m in enumerate(MODALITIES):
        img = (100.0 + 30 * i) + 15 * grid[0] / SHAPE[0] + 60.0 * tumour + rng.normal(0, 4, SHAPE)
        images[m] = np.where(head, img, 0.0).astype(np.float32)
    return images, label, head


def _write(folder, case_id, images, label) -> dict:
    for m, suffix in zip(MODALITIES, BRATS2021.modality_suffixes):
        save(images[m], folder / case_id / f"{case_id}_{suffix}.nii.gz")
    save(label, folder / case_id / f"{case_id}_seg.nii.gz")
    conv, cases = discover(folder)
    case = next(c for c in cases if c.case_id == case_id)
    return {IMAGE: [str(case.images[m]) for m in MODALITIES], LABEL: str(case.label)}


def _box_size(mask: np.ndarray) -> tuple[int, ...]:
    idx = np.nonzero(mask)
    return tuple(int(i.max() - i.min() + 1) for i in idx)


def _rayleigh(rng, sigma, shape):
    return np.hypot(rng.normal(0, 1, shape), rng.normal(0, 1, shape)) * sigma


@pytest.fixture
def clean(tmp_path):
    images, label, head = _phantom()
    return images, label, head, _write(tmp_path / "clean", "BraTS2021_00000", images, label)


def test_constant_offset_in_one_modality_crops_to_the_head_and_normalises_without_air(tmp_path, clean):
    images, label, head, clean_record = clean
    offset = dict(images)
    offset["flair"] = np.where(head, images["flair"] + 0.0219, 0.0219).astype(np.float32)  # the TCGA FLAIR
    record = _write(tmp_path / "offset", "BraTS2021_00000", offset, label)
    t = eval_transforms(BRATS2021, spacing=None, head_mask_key=HEAD)
    out, ref = t(record), t(clean_record)
    # the crop is the head's box, not the frame
    assert tuple(out[IMAGE].shape[1:]) == _box_size(head) != SHAPE
    np.testing.assert_array_equal(out[HEAD], head)
    # normalisation statistics exclude the air: the same as with a zero background
    np.testing.assert_allclose(out[IMAGE].numpy(), ref[IMAGE].numpy(), atol=1e-4)
    flair = out[IMAGE].numpy()[MODALITIES.index("flair")]
    inside = flair != 0
    assert inside.sum() == head.sum()  # every head voxel, no air voxel
    assert abs(flair[inside].mean()) < 1e-4 and abs(flair[inside].std() - 1) < 1e-3


def test_without_the_fix_the_offset_would_have_made_the_frame_the_head(tmp_path, clean):
    """Guard of the test above: the plain pipeline (no SuppressBackgroundd) does crop to the frame."""
    images, label, head, _ = clean
    offset = dict(images)
    offset["flair"] = np.where(head, images["flair"] + 0.0219, 0.0219).astype(np.float32)
    record = _write(tmp_path / "offset", "BraTS2021_00000", offset, label)
    plain = Compose([s for s in eval_transforms(BRATS2021, None).transforms if not isinstance(s, SuppressBackgroundd)])
    assert tuple(plain(record)[IMAGE].shape[1:]) == SHAPE


@pytest.mark.parametrize("bias", [0.0, 12.0], ids=["noise", "noise+bias-field"])
def test_noisy_air_is_not_head(tmp_path, bias):
    """Rician air noise (σ 2 against tissue ≥ 100) in every modality, with or without a smooth bias field in
    the air (a ramp up to 12): the crop is the head's box and air voxels are 0 after preprocessing."""
    images, label, head = _phantom(seed=1)
    rng = np.random.default_rng(5)
    ramp = bias * np.linspace(0, 1, SHAPE[0])[:, None, None] * np.ones(SHAPE)
    noisy = {m: np.where(head, v, ramp + _rayleigh(rng, 2.0, SHAPE)).astype(np.float32) for m, v in images.items()}
    assert all(background is None for background in
               [remove_background_offset(v)[1] for v in noisy.values()])  # not a constant offset
    assert all((v > 0).all() for v in noisy.values())  # "any modality > 0" would be the whole frame
    record = _write(tmp_path, "BraTS2021_00000", noisy, label)
    out = eval_transforms(BRATS2021, spacing=None, head_mask_key=HEAD)(record)
    np.testing.assert_array_equal(out[HEAD], head)
    assert tuple(out[IMAGE].shape[1:]) == _box_size(head)
    nonzero = (out[IMAGE].numpy() != 0)
    assert (nonzero.sum(axis=(1, 2, 3)) == head.sum()).all()  # normalised over the head only


def test_thresholds_and_offsets_on_single_channels():
    images, _, head = _phantom()
    flair = images["flair"]
    same, offset = remove_background_offset(flair)
    assert offset is None and same is flair and head_threshold(flair) == 0.0  # clean: "> 0" as before
    shifted, offset = remove_background_offset(np.where(head, flair + 7.5, 7.5).astype(np.float32))
    assert offset == pytest.approx(7.5)
    np.testing.assert_allclose(shifted, flair, atol=1e-4)
    assert (shifted[~head] == 0).all() and head_threshold(shifted) == 0.0
    # noise: the threshold sits well above the air (≈ 9σ) and well below the tissue
    noisy = np.where(head, flair, _rayleigh(np.random.default_rng(0), 2.0, SHAPE)).astype(np.float32)
    t = head_threshold(noisy)
    assert 14 < t < 25
    np.testing.assert_array_equal(head_mask(noisy[None]), head)


def test_a_clean_volume_whose_border_is_all_head_stays_clean():
    """Tissue on the whole border (a tight crop of a skull-stripped brain) and a fifth of the volume exactly 0:
    "> 0" as before, not a threshold taken from the tissue on the border."""
    rng = np.random.default_rng(0)
    channels = (100.0 + rng.normal(0, 20, (4, 20, 20, 20))).astype(np.float32)
    channels[:, 4:16, 4:16, 4:16] = 0  # 21.6% of the voxels
    channels[:, 2, 2, 2] = 1.0  # dark tissue: still head
    assert all(head_threshold(c) == 0.0 for c in channels)
    out = SuppressBackgroundd()({IMAGE: channels})
    assert out[IMAGE] is channels
    assert head_mask(channels).all() and not head_mask(channels, fill=False)[10, 10, 10]
    channels[:, 5:15, 5:15, 5:15] = 100.0  # 9.8% left at 0: read as noisy air, thresholded
    assert all(head_threshold(c) > 1.0 for c in channels)


def test_isolated_bright_air_voxels_are_not_head():
    """A few spikes above the threshold in the air (noise tails) would stretch the box to the frame."""
    images, _, head = _phantom()
    rng = np.random.default_rng(2)
    flair = np.where(head, images["flair"], _rayleigh(rng, 2.0, SHAPE)).astype(np.float32)
    flair[0, 0, 0] = flair[-1, -1, -1] = flair[0, -1, 3] = 80.0
    np.testing.assert_array_equal(head_mask(flair[None]), head)


def test_cavities_inside_the_head_are_head():
    images, _, head = _phantom()
    channels = np.stack([images[m] for m in MODALITIES])
    channels[:, 13:17, 12:16, 12:15] = 0  # a dark cavity every modality shows as 0
    mask = head_mask(channels)
    np.testing.assert_array_equal(mask, head)
    assert not head_mask(channels, fill=False)[14, 13, 13]


def test_clean_case_passes_through_untouched(clean):
    *_, record = clean
    loaded = Compose(eval_transforms(BRATS2021, None).transforms[:3])(record)  # load, channel first, regions
    assert isinstance(eval_transforms(BRATS2021, None).transforms[3], SuppressBackgroundd)
    out = SuppressBackgroundd()(loaded)
    assert out[IMAGE] is loaded[IMAGE]


def test_train_and_eval_preprocess_images_the_same(tmp_path, clean):
    """No augmentation and one crop of the whole head box: training sees exactly the evaluation's image."""
    images, label, head, _ = clean
    offset = dict(images)
    offset["t2"] = np.where(head, images["t2"] + 3.0, 3.0).astype(np.float32)
    record = _write(tmp_path / "offset", "BraTS2021_00000", offset, label)
    ev = eval_transforms(BRATS2021, spacing=None)(record)
    tr = train_transforms(BRATS2021, spacing=None, roi_size=_box_size(head), num_samples=1, flip_prob=0.0,
                          intensity_prob=0.0)(record)[0]
    np.testing.assert_allclose(tr[IMAGE].numpy(), ev[IMAGE].numpy(), atol=1e-6)


@pytest.mark.real_data
def test_real_cases_are_preprocessed_exactly_as_before(real_data):
    """Real BraTS volumes (background exactly 0): same crop box, same images, as without SuppressBackgroundd;
    their head mask is "any modality > 0" (plus enclosed cavities)."""
    conv, cases = discover(real_data)
    assert conv is BRATS2023 and len(cases) == 3
    steps = eval_transforms(conv, spacing=None, with_label=False, head_mask_key=HEAD).transforms
    load, new = Compose(steps[:2]), Compose(steps[2:])
    old = Compose([s for s in steps[2:] if not isinstance(s, SuppressBackgroundd)])
    assert len(old.transforms) == len(new.transforms) - 1
    for case in cases:
        loaded = load({IMAGE: [str(case.images[m]) for m in MODALITIES]})  # decoded once, used twice
        a, b = new({IMAGE: loaded[IMAGE].clone()}), old({IMAGE: loaded[IMAGE].clone()})
        assert a[IMAGE].shape == b[IMAGE].shape, case.case_id
        np.testing.assert_array_equal(a[IMAGE].affine.numpy(), b[IMAGE].affine.numpy())
        np.testing.assert_array_equal(a[IMAGE].numpy(), b[IMAGE].numpy())
        positive = (loaded[IMAGE].numpy() > 0).any(axis=0)  # the files' voxels, on their own grid
        assert a[HEAD].shape == positive.shape and (a[HEAD] >= positive).all()
        assert _box_size(a[HEAD]) == _box_size(positive)
        assert (a[HEAD] & ~positive).sum() < 1e-4 * positive.sum()  # only a few enclosed voxels added
