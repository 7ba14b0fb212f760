"""The nnU-Net export stage: a manifest's cases and folds as an nnU-Net v2 raw data set (``data.nnunet``)."""

from __future__ import annotations

from pathlib import Path

from medseg_diff.data.manifest import load_manifest
from medseg_diff.data.nnunet import NnunetExport, export_nnunet


def export_nnunet_dataset(manifest_path: str | Path, out: str | Path, dataset_id: int = 137, name: str | None = None,
                          root: str | Path | None = None, overwrite: bool = False,
                          link: str = "copy") -> NnunetExport:
    """``data.nnunet.export_nnunet`` of the manifest at ``manifest_path`` (``root`` overrides its data root)."""
    return export_nnunet(load_manifest(manifest_path, root=root), out, dataset_id=dataset_id, name=name,
                         overwrite=overwrite, link=link)
