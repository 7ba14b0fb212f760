"""Shared fixtures. Test factories live in tests/factories.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from factories import REAL_DATA  # noqa: E402


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "BraTS-GLI-99999-000").is_dir():
        pytest.skip(f"real BraTS cases not found at {REAL_DATA} (../shared is absent in a user's clone)")
    return REAL_DATA


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """Six synthetic BraTS-2021 phantoms at 5 mm (48x48x31) and their manifest (2 held out for test)."""
    from medseg_diff.data.manifest import build_manifest, write_manifest
    from medseg_diff.data.synth import synthesize

    root = tmp_path_factory.mktemp("phantoms") / "data"
    synthesize(root, cases=6, spacing=5.0, seed=3)
    write_manifest(build_manifest(root, name="tiny-phantoms", folds=2, test_fraction=0.34, seed=0),
                   root / "manifest.json")
    return root / "manifest.json"



@pytest.fixture
def live_pid():
    """A running process: the pid of 'another run' that a lock file or a staging folder names."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()

@pytest.fixture(autouse=True)
def _locale_unchanged():
    """No test may leave the process locale changed: SimpleITK's DICOM writer (GDCM), which tests use to make DICOM
    series, sets it to "C", after which every ``open()`` without an encoding -- torch.compile's templates among
    them -- decodes ASCII. A change is restored (so later tests are not hit) and fails the test that made it."""
    import locale

    before = locale.setlocale(locale.LC_ALL)
    yield
    after = locale.setlocale(locale.LC_ALL)
    if after != before:
        locale.setlocale(locale.LC_ALL, before)
        pytest.fail(f"the process locale changed from {before!r} to {after!r}")
