"""Speed of the synthetic phantom generator (``medseg_diff.data.synth.synthesize``).

Target (so that the demo's phantoms are quick on 2 CPU cores): 20 cases at 2 mm in under a minute, < 3 s per
case on one worker. Prints one line per run: cases, spacing, workers, template load seconds, wall seconds
(generation + writing, template load excluded), seconds per case, MB written; plus the tumour label
statistics (how many cases have a small or faint ET, no ET, no NCR).

    .venv/bin/python -m benchmarks.bench_synth --cases 20 --spacing 2 --workers 1 2   # from the repository root
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_diff.data.conventions import BRATS2021
from medseg_diff.data.synth import case_files, synthesize
from medseg_diff.data.synth.anatomy import load_anatomy, template_resolution


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=20, help="cases per run (default 20)")
    p.add_argument("--spacing", type=float, default=2.0, help="output spacing in mm (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    p.add_argument("--no-stats", action="store_true", help="skip the label statistics")
    return p.parse_args(argv)


def time_run(out: Path, cases: int, spacing: float, seed: int, workers: int) -> tuple[float, list[Path]]:
    """(wall seconds, case folders) of one ``synthesize`` call."""
    start = time.perf_counter()
    folders = synthesize(out, cases, spacing=spacing, seed=seed, workers=workers)
    return time.perf_counter() - start, folders


def label_stats(folders: list[Path], spacing: float) -> str:
    """One line summarising ET/NCR/ED volumes (cm³) over the cases."""
    voxel_cm3 = spacing**3 / 1000.0
    et, ncr, ed, faint = [], [], [], 0
    for folder in folders:
        files = case_files(folder, BRATS2021)
        seg = np.asanyarray(nib.load(files["seg"]).dataobj)
        et.append((seg == 4).sum() * voxel_cm3)
        ncr.append((seg == 1).sum() * voxel_cm3)
        ed.append((seg == 2).sum() * voxel_cm3)
        if et[-1] > 0:
            t1, t1ce = (np.asanyarray(nib.load(files[m]).dataobj).astype(np.float64) for m in ("t1", "t1ce"))
            normal = (seg == 0) & (t1 > 0)
            ratio = (t1ce[seg == 4].mean() / t1ce[normal].mean()) / (t1[seg == 4].mean() / t1[normal].mean())
            faint += ratio < 1.5
    et, ncr, ed = map(np.array, (et, ncr, ed))
    n = len(folders)
    return (
        f"labels over {n} cases: ET present {np.sum(et > 0)}, small ET (0 < ET < 1 cm3) {np.sum((et > 0) & (et < 1))}, "
        f"faint ET (T1ce/T1 enhancement < 1.5x) {faint}, no ET {np.sum(et == 0)}, no NCR {np.sum(ncr == 0)}; "
        f"median cm3 NCR {np.median(ncr):.1f} ED {np.median(ed):.1f} ET {np.median(et):.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    """Time ``synthesize`` for each worker count and print the results."""
    args = parse_args(argv)
    start = time.perf_counter()
    load_anatomy(template_resolution(args.spacing))
    load_s = time.perf_counter() - start
    print(f"template load (once per process): {load_s:.1f} s", flush=True)
    folders: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        for workers in args.workers:
            out = (args.out or Path(tmp)) / f"w{workers}"
            wall, folders = time_run(out, args.cases, args.spacing, args.seed, workers)
            mb = sum(f.stat().st_size for d in folders for f in d.iterdir()) / 1e6
            print(
                f"cases={args.cases} spacing={args.spacing:g}mm workers={workers} wall={wall:.1f}s "
                f"s/case={wall / args.cases:.2f} written={mb:.0f}MB",
                flush=True,
            )
        if not args.no_stats and folders:
            print(label_stats(folders, args.spacing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
