"""Clinician overlays of predictions (NIfTI, colour tables, montage PNG, report.html).
Same as ``medseg-diff export``:

    python pipelines/export_overlays.py --predictions preds --out overlays
"""

import sys

from medseg_diff.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
