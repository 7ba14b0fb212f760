"""A manifest as an nnU-Net v2 raw data set on the manifest's own folds, and nnU-Net's label values back.

Layout (nnU-Net v2 ``documentation/dataset_format.md``) under ``OUT`` (nnU-Net's ``nnUNet_raw``)::

    OUT/Dataset<ID>_<NAME>/
        dataset.json            channel_names, region-based labels, regions_class_order, numTraining, file_ending
        imagesTr/CASE_0000.nii.gz .. CASE_0003.nii.gz   every train case of the folds: t1, t1ce, t2, flair
        labelsTr/CASE.nii.gz                            its label map, in nnU-Net's values (below)
        imagesTs/CASE_0000.nii.gz ..                    every test case (held out; unlabelled cases are left out)
        splits_final.json       [{"train": [...], "val": [...]}, ...]: fold k of the manifest is entry k. nnU-Net reads
                                it from nnUNet_preprocessed/Dataset<ID>_<NAME>/, so it is copied there after
                                ``nnUNetv2_plan_and_preprocess``

Labels follow nnU-Net's own BraTS example (``nnunetv2/dataset_conversion/Dataset137_BraTS21.py``,
``documentation/region_based_training.md``): consecutive values 1 edema, 2 necrosis / non-enhancing core,
3 enhancing (``NNUNET_LABELS``), trained as the regions whole tumour (1, 2, 3), tumour core (2, 3) and enhancing
tumour (3) with ``regions_class_order`` (1, 2, 3), so nnU-Net writes its predictions in the same three values. Every
convention maps onto them through its roles (``LabelConvention.edema/core/enhancing``): BraTS 2021 (1 NCR, 2 ED, 4 ET)
and BraTS 2023 (1 NCR, 2 ED, 3 ET) both swap 1 and 2; MSD (1 edema, 2 non-enhancing, 3 enhancing) is already nnU-Net's.

The way back (``labels_back``): ``nnUNetv2_predict`` copies dataset.json into its output folder; a dataset.json that
defines nnU-Net's BraTS labels (ours, which also records the mapping under ``DATASET_JSON_KEY``, nnU-Net's
Dataset137 and the label-based example of its documentation) gives the map from nnU-Net's values to a convention's.

Images are copied byte for byte when they are ``.nii.gz`` (or hard/symbolic links, ``link``), else read through
``data.io`` and written as NIfTI by nibabel with their geometry; MSD's 4D images are split into the four channels in
``MODALITIES`` order. Label maps are always rewritten (uint8, the label's own header and affine).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_diff.data.check import grid_mismatch
from medseg_diff.data.conventions import MODALITIES, MSD_CHANNEL_ORDER, LabelConvention, get_convention
from medseg_diff.data.io import image_suffix, read_image
from medseg_diff.data.manifest import Manifest, ManifestCase
from medseg_diff.errors import DataError, ManifestError

log = logging.getLogger(__name__)

#: nnU-Net's consecutive label value of each role of a ``LabelConvention`` (Dataset137_BraTS21.py).
NNUNET_LABELS: dict[str, int] = {"edema": 1, "core": 2, "enhancing": 3}
#: dataset.json ``labels``: the regions, in the order ``regions_class_order`` fills them (encompassing first).
REGION_LABELS: dict[str, int | list[int]] = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                                             "enhancing tumor": [3]}
REGIONS_CLASS_ORDER: list[int] = [1, 2, 3]
#: dataset.json ``channel_names`` per convention, in ``MODALITIES`` order (nnU-Net's BraTS 2021 and 2024 examples).
CHANNEL_NAMES: dict[str, tuple[str, ...]] = {"brats2021": ("T1", "T1ce", "T2", "Flair"),
                                             "brats2023": ("T1", "T1C", "T2W", "T2F"),
                                             "msd": ("T1", "T1ce", "T2", "Flair")}
FILE_ENDING = ".nii.gz"
#: The key of dataset.json under which the export records where it came from and its label mapping.
DATASET_JSON_KEY = "medseg_diff"
SPLITS_FILE = "splits_final.json"
LINK_MODES = ("copy", "hardlink", "symlink")
#: nnU-Net finds a data set by its three-digit id (``Dataset%03d_``).
DATASET_ID_RANGE = (1, 999)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

#: dataset.json label definitions whose nnU-Net values mean these roles: (labels, regions_class_order) -> roles.
#: Label names are compared lower-case with spaces for underscores; values as sorted tuples.
_KNOWN_DEFINITIONS: list[tuple[dict[str, tuple[int, ...]], tuple[int, ...] | None]] = [
    ({"background": (0,), "whole_tumor": (1, 2, 3), "tumor_core": (2, 3), "enhancing_tumor": (3,)}, (1, 2, 3)),
    ({"background": (0,), "edema": (1,), "non_enhancing_and_necrosis": (2,), "enhancing_tumor": (3,)}, None),
]


@dataclass
class NnunetExport:
    """What ``export_nnunet`` wrote."""

    folder: Path  # OUT/Dataset<ID>_<NAME>
    train: int  # cases in imagesTr/labelsTr
    test: int  # cases in imagesTs
    folds: int
    left_out: list[str]  # unlabelled cases (not exported)

    @property
    def dataset_json(self) -> Path:
        return self.folder / "dataset.json"

    @property
    def splits(self) -> Path:
        return self.folder / SPLITS_FILE

    def summary(self) -> str:
        name = self.folder.name
        lines = [f"wrote {self.folder}: {self.train} training cases in {self.folds} folds, {self.test} test cases"
                 + (f"; {len(self.left_out)} unlabelled case(s) left out" if self.left_out else ""),
                 "nnU-Net trains on these folds once splits_final.json is copied into its preprocessed folder:",
                 f"  nnUNetv2_plan_and_preprocess -d {int(name[7:10])} --verify_dataset_integrity",
                 f"  cp {self.splits} \"$nnUNet_preprocessed/{name}/{SPLITS_FILE}\""]
        return "\n".join(lines)


def to_nnunet(conv: LabelConvention) -> dict[int, int]:
    """The convention's label value -> nnU-Net's (background 0 -> 0)."""
    return {0: 0} | {getattr(conv, role): value for role, value in NNUNET_LABELS.items()}


def from_nnunet(conv: LabelConvention) -> dict[int, int]:
    """nnU-Net's label value -> the convention's (the inverse of ``to_nnunet``)."""
    return {v: k for k, v in to_nnunet(conv).items()}


def convert_labels(label: np.ndarray, mapping: dict[int, int], path: str | Path, what: str,
                   case: str | None = None) -> np.ndarray:
    """``label`` with every value replaced through ``mapping``, as uint8; a value ``mapping`` lacks (or a
    non-integral one) is a ``DataError`` naming ``path`` (``what``: whose labels the keys are)."""
    label = np.asarray(label)
    values = np.unique(label).tolist()
    bad = [v for v in values if not float(v).is_integer() or int(v) not in mapping]
    if bad:
        shown = [int(v) if float(v).is_integer() else v for v in bad]
        raise DataError(path, f"label values {shown} are not {what} {sorted(mapping)}", case=case)
    out = np.zeros(label.shape, dtype=np.uint8)
    for src, dst in mapping.items():
        if dst:
            out[label == src] = dst
    return out


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset<ID>_<NAME>``, refusing an id nnU-Net cannot find (not 1..999) or a name that is no plain folder
    name."""
    low, high = DATASET_ID_RANGE
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not low <= dataset_id <= high:
        raise DataError(None, f"nnU-Net dataset id must be an integer in {low}..{high} (three digits), got "
                              f"{dataset_id!r}")
    if not _NAME.match(name):
        raise DataError(None, f"nnU-Net dataset name {name!r} must be 1-64 letters, digits, '_' or '-' starting with "
                              "a letter or digit (it becomes the folder Dataset<ID>_<NAME>)")
    return f"Dataset{dataset_id:03d}_{name}"


def default_name(manifest: Manifest) -> str:
    """The manifest's name made into a data set name (other characters become '_')."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", manifest.name).strip("_-")[:64]
    return name or "BraTS"


def fold_splits(manifest: Manifest) -> list[dict[str, list[str]]]:
    """nnU-Net's splits_final.json of the manifest's folds: entry k trains on the other folds, validates on k."""
    if manifest.folds < 2:
        raise ManifestError(manifest.source, f"has no cross-validation folds (splits.folds is {manifest.folds}); "
                                             "rebuild it with 'medseg-diff manifest --folds 5' so nnU-Net can train "
                                             "on the same folds")
    splits = []
    for fold in range(manifest.folds):
        train, val, _ = manifest.split(fold)
        if not val:
            raise ManifestError(manifest.source, f"fold {fold} has no case (splits.folds is {manifest.folds} for "
                                                 f"{len(train)} train cases); use fewer folds")
        splits.append({"train": [c.id for c in train], "val": [c.id for c in val]})
    return splits


def dataset_json(manifest: Manifest, num_training: int) -> dict:
    """dataset.json of the export: nnU-Net's region-based BraTS labels (Dataset137), the channels in
    ``MODALITIES`` order, and under ``DATASET_JSON_KEY`` the manifest and the label mapping back."""
    conv = get_convention(manifest.convention)
    return {
        "channel_names": {str(i): n for i, n in enumerate(CHANNEL_NAMES[conv.name])},
        "labels": {k: list(v) if isinstance(v, list) else v for k, v in REGION_LABELS.items()},
        "regions_class_order": list(REGIONS_CLASS_ORDER),
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
        "name": manifest.name,
        "description": f"{manifest.name} exported by medseg-diff on its {manifest.folds} folds ({SPLITS_FILE}); "
                       f"labels are nnU-Net's, see '{DATASET_JSON_KEY}' for the {conv.name} values",
        DATASET_JSON_KEY: {
            "manifest": manifest.name,
            "manifest_sha256": manifest.content_hash(),
            "convention": conv.name,
            "folds": manifest.folds,
            "channels": list(MODALITIES),
            "nnunet_to_convention": {str(k): v for k, v in from_nnunet(conv).items()},
        },
    }


def export_nnunet(manifest: Manifest, out: str | Path, dataset_id: int = 137, name: str | None = None,
                  overwrite: bool = False, link: str = "copy") -> NnunetExport:
    """Write ``manifest`` as nnU-Net raw data set ``out/Dataset<ID>_<NAME>`` (module docstring): train cases of every
    fold with their labels, test cases as imagesTs, dataset.json and splits_final.json.

    Refused before anything is written (``DataError``/``ManifestError`` naming the file or folder): a manifest
    without folds, or with a fold that has no case; a bad id or name; an existing non-empty data set folder (unless
    ``overwrite``); another folder with the same id in ``out`` (nnU-Net could not tell them apart). While a case is
    exported: a train case without a label, a missing image, an image off its label's grid, label values outside the
    convention. The data set is built in a hidden folder beside its place and moved there when complete: a failure
    leaves nothing half-written and an overwritten data set is replaced only then."""
    if link not in LINK_MODES:
        raise DataError(None, f"link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    splits = fold_splits(manifest)
    folder_name = dataset_folder_name(dataset_id, name if name is not None else default_name(manifest))
    out = Path(out)
    final = out / folder_name
    _check_target(out, final, dataset_id, overwrite)
    train = [c for c in manifest.cases if c.subset == "train"]
    test = [c for c in manifest.cases if c.subset == "test"]
    left_out = [c.id for c in manifest.cases if c.subset == "unlabelled"]
    conv = get_convention(manifest.convention)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{folder_name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir(parents=True)
        for case in train:
            _export_case(manifest, case, tmp / "imagesTr", tmp / "labelsTr", conv, link)
        for case in test:
            _export_case(manifest, case, tmp / "imagesTs", None, conv, link)
        _write_json(dataset_json(manifest, len(train)), tmp / "dataset.json")
        _write_json(splits, tmp / SPLITS_FILE)
        if final.exists():
            shutil.rmtree(final) if final.is_dir() and not final.is_symlink() else final.unlink()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("nnU-Net data set %s: %d train, %d test cases", final, len(train), len(test))
    return NnunetExport(folder=final, train=len(train), test=len(test), folds=manifest.folds, left_out=left_out)


def read_dataset_json(folder: str | Path) -> dict | None:
    """``folder/dataset.json`` as a dict, None when there is none; unreadable JSON is a ``DataError``."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, f"not a readable dataset.json ({err})") from None
    if not isinstance(doc, dict):
        raise DataError(path, "dataset.json must hold an object")
    return doc


def labels_back(doc: dict | None, conv: LabelConvention, path: str | Path) -> dict[int, int] | None:
    """nnU-Net's label value -> ``conv``'s, for a prediction folder whose dataset.json (``doc``, read from ``path``)
    defines nnU-Net's BraTS labels (``_KNOWN_DEFINITIONS``); None when there is no dataset.json or it defines plain
    labels of its own (taken to be ``conv``'s values, as nnU-Net's Dataset226 BraTS 2024 labels are BraTS 2023's).

    Refused (``DataError`` naming ``path``), since their values cannot be read as BraTS labels: a dataset.json with
    ``regions_class_order`` that is not nnU-Net's BraTS definition, and one of this package's exports
    (``DATASET_JSON_KEY``) whose labels were changed."""
    if doc is None or "labels" not in doc:
        return None
    known = _is_known_definition(doc)
    if known:
        return from_nnunet(conv)
    if DATASET_JSON_KEY in doc:
        raise DataError(path, f"exported by medseg-diff, but its labels / regions_class_order are no longer nnU-Net's "
                              f"BraTS regions {REGION_LABELS} with regions_class_order {REGIONS_CLASS_ORDER}; the "
                              "predictions' values cannot be mapped back")
    if "regions_class_order" in doc:
        raise DataError(path, f"nnU-Net region-based labels {doc.get('labels')} with regions_class_order "
                              f"{doc.get('regions_class_order')} are not nnU-Net's BraTS regions {REGION_LABELS} "
                              f"(regions_class_order {REGIONS_CLASS_ORDER}); convert the predictions to "
                              f"{conv.name} labels {list(conv.labels)} first")
    return None


def _is_known_definition(doc: dict) -> bool:
    labels = _normalised_labels(doc.get("labels"))
    order = doc.get("regions_class_order")
    order = tuple(order) if isinstance(order, list) else order
    return labels is not None and any(labels == want and order == want_order
                                      for want, want_order in _KNOWN_DEFINITIONS)


def _normalised_labels(labels) -> dict[str, tuple[int, ...]] | None:
    if not isinstance(labels, dict):
        return None
    out = {}
    for key, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return None
        out[str(key).strip().lower().replace(" ", "_")] = tuple(sorted(values))
    return out


def _check_target(out: Path, final: Path, dataset_id: int, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(out, "is a file; give the nnU-Net raw folder (nnUNet_raw) to write the data set into")
    if final.exists() and not final.is_dir():
        raise DataError(final, "is a file, not a data set folder")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise DataError(final, "already holds files; pass --overwrite to replace this data set (nothing was written)")
    prefix = f"Dataset{dataset_id:03d}_"
    twins = sorted(p.name for p in out.glob(f"{prefix}*") if p.is_dir() and p.name != final.name) \
        if out.is_dir() else []
    if twins:
        raise DataError(out / twins[0], f"has dataset id {dataset_id} too; nnU-Net finds a data set by its id and "
                                        f"could not tell it from {final.name}: choose another --dataset-id")


def _export_case(manifest: Manifest, case: ManifestCase, images_dir: Path, labels_dir: Path | None,
                 conv: LabelConvention, link: str) -> None:
    missing = manifest.missing_images(case)
    if missing:
        raise ManifestError(manifest.source, f"missing image(s) {', '.join(missing)}", case=case.id)
    ref = None
    if labels_dir is not None:
        if not case.label:
            raise ManifestError(manifest.source, "a train case without a label cannot be an nnU-Net training case",
                                case=case.id)
        label_path = manifest.path_of(case.label)
        ref = (read_image(label_path), label_path)
        data = np.asarray(ref[0].dataobj, dtype=np.float32)
        converted = convert_labels(data, to_nnunet(conv), label_path, f"{conv.name} labels", case=case.id)
        header = ref[0].header.copy()
        header.set_data_dtype(np.uint8)
        nib.save(nib.Nifti1Image(converted, ref[0].affine, header), str(labels_dir / f"{case.id}{FILE_ENDING}"))
    targets = [images_dir / f"{case.id}_{i:04d}{FILE_ENDING}" for i in range(len(MODALITIES))]
    if manifest.image_layout == "4d":
        _split_4d(manifest.path_of(case.images["4d"]), targets, ref, case.id)
        return
    for modality, target in zip(MODALITIES, targets):
        source = manifest.path_of(case.images[modality])
        img = read_image(source)  # header only for NIfTI: checks it before it is copied
        if ref is None:
            ref = (img, source)
        _same_grid(img, source, ref, case.id)
        _write_image(source, img, target, link)


def _split_4d(source: Path, targets: list[Path], ref, case_id: str) -> None:
    """MSD: the 4D image's volumes (``MSD_CHANNEL_ORDER``) as one NIfTI per channel in ``MODALITIES`` order."""
    img = read_image(source)
    if len(img.shape) != 4 or img.shape[3] != len(MSD_CHANNEL_ORDER):
        raise DataError(source, f"expected a 4D image with {len(MSD_CHANNEL_ORDER)} volumes "
                                f"({', '.join(MSD_CHANNEL_ORDER)}), got shape {tuple(img.shape)}", case=case_id)
    if ref is not None:
        _same_grid(img, source, ref, case_id)
    data = np.asanyarray(img.dataobj)
    for modality, target in zip(MODALITIES, targets):
        volume = data[..., MSD_CHANNEL_ORDER.index(modality)]
        nib.save(nib.Nifti1Image(volume, img.affine), str(target))


def _same_grid(img, path: Path, ref, case_id: str) -> None:
    problems = grid_mismatch(img.shape, img.affine, ref[0].shape, ref[0].affine, ref[1])
    if problems:
        raise DataError(path, f"not on the grid of the case's label / first image: {problems[0]}; nnU-Net needs "
                              "every channel and the label on one grid", case=case_id)


def _write_image(source: Path, img, target: Path, link: str) -> None:
    if image_suffix(source) != FILE_ENDING:  # .nii, MetaImage, NRRD, DICOM: written as NIfTI, geometry kept
        nib.save(img, str(target))
    elif link == "hardlink":
        os.link(source, target)
    elif link == "symlink":
        os.symlink(source.resolve(), target)
    else:
        shutil.copyfile(source, target)


def _write_json(doc, path: Path) -> None:
    # sort_keys stays False: regions_class_order fills the regions in the order of "labels" (region_based_training.md)
    path.write_text(json.dumps(doc, indent=4, sort_keys=False) + "\n", encoding="utf-8")
