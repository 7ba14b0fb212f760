"""Issue 20, item 3: what `evaluate --workers N` buys. Phantoms at 1 mm (240 x 240 x 155) and two plain prediction
folders made from their labels (a: eroded by one voxel, b: shifted by 2 voxels along x, so neither scores 1), then
the whole `medseg-diff evaluate` command timed with --workers 1 and with each N asked for; per_case.csv compared.

    .venv/bin/python -m benchmarks.bench_eval_workers [--out /tmp/eval_workers] [--cases 8] [--workers 2 4]
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def make_predictions(data: Path, out: Path) -> None:
    """``out/a/CASE.nii.gz`` (labels eroded one voxel) and ``out/b/CASE.nii.gz`` (labels shifted 2 voxels)."""
    for seg in sorted(data.glob("*/*_seg.nii.gz")):
        case = seg.parent.name
        image = nib.load(str(seg))
        labels = np.asarray(image.dataobj).astype(np.uint8)
        variants = {"a": np.where(ndimage.binary_erosion(labels > 0), labels, 0).astype(np.uint8),
                    "b": np.roll(labels, 2, axis=0)}
        for name, array in variants.items():
            (out / name).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, image.affine, image.header), str(out / name / f"{case}.nii.gz"))


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "medseg_diff.cli", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/eval_workers"))
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    data = args.out / "data"
    if not (data / "manifest.json").exists():
        cli("synth", "--out", str(data), "--cases", str(args.cases), "--spacing", "1", "--test-fraction", "0.0",
            "--folds", "0")
        make_predictions(data, args.out)
    rows = []
    for workers in [1, *args.workers]:
        out = args.out / f"eval{workers}"
        t0 = time.perf_counter()
        cli("evaluate", "--manifest", str(data / "manifest.json"), "--predictions", f"a={args.out / 'a'}",
            "--predictions", f"b={args.out / 'b'}", "--out", str(out), "--subset", "all", "--no-tracking",
            "--export-cases", "0", "--workers", str(workers))
        seconds = time.perf_counter() - t0
        same = filecmp.cmp(args.out / "eval1" / "per_case.csv", out / "per_case.csv", shallow=False)
        rows.append(f"| {workers} | {seconds:.1f} s | {'yes' if same else 'NO'} |")
    print(f"{args.cases} phantoms at 1 mm x 2 prediction folders = {2 * args.cases} scoring jobs\n")
    print("| workers | wall (whole command) | per_case.csv identical to --workers 1 |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
