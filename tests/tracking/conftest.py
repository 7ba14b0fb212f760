"""Every MLflow registry and serving test: its own model cache, and no store from the environment."""

import pytest


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Fetched models go to this test's folder, and no store comes from the environment."""
    monkeypatch.setenv("MEDSEG_DIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
