"""``medseg-diff`` console script. Each subcommand parses its arguments and calls one API function;
``pipelines/*.py`` call the same functions. Errors of type ``MedsegError`` print one clear line
(file/key and problem) and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from medseg_diff.errors import MedsegError

# name -> (help, add_arguments, run)
_COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help: str):
    def register(add_arguments: Callable):
        def attach(run: Callable):
            _COMMANDS[name] = (help, add_arguments, run)
            return run

        return attach

    return register


# --- synth -------------------------------------------------------------------------------------------


def add_synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (1 for realism, 2-3 for CPU demos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("brats2021", "brats2023"), default="brats2021")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--manifest", type=Path, default=None, help="manifest path (default OUT/manifest.json)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--test-fraction", type=float, default=0.2)


@command("synth", "write synthetic BraTS-like phantoms (MNI152 anatomy + grown tumour) and their manifest")(add_synth_args)
def run_synth(args: argparse.Namespace) -> int:
    from medseg_diff.data.manifest import build_manifest, write_manifest
    from medseg_diff.data.synth import synthesize

    folders = synthesize(args.out, cases=args.cases, spacing=args.spacing, seed=args.seed,
                         layout=args.layout, workers=args.workers, progress=True)
    manifest = build_manifest(args.out, name=args.out.name, convention=args.layout, folds=args.folds,
                              test_fraction=args.test_fraction, seed=args.seed)
    path = write_manifest(manifest, args.manifest or args.out / "manifest.json")
    print(f"wrote {len(folders)} cases to {args.out} and manifest {path}")
    return 0


# --- manifest ----------------------------------------------------------------------------------------


def add_manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", type=Path, help="data set folder (BraTS 2018-2021, BraTS 2023+ or MSD Task01)")
    p.add_argument("--out", type=Path, required=True, help="manifest JSON to write")
    p.add_argument("--name", default=None, help="data set name (default: the folder's name)")
    p.add_argument("--convention", choices=("brats2021", "brats2023", "msd"), default=None,
                   help="force the layout / label convention instead of detecting it")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


@command("manifest", "build a manifest (paths, SHA-256, convention, splits) of a data set folder")(add_manifest_args)
def run_manifest(args: argparse.Namespace) -> int:
    from medseg_diff.data.manifest import build_manifest, write_manifest

    manifest = build_manifest(args.root, name=args.name, convention=args.convention, folds=args.folds,
                              test_fraction=args.test_fraction, seed=args.seed)
    path = write_manifest(manifest, args.out)
    subsets = {s: sum(c.subset == s for c in manifest.cases) for s in ("train", "test", "unlabelled")}
    print(f"{manifest.name}: {len(manifest.cases)} cases, convention {manifest.convention}, "
          f"{manifest.folds} folds; train {subsets['train']}, test {subsets['test']}, "
          f"unlabelled {subsets['unlabelled']} -> {path}")
    return 0


# --- check -------------------------------------------------------------------------------------------


def add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path)
    p.add_argument("--root", type=Path, default=None, help="override the manifest's data root")
    p.add_argument("--continue-on-error", action="store_true", help="check every case and list all problems")
    p.add_argument("--no-checksums", action="store_true", help="skip SHA-256 verification (faster)")


@command("check", "verify a manifest: files readable, grids agree, labels valid, no NaN/Inf, checksums")(add_check_args)
def run_check(args: argparse.Namespace) -> int:
    from medseg_diff.data.check import check_manifest
    from medseg_diff.data.manifest import load_manifest

    manifest = load_manifest(args.manifest, root=args.root)

    def report(case, problems) -> None:
        print(f"{'ok  ' if not problems else 'FAIL'} {case.id}", flush=True)
        for p in problems:
            print(f"     {p}", file=sys.stderr, flush=True)

    problems = check_manifest(manifest, continue_on_error=args.continue_on_error,
                              verify_checksums=not args.no_checksums, on_case=report)
    if problems:
        print(f"{len(problems)} problem(s) in {args.manifest}", file=sys.stderr)
        return 1
    print(f"{len(manifest.cases)} cases ok ({args.manifest})")
    return 0


# --- entry point -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from medseg_diff import __version__

    parser = argparse.ArgumentParser(prog="medseg-diff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medseg-diff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, _, run = _COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except MedsegError as err:
        print(f"medseg-diff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medseg-diff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
