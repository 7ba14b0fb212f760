"""Which MLflow store a tracking URI names, and whether MLflow can use it here: one set of rules for the config
check at load (``config``) and for every run that opens a store (``tracking``). No MLflow import.

Tracking URI forms (``tracking.uri``, ``--tracking-uri``, ``$MLFLOW_TRACKING_URI``): ``sqlite:///PATH.db``,
``http(s)://HOST[:PORT]``, ``databricks[://PROFILE]``, a database URL (``postgresql://``, ``mysql://``,
``mssql://``, with an optional ``+driver``), or a folder (a plain path or ``file:PATH``), which means the embedded
store ``FOLDER/mlflow.db`` with its artifacts in ``FOLDER/mlartifacts/``: MLflow 3 no longer opens its old file
store (``./mlruns`` folders). A folder that already holds such a file store is refused until it is migrated
(``mlflow migrate-filestore``), unless ``MLFLOW_ALLOW_FILE_STORE=true`` asks MLflow to open it as before.
A plain path ending in ``.db`` (``sqlite:///PATH.db`` was meant) is refused too.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

DEFAULT_URI = "sqlite:///mlflow.db"
ENV = "MLFLOW_TRACKING_URI"
#: URI schemes MLflow has a tracking store for. MLflow has no public API that lists them: tests/test_config.py checks
#: this list against its (private) store registry, so that an MLflow upgrade that changes it fails a test.
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                    "databricks-uc", "uc")
BARE_SCHEMES = ("databricks", "databricks-uc", "uc")  # schemes MLflow takes as the whole URI (no "://")
STORE_DB = "mlflow.db"  # the database of a folder store: FOLDER/mlflow.db


def resolve_uri(uri: str | None, source: str | None = None) -> str:
    """The tracking URI a run uses: ``uri`` (the config's or a ``--tracking-uri``), else ``$MLFLOW_TRACKING_URI``,
    else the embedded sqlite store in the working directory; a folder (or ``file:`` URI) becomes the embedded
    store inside it. A URI MLflow cannot use is a ``ConfigError`` naming ``tracking.uri`` and ``source`` (or
    ``$MLFLOW_TRACKING_URI`` when it came from there)."""
    if not uri and os.environ.get(ENV):
        uri, source = os.environ[ENV], f"${ENV}"
    if not uri:
        return DEFAULT_URI
    check_tracking_uri(uri, source)
    return store_uri(uri)


def check_tracking_uri(uri: str | None, source: str | None = None, key: str = "tracking.uri") -> None:
    """``ConfigError(key, problem, source)`` when ``uri`` is not a tracking URI MLflow can use here (its form:
    ``uri_problem``; a folder that cannot hold the store: ``folder_problem``); None passes. For a ``--tracking-uri``
    flag, before any work: ``check_tracking_uri(args.tracking_uri, "--tracking-uri")``."""
    problem = uri_problem(uri) if uri is not None else None
    if problem is None and uri is not None:
        problem = folder_problem(uri)
    if problem is not None:
        from medseg_diff.errors import ConfigError

        raise ConfigError(key, problem, source)


def uri_problem(uri: str) -> str | None:
    """What is wrong with the form of ``uri`` as a tracking URI, else None (nothing on disk is looked at)."""
    if not uri.strip():
        return "is empty; leave it null for $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here"
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError as err:
        return f"not a valid URI ({err}), got {uri!r}"
    scheme = parts.scheme.split("+")[0].lower()
    if uri in BARE_SCHEMES or len(scheme) <= 1:  # "databricks" (MLflow's names without "://"), or a folder (no
        return None                                # scheme, or a Windows drive letter): checked on disk
    if scheme not in TRACKING_SCHEMES:
        return (f"scheme '{scheme}' is not one MLflow tracks to (use sqlite:///PATH.db, a folder, "
                f"http(s)://HOST[:PORT], databricks, or a database URL such as postgresql://), got {uri!r}")
    if scheme in ("http", "https"):
        if not parts.hostname:
            return f"needs a host, as in {scheme}://HOST:PORT, got {uri!r}"
        try:
            parts.port
        except ValueError:
            return f"the port must be a number in 0..65535, as in {scheme}://HOST:5000, got {uri!r}"
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            return f"must look like sqlite:///PATH.db (relative) or sqlite:////ABS/PATH.db, got {uri!r}"
        if not uri[len("sqlite:///"):].split("?", 1)[0]:
            return f"names no database file: write sqlite:///PATH.db, got {uri!r}"
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            return (f"a file: URI names a folder on this machine (file:///ABS/FOLDER or file:FOLDER), "
                    f"got host '{parts.netloc}' in {uri!r}")
        if not parts.path:
            return f"names no folder: write file:FOLDER or a plain FOLDER, got {uri!r}"
    return None


def folder_of(uri: str) -> Path | None:
    """The folder a plain-path or ``file:`` tracking URI names (``~`` expanded), else None."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return Path(urllib.parse.unquote(parts.path)).expanduser()
    if len(scheme) <= 1 and uri not in BARE_SCHEMES:
        return Path(uri).expanduser()
    return None


def file_store_allowed() -> bool:
    """Whether ``MLFLOW_ALLOW_FILE_STORE`` asks MLflow to open its retired file store (MLflow's own switch)."""
    return os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1")


def folder_problem(uri: str) -> str | None:
    """What keeps the folder of a plain-path or ``file:`` URI from holding the store ``FOLDER/mlflow.db``: it names
    a database file (``x.db``: ``sqlite:///x.db`` was meant), it is a file, or it holds MLflow's retired file store
    (experiment folders with ``meta.yaml``) and no ``mlflow.db``. None for any other URI."""
    folder = folder_of(uri)
    if folder is None or file_store_allowed():
        return None
    if folder.suffix.lower() in (".db", ".sqlite", ".sqlite3") and not folder.is_dir():
        return (f"a plain path or file: URI names a folder (the store FOLDER/mlflow.db); for the database file "
                f"{folder} write sqlite:///{folder.as_posix()}, got {uri!r}")
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == folder else f"cannot be a folder: {p} is a file"
                return (f"'{uri}' {what}; a plain path or file: URI names a folder for the store FOLDER/{STORE_DB}"
                        f" (for a database file write sqlite:///PATH.db)")
            break
    if holds_file_store(folder) and not (folder / STORE_DB).exists():
        return (f"'{uri}' holds an MLflow file store, which MLflow 3 no longer opens; migrate it into this folder "
                f"with: mlflow migrate-filestore --source {folder} --target "
                f"sqlite:///{(folder / STORE_DB).as_posix()} (or set MLFLOW_ALLOW_FILE_STORE=true to keep the file "
                "store)")
    return None


def holds_file_store(folder: Path) -> bool:
    """Whether ``folder`` looks like MLflow's file store (``mlruns/``): a ``.trash`` folder or ``N/meta.yaml``."""
    try:
        if (folder / ".trash").is_dir():
            return True
        return any(p.name.isdigit() and (p / "meta.yaml").is_file() for p in folder.iterdir())
    except OSError:
        return False


def store_uri(uri: str) -> str:
    """``uri`` as MLflow opens it: a folder (plain path or ``file:``) becomes ``sqlite:///FOLDER/mlflow.db`` (its
    artifacts go to ``FOLDER/mlartifacts/``: ``mlflow_store.artifact_root``); with ``MLFLOW_ALLOW_FILE_STORE=true``
    a folder stays MLflow's file store. Any other URI is returned as it is."""
    folder = folder_of(uri)
    if folder is None or file_store_allowed():
        return uri
    return f"sqlite:///{(folder / STORE_DB).as_posix()}"
