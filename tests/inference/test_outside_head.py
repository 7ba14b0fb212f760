"""``predict_case``: no tumour where every modality is background (also with a constant background offset in
one modality), and a ground truth with non-integral or unknown labels is refused, naming its file."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from factories import BRATS2021, save, tiny_config
from medseg_diff.data.conventions import MODALITIES
from medseg_diff.data.dataset import files_record
from medseg_diff.data.discovery import discover
from medseg_diff.errors import DataError
from medseg_diff.kinds import build_kind as build_adapter
from medseg_diff.inference.case import predict_case
from medseg_diff.inference.loading import LoadedModel

SHAPE = (24, 22, 20)


class TumourEverywhere(nn.Module):
    """A segmenter network that calls every voxel of every window tumour (TC, WT and ET), air included."""

    def __init__(self):
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(8.0))

    def forward(self, x):
        return self.logit.expand(x.shape[0], 3, *x.shape[2:])


def _model(tmp_path, spacing=None) -> LoadedModel:
    cfg = tiny_config(tmp_path / "manifest.json", tmp_path / "run", "unet", data={"spacing": spacing},
                      infer={"roi_size": [16, 16, 16], "sw_batch_size": 2})
    net = TumourEverywhere()
    return LoadedModel(adapter=build_adapter(cfg, net), net=net, cfg=cfg, checkpoint=tmp_path / "fake.pt",
                       run_id=None, epoch=0)


def _case(root: Path, flair_offset: float = 0.0, label_values=None) -> tuple[dict, np.ndarray, Path]:
    """A head (ellipsoid) inside a larger frame; ``flair_offset``: a constant added to the FLAIR everywhere
    (head and air), as in a TCGA export. Returns the record, the head mask (file grid) and the seg path."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in SHAPE], indexing="ij"))
    centre, radii = np.array([11.5, 10.5, 9.5]), np.array([8.0, 7.0, 6.0])
    head = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1
    rng = np.random.default_rng(0)
    case_id = "BraTS2021_00001"
    for i, (m, suffix) in enumerate(zip(MODALITIES, BRATS2021.modality_suffixes)):
        img = np.where(head, 100.0 + 25 * i + rng.normal(0, 3, SHAPE), 0.0)
        if m == "flair":
            img = img + flair_offset
        save(img.astype(np.float32), root / case_id / f"{case_id}_{suffix}.nii.gz")
    label = np.zeros(SHAPE, np.float32)
    label[10:13, 9:12, 8:11] = BRATS2021.edema
    if label_values is not None:
        label[11, 10, 9], label[10, 9, 8] = label_values
    seg = save(label, root / case_id / f"{case_id}_seg.nii.gz")
    _, cases = discover(root)
    return files_record(cases[0]), head, seg


@pytest.mark.parametrize("spacing", [None, [1.5, 1.5, 1.5]], ids=["native", "resampled"])
@pytest.mark.parametrize("offset", [0.0, 0.0219], ids=["zero-background", "flair-offset"])
def test_no_tumour_where_every_modality_is_background(tmp_path, spacing, offset):
    record, head, _ = _case(tmp_path / "data", flair_offset=offset)
    bbox = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(head))
    assert (~head[bbox]).sum() > 500  # the head's box (what the network sees) holds plenty of air
    pred = predict_case(_model(tmp_path, spacing), record, BRATS2021, device=torch.device("cpu"))
    assert pred.labels.shape == SHAPE
    assert (pred.labels[~head] == 0).all() and (pred.probs[:, ~head] == 0).all()
    assert (pred.entropy[~head] == 0).all()  # uncertainty is zeroed outside the head too
    assert (pred.labels[head] == BRATS2021.enhancing).mean() > 0.95  # inside the head: the network's call
    assert pred.ground_truth is not None and set(np.unique(pred.ground_truth)) == {0, BRATS2021.edema}


@pytest.mark.parametrize("values, problem", [((1.5, 2), "non-integral label values [1.5]"),
                                             ((7, 2), "unknown label values [7]")], ids=["1.5", "7"])
def test_a_bad_ground_truth_is_refused_naming_its_file(tmp_path, values, problem):
    record, _, seg = _case(tmp_path / "data", label_values=values)
    with pytest.raises(DataError) as err:
        predict_case(_model(tmp_path), record, BRATS2021, device=torch.device("cpu"))
    assert err.value.path == str(seg) and err.value.case == "BraTS2021_00001"
    assert problem in err.value.problem and str(seg) in str(err.value)
