"""Mechanism audit of a checkpoint (does each part of the diffusion model do its job?). Same as
``medseg-diff diagnose``:

    python pipelines/diagnose.py --checkpoint runs/diff/best.pt --manifest M.json --out runs/audit \
        --reference runs/unet/best.pt
"""

import sys

from medseg_diff.cli import main

if __name__ == "__main__":
    sys.exit(main(["diagnose", *sys.argv[1:]]))
