import numpy as np
import pytest

from medseg_diff.data.conventions import BRATS2021, BRATS2023, MSD, REGIONS, get_convention


@pytest.mark.parametrize("conv", [BRATS2021, BRATS2023, MSD], ids=lambda c: c.name)
def test_labels_regions_labels_is_identity(conv):
    rng = np.random.default_rng(0)
    label = rng.choice(np.array(conv.labels), size=(12, 10, 8)).astype(np.uint8)
    regions = conv.to_regions(label)
    assert regions.shape == (3, 12, 10, 8) and regions.dtype == bool
    np.testing.assert_array_equal(conv.from_regions(regions), label)


def test_region_definitions_brats2021():
    label = np.array([0, 1, 2, 4])
    tc, wt, et = BRATS2021.to_regions(label)
    assert REGIONS == ("TC", "WT", "ET")
    np.testing.assert_array_equal(tc, [0, 1, 0, 1])
    np.testing.assert_array_equal(wt, [0, 1, 1, 1])
    np.testing.assert_array_equal(et, [0, 0, 0, 1])


def test_brats2023_enhancing_is_3():
    tc, wt, et = BRATS2023.to_regions(np.array([0, 1, 2, 3]))
    np.testing.assert_array_equal(et, [0, 0, 0, 1])
    np.testing.assert_array_equal(tc, [0, 1, 0, 1])
    assert BRATS2023.unknown_labels(np.array([0, 1, 2, 3])) == []
    assert BRATS2023.unknown_labels(np.array([0, 4])) == [4]


def test_msd_labels_mean_edema_nonenhancing_enhancing():
    # MSD Task01: 1 = edema, 2 = non-enhancing tumour, 3 = enhancing tumour
    tc, wt, et = MSD.to_regions(np.array([0, 1, 2, 3]))
    np.testing.assert_array_equal(wt, [0, 1, 1, 1])
    np.testing.assert_array_equal(tc, [0, 0, 1, 1])
    np.testing.assert_array_equal(et, [0, 0, 0, 1])  # MONAI's tutorial maps label 2 to "ET": wrong


def test_from_regions_thresholds_probabilities_and_nests():
    probs = np.zeros((3, 4))
    probs[1, 1:] = 0.9  # WT
    probs[0, 2:] = 0.6  # TC
    probs[2, 3] = 0.51  # ET
    np.testing.assert_array_equal(BRATS2021.from_regions(probs), [0, 2, 1, 4])


def test_unknown_convention_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown label convention 'brats2019'"):
        get_convention("brats2019")


def test_unknown_labels_reports_fractional_values():
    assert BRATS2021.unknown_labels(np.array([0.0, 1.0, 2.5, 3.0])) == [2.5, 3]
