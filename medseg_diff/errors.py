"""Errors that reach the user. Each names the file (or config key) and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """Base class of every error the CLI reports without a traceback."""


class DataError(MedsegError):
    """A data file (or a case) is unusable: ``DataError(path, problem, case=...)``."""

    def __init__(self, path: str | Path | None, problem: str, case: str | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        self.case = case
        where = []
        if case:
            where.append(f"case {case}")
        if self.path:
            where.append(self.path)
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {problem}" if prefix else problem)


class ManifestError(DataError):
    """A manifest is malformed, escapes its root, or its checksums no longer match."""


class ConfigError(MedsegError):
    """A config has an unknown key, a wrong type or an invalid value: ``ConfigError(key_path, problem)``."""

    def __init__(self, key: str, problem: str, source: str | Path | None = None):
        self.key = key
        self.problem = problem
        self.source = None if source is None else str(source)
        where = f"{self.source}: " if self.source else ""
        super().__init__(f"{where}config key '{key}': {problem}")


class TrainingError(MedsegError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class ServiceError(MedsegError):
    """An outside service (the MLflow tracking server) did not answer: a runtime fault, not bad input (status 1)."""


# The optional dependencies and the extra that installs each (pyproject.toml): a command that needs one that is
# absent says which, and how to install it, instead of a traceback.
EXTRA_OF = {
    "mlflow": "tracking",
    "pandas": "tracking",
    "nilearn": "synth",
    "pydicom": "dicom",
    "highdicom": "dicom",
    "dicomweb_client": "dicom",
    "requests": "dicom",
}


def missing_extra(err: ImportError) -> str | None:
    """The user's message for an optional dependency that is not installed, or None for any other import error."""
    top = (getattr(err, "name", None) or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    why = {"tracking": "MLflow tracking (pass --no-tracking, or tracking.enabled: false, to run without it)",
           "synth": "the synthetic phantoms (the MNI152 template from nilearn)",
           "dicom": "DICOM input and output"}[extra]
    return (f"{why} needs the Python package '{top}', which is not installed: "
            f"pip install 'medseg-diff[{extra}]' (or 'medseg-diff[all]')")
