"""Print the declared floors of medseg-diff's direct dependencies as pip constraints (``name==floor``).

``make test-floors`` (and so ``.ci/run``) installs the package with these constraints into a fresh venv and runs
a smoke subset of the tests: a floor in ``pyproject.toml`` that the code does not actually work with fails CI.

    python tools/floors.py [--extras all] [--skip torch] > floors.txt

Every requirement of the core and of the named extras must be written ``name>=X`` (optionally with an upper
bound, ``name>=X,<Y``); anything else (no floor, ``==``, a marker) is refused, so no direct dependency escapes
the check. ``--skip NAME`` leaves one out (torch: this machine's registries hold no CPU build of its floor, and
the CUDA build from PyPI is several GB; the floor venv keeps the pinned torch of ``constraints.txt``).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def floors(pyproject: Path, extras: list[str], skip: set[str]) -> dict[str, str]:
    """``{name: floor}`` of the core dependencies and of ``extras`` (expanded through self-references)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    own = _name(project["name"])
    optional = project.get("optional-dependencies", {})
    pending, seen_extras = list(extras), set()
    reqs = list(project.get("dependencies", []))
    while pending:
        extra = pending.pop()
        if extra in seen_extras:
            continue
        if extra not in optional:
            raise SystemExit(f"{pyproject}: no extra [{extra}] (have: {', '.join(sorted(optional))})")
        seen_extras.add(extra)
        for req in optional[extra]:
            m = _REQ.match(req)
            if m and _name(m.group(1)) == own:  # medseg-diff[tracking,synth]: an extra naming others
                pending += [e.strip() for e in (m.group(2) or "[]")[1:-1].split(",") if e.strip()]
            else:
                reqs.append(req)
    out: dict[str, str] = {}
    for req in reqs:
        m = _REQ.match(req)
        if not m:
            raise SystemExit(f"{pyproject}: cannot read the requirement {req!r}")
        name, spec = _name(m.group(1)), m.group(3).replace(" ", "")
        if name in skip:
            continue
        parts = [p for p in spec.split(",") if p]
        lows = [p[2:] for p in parts if p.startswith(">=")]
        others = [p for p in parts if not p.startswith((">=", "<"))]
        if len(lows) != 1 or others or ";" in spec:
            raise SystemExit(f"{pyproject}: {req!r} must be written 'name>=FLOOR' (optionally ',<CAP'), "
                             "so that its floor is tested")
        if name in out and out[name] != lows[0]:
            raise SystemExit(f"{pyproject}: {name} has two floors, {out[name]} and {lows[0]}")
        out[name] = lows[0]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--extras", default="all", help="comma-separated extras whose floors are included too")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME", help="leave this dependency out")
    args = parser.parse_args(argv)
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    for name, floor in sorted(floors(args.pyproject, extras, {_name(s) for s in args.skip}).items()):
        print(f"{name}=={floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
