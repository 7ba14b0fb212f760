"""Train the diffusion model or the baseline. Same as ``medseg-diff train``; torchrun-ready:

    python pipelines/train.py --config configs/diffusion.yaml
    torchrun --nproc_per_node 2 pipelines/train.py --config configs/brats_gpu.yaml
"""

import sys

from medseg_diff.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
