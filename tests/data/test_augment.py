"""``data.augment`` presets (issue 20, item 2): none / light / brats training pipelines on tiny volumes."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
from monai.transforms import (
    Compose, CropForegroundd, EnsureTyped, NormalizeIntensityd, RandAffined, RandCropByPosNegLabeld, RandFlipd,
    RandomizableTransform, RandScaleIntensityd, RandShiftIntensityd, SpatialPadd,
)

from factories import BRATS2021, save, tiny_images, tiny_label, write_case
from medseg_diff.config import DataConfig, config_from_dict, load_config
from medseg_diff.data.conventions import MODALITIES
from medseg_diff.data.discovery import discover
from medseg_diff.data.transforms import (
    AUGMENT_PRESETS, IMAGE, LABEL, PRIOR, LabelsToRegionsd, SuppressBackgroundd, _geometry, affine_context,
    eval_transforms, load_transforms, train_transforms,
)
from medseg_diff.errors import ConfigError

import monai
from monai.utils import version_leq

from medseg_diff.data.transforms import BRATS_MIN_MONAI

#: the brats preset needs a newer MONAI than the package's floor (make test-floors installs the floor)
needs_brats_monai = pytest.mark.skipif(not version_leq(BRATS_MIN_MONAI, monai.__version__),
                                       reason=f"augment: brats needs MONAI >= {BRATS_MIN_MONAI}, "
                                              f"this environment has {monai.__version__}")

ROI = (16, 16, 16)


def _record(case) -> dict:
    return {IMAGE: [str(case.images[m]) for m in MODALITIES], LABEL: str(case.label)}


@pytest.fixture
def case(tmp_path):
    write_case(tmp_path, "BraTS2021_00000", BRATS2021, shape=(24, 22, 20))
    conv, cases = discover(tmp_path)
    return conv, _record(cases[0])


@pytest.fixture
def aligned(tmp_path):
    """A 32³ case whose FLAIR is bright exactly in the whole tumour, and a prior outline file equal to it."""
    shape = (32, 32, 32)
    label = tiny_label(shape, BRATS2021)
    images = tiny_images(label, BRATS2021)
    wt = label > 0
    images["flair"] = np.where(images["flair"] > 0, 100.0 + 900.0 * wt, 0.0).astype(np.float32)
    folder = tmp_path / "BraTS2021_00001"
    record = {IMAGE: [str(save(images[m], folder / f"BraTS2021_00001_{m}.nii.gz")) for m in MODALITIES],
              LABEL: str(save(label, folder / "BraTS2021_00001_seg.nii.gz")),
              PRIOR: str(save(wt.astype(np.float32), tmp_path / "priors" / "BraTS2021_00001.nii.gz"))}
    return record


def _seeded(pipeline: Compose, seed: int = 7) -> Compose:
    pipeline.set_random_state(seed=seed)
    return pipeline


def _old_light(convention, spacing, roi_size, num_samples=2, pos_neg=(1.0, 1.0), flip_prob=0.5,
               intensity_prob=1.0) -> Compose:
    """Frozen copy of ``train_transforms`` as it was before the presets (flips + intensity scale/shift)."""
    keys = [IMAGE, LABEL]
    return Compose(
        load_transforms(keys, convention)
        + [LabelsToRegionsd(keys=LABEL, convention=convention), SuppressBackgroundd(keys=IMAGE)]
        + _geometry(keys, spacing, ("bilinear", "nearest"))
        + [
            CropForegroundd(keys=keys, source_key=IMAGE, allow_smaller=True),
            NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True),
            SpatialPadd(keys=keys, spatial_size=tuple(roi_size)),
            RandCropByPosNegLabeld(
                keys=keys, label_key=LABEL, spatial_size=tuple(roi_size), pos=pos_neg[0], neg=pos_neg[1],
                num_samples=num_samples, image_key=IMAGE, image_threshold=0.0,
            ),
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=0),
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1),
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=2),
            RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=intensity_prob),
            RandShiftIntensityd(keys=IMAGE, offsets=0.1, prob=intensity_prob),
            EnsureTyped(keys=keys, track_meta=False),
        ]
    )


def _image_only(step) -> bool:
    return isinstance(step, RandomizableTransform) and tuple(getattr(step, "keys", ())) == (IMAGE,)


@pytest.mark.parametrize("augment", [pytest.param(a, marks=needs_brats_monai) if a == "brats" else a
                                     for a in AUGMENT_PRESETS])
def test_each_preset_builds_crops_of_roi_size_with_nested_binary_regions(case, augment):
    conv, record = case
    samples = _seeded(train_transforms(conv, None, ROI, num_samples=3, augment=augment))(record)
    assert len(samples) == 3
    for s in samples:
        assert tuple(s[IMAGE].shape) == (4, *ROI) and tuple(s[LABEL].shape) == (3, *ROI)
        assert torch.isfinite(s[IMAGE]).all()
        assert set(np.unique(s[LABEL].numpy())) <= {0.0, 1.0}  # nearest: still the label set
        tc, wt, et = s[LABEL].numpy().astype(bool)
        assert not (et & ~tc).any() and not (tc & ~wt).any()
    assert any(s[LABEL].sum() > 0 for s in samples)


def test_presets_match_the_config_choices():
    assert typing.get_args(typing.get_type_hints(DataConfig)["augment"]) == AUGMENT_PRESETS
    assert DataConfig().augment == "light"


def test_unknown_preset_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="must be one of 'none', 'light', 'brats'") as info:
        config_from_dict({"data": {"augment": "heavy"}})
    assert info.value.key == "data.augment"
    (tmp_path / "c.yaml").write_text("data:\n  augment: light\n")
    with pytest.raises(ConfigError, match="data.augment"):
        load_config(tmp_path / "c.yaml", overrides=["data.augment=strong"])
    assert config_from_dict({"data": {"augment": "brats"}}).data.augment == "brats"
    with pytest.raises(ValueError, match="augment must be one of"):
        train_transforms(BRATS2021, None, ROI, augment="heavy")


@pytest.mark.parametrize("seed", [0, 3])
def test_light_is_the_old_pipeline_for_a_seed(case, seed):
    conv, record = case
    new = _seeded(train_transforms(conv, (2.0, 2.0, 2.0), ROI, num_samples=3, augment="light"), seed)(record)
    old = _seeded(_old_light(conv, (2.0, 2.0, 2.0), ROI, num_samples=3), seed)(record)
    assert len(new) == len(old) == 3
    for a, b in zip(new, old):
        assert set(a) == set(b)
        for key in (IMAGE, LABEL):
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    assert not np.array_equal(new[0][IMAGE].numpy(), new[1][IMAGE].numpy())  # the draws are not all the same


def test_none_never_changes_intensities(case):
    """Every ``none`` crop is a block of the evaluation pipeline's image, voxel for voxel (no flip, no scaling)."""
    conv, record = case
    full = eval_transforms(conv, None)(record)[IMAGE].numpy()
    samples = _seeded(train_transforms(conv, None, ROI, num_samples=4, augment="none"))(record)
    light = _seeded(train_transforms(conv, None, ROI, num_samples=4, augment="light"))(record)

    def is_block(crop: np.ndarray) -> bool:
        starts = [range(full.shape[i + 1] - ROI[i] + 1) for i in range(3)]
        return any(np.array_equal(full[:, x:x + ROI[0], y:y + ROI[1], z:z + ROI[2]], crop)
                   for x in starts[0] for y in starts[1] for z in starts[2])

    assert all(is_block(s[IMAGE].numpy()) for s in samples)
    assert not all(is_block(s[IMAGE].numpy()) for s in light)  # the check sees augmentation when there is some


@needs_brats_monai
def test_brats_with_every_step_off_is_the_none_crop(case):
    """The context crop around the affine keeps the crop centre: with the affine and every other step switched off,
    ``brats`` gives exactly the crops ``none`` gives for the same seed."""
    conv, record = case
    brats = train_transforms(conv, None, ROI, num_samples=3, augment="brats", flip_prob=0.0, intensity_prob=0.0)
    for step in brats.transforms:
        if isinstance(step, RandomizableTransform):
            step.prob = 0.0 if not isinstance(step, RandCropByPosNegLabeld) else step.prob
    a = _seeded(brats, 5)(record)
    b = _seeded(train_transforms(conv, None, ROI, num_samples=3, augment="none"), 5)(record)
    for x, y in zip(a, b):
        for key in (IMAGE, LABEL):
            np.testing.assert_array_equal(x[key].numpy(), y[key].numpy())
    assert affine_context((32, 32, 32)) == (12, 12, 12) and affine_context((96, 96, 96)) == (34, 34, 34)


@needs_brats_monai
def test_affine_moves_image_label_and_prior_together(aligned):
    """A forced affine: the FLAIR feature, the label's whole tumour and the prior outline stay on the same voxels,
    and they did move (the crops differ from the same crops without the affine)."""
    roi = (24, 24, 24)
    brats = train_transforms(BRATS2021, None, roi, num_samples=4, augment="brats", flip_prob=1.0,
                             intensity_prob=0.0)
    affine = [s for s in brats.transforms if isinstance(s, RandAffined)]
    assert len(affine) == 1
    for step in brats.transforms:
        if _image_only(step):
            step.prob = 0.0  # intensities untouched: the feature is found by a threshold
    affine[0].prob = 1.0
    moved = _seeded(brats, 11)(aligned)
    affine[0].prob = 0.0
    still = _seeded(brats, 11)(aligned)
    assert any(not np.array_equal(m[LABEL].numpy(), s[LABEL].numpy()) for m, s in zip(moved, still))
    tumour_crops = 0
    for s in moved:
        assert tuple(s[PRIOR].shape) == (3, *roi)
        assert set(np.unique(s[LABEL].numpy())) <= {0.0, 1.0}
        assert s[PRIOR][0].abs().max() == 0 and s[PRIOR][2].abs().max() == 0  # an outline: WT only
        wt = s[LABEL][1].numpy() > 0.5
        prior = s[PRIOR][1].numpy() > 0.5
        assert np.logical_xor(prior, wt).sum() <= 0.1 * wt.sum() + 10
        if wt.sum() < 100:
            continue
        tumour_crops += 1
        flair = s[IMAGE][MODALITIES.index("flair")].numpy()
        feature = flair > 0.5 * (flair[wt].mean() + flair[~wt & (flair != 0)].mean())
        assert np.logical_xor(feature, wt).sum() <= 0.1 * wt.sum()
    assert tumour_crops >= 1


@needs_brats_monai
def test_brats_changes_intensities_but_not_the_label_set(case):
    conv, record = case
    brats = _seeded(train_transforms(conv, None, ROI, num_samples=8, augment="brats"), 2)(record)
    none = _seeded(train_transforms(conv, None, ROI, num_samples=8, augment="none"), 2)(record)
    assert any(not np.array_equal(a[IMAGE].numpy(), b[IMAGE].numpy()) for a, b in zip(brats, none))
    for s in brats:
        assert set(np.unique(s[LABEL].numpy())) <= {0.0, 1.0}


def test_brats_on_an_older_monai_is_refused_naming_the_key(monkeypatch):
    """On a MONAI without per-channel contrast scaling (< 1.6, e.g. the floor 1.4) ``augment: brats`` stops before
    any work with a ConfigError naming ``data.augment`` and the version it needs."""
    monkeypatch.setattr(monai, "__version__", "1.5.2")
    with pytest.raises(ConfigError, match=r"data\.augment.*MONAI >= 1\.6.*1\.5\.2"):
        train_transforms(BRATS2021, None, (16, 16, 16), num_samples=1, augment="brats")
    train_transforms(BRATS2021, None, (16, 16, 16), num_samples=1, augment="light")  # the others still build
