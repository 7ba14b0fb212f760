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
