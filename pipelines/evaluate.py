"""Evaluate models on held-out cases (BraTS metrics, paired statistics, MLflow, overlays).
Same as ``medseg-diff evaluate``:

    python pipelines/evaluate.py --manifest M.json --model diffusion=runs/diff/best.pt \
        --model unet=runs/unet/best.pt --out runs/eval
"""

import sys

from medseg_diff.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
