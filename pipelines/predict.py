"""Segment cases (a manifest, a data folder or a case folder). Same as ``medseg-diff predict``:

    python pipelines/predict.py --checkpoint runs/diff/best.pt --input DATA --out preds --continue-on-error
"""

import sys

from medseg_diff.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
