"""Everything medseg-diff does to MLflow beyond its public client API, in this one module.

* **The MLflow version.** ``check_mlflow_version`` (run by :func:`client` and :func:`relocate_store`, once per
  process): older than ``MLFLOW_REQUIRED`` (pyproject.toml's ``mlflow>=2.16``) is a ``ServiceError``; outside
  ``MLFLOW_TESTED`` (MLflow 3, tested with 3.17.2, see the README) a ``RuntimeWarning``, once.
* **The process's tracking URI for a block** (:func:`process_tracking_uri`): parts of ``Model.log`` use the global
  one. Only ``mlflow.get_tracking_uri`` / ``mlflow.set_tracking_uri`` (public) are used; the global is put back
  unset (``set_tracking_uri(None)``, which MLflow's own code uses to unset it) when that resolves as before.
* **Moving an embedded store** (:func:`relocate_store`): direct SQL on MLflow's own tables. MLflow has no public
  API that changes a stored artifact location: ``MlflowClient.update_run`` takes only a status and a name,
  ``update_model_version`` only a description, experiments and logged models have none (artifact locations are
  fixed at creation; mlflow/mlflow#3144 and #8226 ask for one). ``mlflow db move-resources`` moves experiments
  between workspaces, not folders. So the UPDATEs stay, here only, on the columns named in ``_ARTIFACT_COLUMNS``
  (tables absent from a schema are skipped), to be checked against each new MLflow schema.
* **Error codes**: :func:`is_missing` reads ``MlflowException.error_code`` as MLflow's protobuf name
  (``RESOURCE_DOES_NOT_EXIST``) without importing ``mlflow.protos``.

MLflow is imported only inside the functions: ``tracking: false`` must not import it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

#: The oldest MLflow medseg-diff runs with: pyproject.toml's ``mlflow>=2.16`` (keep the two in step).
MLFLOW_REQUIRED = (2, 16)
#: MLflow versions it is tested with, ``[low, high)``: MLflow 3 (logged models, ``Model.log(name=, model_id=)``);
#: the README names the exact version of the last test run (3.17.2).
MLFLOW_TESTED = ((3, 0), (4, 0))
_ENV = "MLFLOW_TRACKING_URI"


# ----------------------------------------------------------------------------------------------- version


def mlflow_version() -> str:
    """The installed MLflow version (``mlflow`` or ``mlflow-skinny``), read from its metadata, else the module."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("mlflow", "mlflow-skinny"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import mlflow

    return str(mlflow.__version__)


def _release(text: str) -> tuple[int, ...]:
    """``"3.17.2"`` -> ``(3, 17, 2)``; ``"3.0.0rc1"`` -> ``(3, 0, 0)``."""
    return tuple(int(part) for part in re.findall(r"\d+", re.match(r"[\d.]*", text).group(0)))


def _dotted(release: tuple[int, ...]) -> str:
    return ".".join(str(n) for n in release)


@functools.cache
def check_mlflow_version() -> str:
    """The installed MLflow version, after checking it: a ``ServiceError`` when older than ``MLFLOW_REQUIRED``, a
    ``RuntimeWarning`` (once per process) when outside ``MLFLOW_TESTED``."""
    installed = mlflow_version()
    release = _release(installed)
    if release < MLFLOW_REQUIRED:
        from medseg_diff.errors import ServiceError

        raise ServiceError(f"MLflow {installed} is installed; medseg-diff needs MLflow >= {_dotted(MLFLOW_REQUIRED)} "
                           f"(pip install 'mlflow>={_dotted(MLFLOW_REQUIRED)}'), or set tracking.enabled=false")
    low, high = MLFLOW_TESTED
    if not low <= release < high:
        message = (f"MLflow {installed} is outside the versions medseg-diff is tested with (>= {_dotted(low)}, "
                   f"< {_dotted(high)}); tracking, model logging or moving a store may not work")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return installed


# ----------------------------------------------------------------------------------------------- client


def client(tracking_uri: str):
    """An ``MlflowClient`` on ``tracking_uri``, after :func:`check_mlflow_version`."""
    check_mlflow_version()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def is_missing(err: BaseException) -> bool:
    """Whether an ``MlflowException`` says that what was asked for does not exist."""
    return getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


@contextlib.contextmanager
def process_tracking_uri(uri: str):
    """Make ``uri`` the process's tracking URI for a block, then put back what the process resolved before (the
    global unset again when that gives the same URI) and ``$MLFLOW_TRACKING_URI``, which
    ``mlflow.set_tracking_uri`` also sets."""
    import mlflow

    saved_env = os.environ.get(_ENV)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unset: resolved from $MLFLOW_TRACKING_URI or MLflow's default again
        _restore_env(saved_env)
        if mlflow.get_tracking_uri() != before:  # it had been set in this process: set it again
            mlflow.set_tracking_uri(before)
            _restore_env(saved_env)


def _restore_env(value: str | None) -> None:
    if value is None:
        os.environ.pop(_ENV, None)
    else:
        os.environ[_ENV] = value


# ----------------------------------------------------------------------------------------------- sqlite store


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (relative PATHs are relative to the working directory)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if not rest or rest == ":memory:" else Path(rest)


def artifact_root(uri: str) -> str | None:
    """The artifact location of a new experiment in an embedded store: ``mlartifacts/`` beside the database (a
    ``file://`` URI); None (MLflow's default) for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):]).resolve()
    return (db.parent / "mlartifacts").as_uri()


#: MLflow's columns that hold artifact locations: what a moved store needs rewritten (tables absent from older
#: schemas are skipped). Registered versions of MLflow 3 have ``source = models:/m-ID``, which no move affects.
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                     ("model_versions", "source"))
_STORE_FOLDERS = ("mlartifacts", "mlruns")  # beside the database: ours, and MLflow's default for experiment 0


def relocate_store(db: str | Path) -> int:
    """Point a moved or copied sqlite store at the ``mlartifacts/`` (and ``mlruns/``) beside its database again.

    An experiment whose artifact location is a local ``.../mlartifacts`` folder that is not beside ``db`` (as
    :func:`artifact_root` makes them, before the move) names the store's old folder ``OLD``; every artifact
    location under ``OLD/mlartifacts`` or ``OLD/mlruns`` -- experiments, runs, logged models, model versions -- is
    rewritten to the same path under ``db``'s folder. Nothing is done when the old folder is the same one (another
    path to it), or when it still exists while no ``mlartifacts`` is beside ``db`` (only the database was moved:
    the artifacts are still where it says). Locations elsewhere (``mlflow-artifacts:``, ``s3://``, other folders)
    are left alone. Returns the number of values rewritten.
    """
    import sqlite3

    db = Path(db)
    if not db.is_file():
        return 0
    check_mlflow_version()
    try:
        return _relocate(sqlite3.connect(str(db), timeout=30), db.resolve().parent)
    except sqlite3.Error as err:  # read-only or not MLflow's: MLflow itself will say what is wrong
        log.warning("could not check or relocate the artifact locations of %s (%s)", db, err)
        return 0


def _relocate(con, here: Path) -> int:
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return 0
        moved_from = set()
        for (location,) in con.execute("SELECT artifact_location FROM experiments"):
            path = _local_path(location)
            if path is None or path.name != "mlartifacts" or path.parent == here:
                continue
            if path.exists() and path.resolve() == here / "mlartifacts":
                continue
            if (here / "mlartifacts").is_dir() or not path.exists():
                moved_from.add(path.parent)
        changed = 0
        with con:
            for old in moved_from:
                for folder in _STORE_FOLDERS:
                    for before, after in (((old / folder).as_uri(), (here / folder).as_uri()),
                                          (str(old / folder), str(here / folder))):
                        for table, column in _ARTIFACT_COLUMNS:
                            if table not in tables:
                                continue
                            changed += con.execute(
                                f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                                (after, len(before) + 1, before, len(before) + 1, before + "/")).rowcount
        return changed
    finally:
        con.close()


def _local_path(location: str | None) -> Path | None:
    """The absolute local path of a ``file:`` URI or a plain absolute path; None for anything else."""
    import urllib.parse

    if not location:
        return None
    parts = urllib.parse.urlsplit(location)
    if parts.scheme == "file":
        path = Path(urllib.parse.unquote(parts.path))
    elif parts.scheme == "" and location.startswith("/"):
        path = Path(location)
    else:
        return None
    return path if path.is_absolute() else None
