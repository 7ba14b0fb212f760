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
