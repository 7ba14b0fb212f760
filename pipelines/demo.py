"""The whole pipeline on synthetic phantoms, CPU only (what ``make demo`` runs):
synthesise → train the U-Net and the diffusion model → evaluate → MLflow → overlays."""

import argparse
import sys

from medseg_diff.stages.demo import print_summary, run_demo
from medseg_diff.errors import MedsegError
from medseg_diff.runtime import configure_logging


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    configure_logging()
    try:
        print_summary(run_demo(args.out, args.cases, args.spacing, args.seed, overrides=args.overrides))
    except MedsegError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
