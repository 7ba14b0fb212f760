"""BraTS post-processing of a label map: small whole-tumour components removed, a small enhancing tumour relabelled
as core, by volume in mm³ (the same at any voxel size); 0 turns a step off; the input is never modified."""

from __future__ import annotations

import numpy as np
import pytest

from factories import tiny_config
from medseg_diff.config import config_from_dict
from medseg_diff.data.conventions import BRATS2021, BRATS2023
from medseg_diff.errors import ConfigError
from medseg_diff.inference.postprocess import postprocess


def _case() -> np.ndarray:
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:8, 2:8, 2:8] = 2  # a 216-voxel lesion of edema ...
    labels[4:6, 4:6, 4:6] = 4  # ... with 8 voxels of enhancing tumour (BraTS 2021: ET = 4)
    labels[15, 15, 15] = 2  # a 1-voxel speckle
    labels[12:14, 17:19, 2:4] = 1  # an 8-voxel core fragment
    return labels


def test_components_below_the_volume_are_removed_whole():
    labels = _case()
    out, done = postprocess(labels, BRATS2021, voxel_mm3=8.0, min_lesion_mm3=100.0)  # 2 mm voxels: 8 mm³ each
    assert out[15, 15, 15] == 0 and not out[12:14, 17:19, 2:4].any()  # 8 and 64 mm³: removed
    np.testing.assert_array_equal(out[2:8, 2:8, 2:8], labels[2:8, 2:8, 2:8])  # 1728 mm³: kept, labels unchanged
    assert (done.lesions_removed, done.voxels_removed, done.enhancing_relabelled_voxels) == (2, 9, 0)
    assert labels[15, 15, 15] == 2  # the input is not modified


def test_the_threshold_is_a_volume_not_a_voxel_count():
    labels = _case()
    fine, _ = postprocess(labels, BRATS2021, voxel_mm3=1.0, min_lesion_mm3=100.0)  # 1 mm: the 8-voxel core is 8 mm³
    coarse, _ = postprocess(labels, BRATS2021, voxel_mm3=27.0, min_lesion_mm3=100.0)  # 3 mm: 216 mm³, kept
    assert not fine[12:14, 17:19, 2:4].any() and coarse[12:14, 17:19, 2:4].all()


def test_a_small_enhancing_tumour_becomes_core_in_the_cases_convention():
    for conv in (BRATS2021, BRATS2023):
        labels = _case()
        labels[labels == 4] = conv.enhancing
        out, done = postprocess(labels, conv, voxel_mm3=1.0, min_enhancing_mm3=10.0)  # ET: 8 mm³ < 10
        assert not (out == conv.enhancing).any() and (out[4:6, 4:6, 4:6] == conv.core).all()
        assert done.enhancing_relabelled_voxels == 8
        kept, done = postprocess(labels, conv, voxel_mm3=1.0, min_enhancing_mm3=8.0)  # 8 mm³ is not below 8
        assert (kept == conv.enhancing).sum() == 8 and done.enhancing_relabelled_voxels == 0


def test_zero_turns_both_steps_off():
    labels = _case()
    out, done = postprocess(labels, BRATS2021, voxel_mm3=1.0)
    np.testing.assert_array_equal(out, labels)
    assert done.to_dict() == {"min_lesion_mm3": 0.0, "min_enhancing_mm3": 0.0, "lesions_removed": 0,
                              "voxels_removed": 0, "enhancing_relabelled_voxels": 0}


@pytest.mark.parametrize("key", ["min_lesion_mm3", "min_enhancing_mm3"])
def test_a_negative_volume_is_refused_by_key(tmp_path, key):
    raw = tiny_config(tmp_path / "m.json", tmp_path / "out").to_dict()
    raw["infer"][key] = -1.0
    with pytest.raises(ConfigError, match=f"infer.{key}"):
        config_from_dict(raw)
