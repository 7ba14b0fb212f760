"""The trained model in MLflow: logged as a pyfunc that runs the whole prediction, registered, and fetched back.

``log_model(tracker, checkpoint, registered_name)`` logs the checkpoint into the training run as an MLflow
*pyfunc* model (``stages.serve.CaseSegmenter``; models-from-code: the model holds a short script that imports that
class, so loading unpickles nothing), registers it, and points the alias ``@candidate`` at the new version. Its
signature::

    input  (one row per case, all strings): case_id, t1, t1ce, t2, flair, convention, out_dir
    params (optional, 0 = as trained):      sample_steps, ensemble
    output:                                 case_id, seg_path, seconds

``predict`` writes a prediction folder ``out_dir/CASE_ID/`` per row (``predictions``) and returns the paths of the
label maps.

What the model holds
--------------------
Its one artifact, ``checkpoint`` (``artifacts/inference.pt``), is the *inference checkpoint* of ``best.pt``
(``checkpoint.inference_checkpoint``): the inference weights (the EMA when training kept one), the network spec, the
run config, the training voxel size and data, run id and epoch; no optimizer, LR schedule, RNG state or second copy
of the weights. It predicts exactly as ``best.pt`` does; resuming a training needs ``best.pt``/``last.pt`` from the
run's output folder (or its ``checkpoints/`` artifacts, ``tracking.log_checkpoints``). Models logged before it
carry the whole ``best.pt``; ``checkpoint_of_model`` and ``load_model`` read both.

The alias ``candidate``
-----------------------
Every version that a finished training registers becomes ``models:/NAME@candidate`` (the alias moves: it names
the newest one). ``candidate`` says "trained, not yet reviewed", which is all that a training run knows of its
model: its validation Dice is on the few cases of one fold and may come from another data set or config than the
version before it, so a training run cannot tell whether it is better. ``champion`` (what deployments serve) is
set by a person after evaluating the candidate on held-out cases (``medseg-diff evaluate``)::

    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", VERSION)

Both resolve wherever a model URI is taken: ``predict --checkpoint models:/NAME@candidate``, ``checkpoint_of_model``,
``mlflow models serve -m models:/NAME@champion``.

Serving
-------
medseg-diff is not on PyPI, so the model's ``requirements.txt`` does not name it: it pins MLflow and the packages
medseg-diff depends on, at the versions that trained the model (local build tags such as ``+cpu`` dropped: the
version on PyPI of the same release), each of them on PyPI. The model's code is the installed package, not a copy
in the model: ``code_paths`` would put a second ``medseg_diff`` first on ``sys.path``, so which of the two runs
would depend on whether the process had imported medseg_diff before loading the model. So a model is served in
an environment where medseg-diff is installed, with MLflow's environment manager off::

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db mlflow models serve -m models:/NAME@candidate --env-manager local \
        --host 127.0.0.1 --port 5001

(``uvicorn`` of that environment on ``PATH``: run it with the environment activated). With a virtualenv, uv or conda
environment manager, MLflow would build an environment from ``requirements.txt`` that lacks medseg-diff, and
loading the model stops with an ``ImportError`` that says so.

Fetching the checkpoint
-----------------------
``checkpoint_of_model(uri, tracking_uri)`` fetches only what ``inference.loading.load_model`` needs: the
checkpoint inside ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``, ``models:/m-ID``
or ``runs:/RUN_ID/model``, cached by the model's immutable id under ``$MEDSEG_DIFF_CACHE/models`` (default
``~/.cache/medseg-diff/models``).

Artifact URIs, and moving a store
---------------------------------
* Served (``mlflow server --backend-store-uri sqlite:///mlflow.db --artifacts-destination mlartifacts``,
  clients at ``http://HOST:PORT``): experiments created through the server get ``mlflow-artifacts:/ID``
  locations, which the server maps onto its ``--artifacts-destination``. The database holds no absolute
  path: move the folder, start the server there, and every run, model and version resolves again.
* Embedded (``sqlite:///mlflow.db``, no server): MLflow's SQL store turns every local artifact location into an
  absolute ``file://`` URI when it is written (``resolve_uri_if_local``), and the runs, logged models and model
  versions copy it; ``mlflow-artifacts:`` cannot be used without a server. So after a move the database points
  at the old folder. ``medseg_diff.tracking.relocate_store(db)`` rewrites those URIs from the old
  ``.../mlartifacts`` to the one beside the database; ``MlflowTracker.start`` and ``checkpoint_of_model`` do it
  by themselves when they open a moved (or copied) default store. Before pointing ``mlflow ui`` at a moved
  store, run ``python -c "from medseg_diff.tracking import relocate_store; relocate_store('mlflow.db')"``.

The UI of MLflow 3 opens on its GenAI view; ``runs_table_url`` (from ``medseg_diff.tracking``) gives the address
of an experiment's runs table: ``BASE/#/experiments/ID/runs?workflowType=machine_learning``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from medseg_diff.errors import DataError, ServiceError
import medseg_diff.tracking.mlflow_store as mlflow_store
from medseg_diff.tracking.provenance import git_commit
from medseg_diff.tracking.uris import resolve_uri, runs_table_url

__all__ = ["CANDIDATE", "checkpoint_of_model", "log_model", "model_signature", "requirements", "runs_table_url"]

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name: runs:/RUN_ID/model
CHECKPOINT = "checkpoint"  # the pyfunc artifact that holds the checkpoint file
INFERENCE_FILE = "inference.pt"  # its name: the inference checkpoint of the run's best.pt
CANDIDATE = "candidate"  # the alias of the newest registered version (see "The alias candidate" above)
INPUT_COLUMNS = ("case_id", "t1", "t1ce", "t2", "flair", "convention", "out_dir")
OUTPUT_COLUMNS = ("case_id", "seg_path", "seconds")
PARAMS = ("sample_steps", "ensemble")

# models-from-code: the file MLflow stores with the model and runs to build it
_MODEL_CODE = '''"""medseg-diff pyfunc: the class lives in the installed package (medseg_diff.stages.serve)."""
from mlflow.models import set_model

try:
    from medseg_diff.stages.serve import CaseSegmenter
except ModuleNotFoundError as err:
    if err.name != "medseg_diff":
        raise
    raise ImportError("this MLflow model runs medseg-diff, which is not installed here and not on PyPI: install "
                      "it from its source (pip install PATH/TO/medseg-diff) and serve the model with "
                      "--env-manager local in that environment") from err

set_model(CaseSegmenter())
'''


def model_signature():
    """The pyfunc's signature: string columns in (paths), the label map's path and the seconds out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", c) for c in INPUT_COLUMNS]),
        outputs=Schema([ColSpec("string", "case_id"), ColSpec("string", "seg_path"), ColSpec("double", "seconds")]),
        params=ParamSchema([ParamSpec(p, "long", 0) for p in PARAMS]),
    )


def requirements() -> list[str]:
    """MLflow and what medseg-diff needs to serve (its dependencies and its ``tracking`` extra's), pinned to the
    installed versions without their local build tags (``torch==2.6.0``, not ``2.6.0+cpu``): releases PyPI has.
    Not medseg-diff itself, which PyPI has not (see "Serving" above). Pinned, not inferred: inference would import
    the model and resolve an environment (slow, online). Without medseg-diff's package metadata (a source tree on
    ``sys.path``), MLflow alone."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    try:
        declared = [Requirement(r) for r in requires("medseg-diff") or []]
    except PackageNotFoundError:
        declared = []
    needed = [r.name for r in declared if r.name != "medseg-diff" and (
        r.marker is None or any(r.marker.evaluate({"extra": extra}) for extra in ("", "tracking")))]
    reqs = []
    for name in dict.fromkeys(["mlflow", *needed]):
        try:
            reqs.append(f"{name}=={version(name).split('+', 1)[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_model(tracker, checkpoint: str | Path, registered_name: str | None = None, alias: str | None = CANDIDATE
              ) -> str:
    """Log the inference checkpoint of ``checkpoint`` into the tracker's run as a pyfunc model, register it under
    ``registered_name`` and point ``alias`` (default ``candidate``; None: none) at the new version.

    Returns ``models:/NAME/VERSION`` (registered) or ``runs:/RUN_ID/model``; ``""`` for a ``NullTracker``, and
    ``""`` with a warning (and the run tagged ``model_logging_error``) when the store refuses: the training is
    over by then and its checkpoint on disk, so this must not leave the run unfinished. A refused alias is a
    warning and the run's tag ``model_alias_error``; the version is registered all the same. Uses no active run:
    the logged model is created in the run's experiment by id, and the process's tracking URI is the run's only
    for the duration of the call (restored afterwards).
    """
    run_id = getattr(tracker, "run_id", None)
    client = getattr(tracker, "client", None)
    if run_id is None or client is None:
        return ""
    from mlflow.exceptions import MlflowException

    checkpoint = Path(checkpoint)
    kind, epoch = _checkpoint_summary(checkpoint)
    try:
        uri = _log_model(client, run_id, checkpoint, registered_name, kind, epoch)
    except (MlflowException, OSError) as err:
        problem = _one_line(err)
        log.warning("could not log the model %s into MLflow run %s (%s)", checkpoint, run_id, problem)
        _tag_quietly(client, run_id, "model_logging_error", problem)
        return ""
    if registered_name and alias:
        version = uri.rsplit("/", 1)[1]
        try:
            client.set_registered_model_alias(registered_name, alias, version)
            log.info("models:/%s@%s is version %s", registered_name, alias, version)
        except MlflowException as err:
            problem = _one_line(err)
            log.warning("registered %s but could not point the alias @%s at it (%s)", uri, alias, problem)
            _tag_quietly(client, run_id, "model_alias_error", problem)
    return uri


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _tag_quietly(client, run_id: str, key: str, value: str) -> None:
    """Tag the run, or nothing when the store refuses that too."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_tag(run_id, key, value[:5000])
    except (MlflowException, OSError):
        pass


def _checkpoint_summary(path: Path) -> tuple[str, int]:
    """The model kind and epoch of a checkpoint; a ``DataError`` when it is not a medseg-diff checkpoint."""
    from medseg_diff.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        return str(ckpt["config"]["model"]["kind"]), int(ckpt.get("epoch", 0))
    except (KeyError, TypeError):
        raise DataError(path, "not a medseg-diff checkpoint (no config inside)") from None


def _log_model(client, run_id: str, checkpoint: Path, registered_name: str | None, kind: str, epoch: int) -> str:
    import mlflow.pyfunc
    from mlflow.models import Model

    from medseg_diff.checkpoint import inference_checkpoint

    run = client.get_run(run_id)
    params = {k: v for k, v in run.data.params.items()}
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        params=params, model_type=kind,
                                        tags={"checkpoint": checkpoint.name, "epoch": str(epoch)})
    # parts of Model.log use the process's tracking URI: the run's, for this block only
    with (tempfile.TemporaryDirectory(prefix="medseg-pyfunc-") as tmp,
          mlflow_store.process_tracking_uri(client.tracking_uri), warnings.catch_warnings()):
        # no input example on purpose: its paths would mean nothing elsewhere, and MLflow would run a prediction
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        code = Path(tmp) / "medseg_model.py"
        code.write_text(_MODEL_CODE, encoding="utf-8")
        weights = inference_checkpoint(checkpoint, Path(tmp) / INFERENCE_FILE)
        info = Model.log(
            artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
            registered_model_name=registered_name or None, await_registration_for=60,
            python_model=str(code), artifacts={CHECKPOINT: str(weights)}, signature=model_signature(),
            pip_requirements=requirements(),
            metadata={"medseg_diff_kind": kind, "epoch": epoch, "checkpoint": checkpoint.name,
                      "medseg_diff_commit": git_commit()},
        )
    if registered_name:
        return f"models:/{registered_name}/{info.registered_model_version}"
    return f"runs:/{run_id}/{MODEL_NAME}"


# --- fetching a model back ---------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where fetched models are kept: ``$MEDSEG_DIFF_CACHE/models``, else ``$XDG_CACHE_HOME/medseg-diff/models``."""
    base = os.environ.get("MEDSEG_DIFF_CACHE")
    if base:
        return Path(base) / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "medseg-diff" / "models"


def checkpoint_of_model(uri: str, tracking_uri: str | None = None) -> Path:
    """The local checkpoint file of an MLflow model URI, downloaded once into the cache.

    ``uri``: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``, ``models:/m-ID`` (a logged
    model) or ``runs:/RUN_ID/model``. ``tracking_uri``: the store to ask (else ``$MLFLOW_TRACKING_URI``, else the
    default store). A missing model, version, alias or run, or a store that does not answer, is a ``DataError``
    naming ``uri``.
    """
    from mlflow.exceptions import MlflowException

    tracking_uri = resolve_uri(tracking_uri)
    _check_store(uri, tracking_uri)
    client = mlflow_store.client(tracking_uri)
    try:
        model_id, fallback = _resolve(client, uri)
        if model_id is not None:
            folder = _cached_download(client, model_id, tracking_uri)
        else:  # an MLflow-2 model kept in a run's artifacts: mutable, so not cached
            import mlflow.artifacts

            dest = Path(tempfile.mkdtemp(prefix="medseg-model-"))
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=fallback, dst_path=str(dest),
                                                              tracking_uri=tracking_uri, registry_uri=tracking_uri))
    except MlflowException as err:
        raise DataError(uri, _problem(err, tracking_uri)) from None
    except OSError as err:
        raise DataError(uri, f"could not fetch the model from {_safe(tracking_uri)} ({type(err).__name__}: {err})"
                        ) from None
    return _checkpoint_in(folder, uri)


def _check_store(uri: str, tracking_uri: str) -> None:
    """Fail fast, by name, on a store that is not there (MLflow would retry an absent server for minutes, and
    create an empty database for a mistyped sqlite path)."""
    scheme = urllib.parse.urlsplit(tracking_uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=5):
                pass
        except urllib.error.HTTPError:
            pass  # it answered (an auth proxy may refuse /health)
        except ValueError:
            pass  # a URI urllib cannot open (credentials in it): MLflow's own client will say
        except OSError as err:
            reason = getattr(err, "reason", err)
            raise ServiceError(f"{uri}: the tracking server {_safe(tracking_uri)} does not answer ({reason})") from None
    elif scheme == "sqlite":
        db = mlflow_store.sqlite_file(tracking_uri)
        if db is not None and not db.exists():
            raise DataError(uri, f"no tracking store at {db} (tracking URI {tracking_uri})")
        if db is not None:
            mlflow_store.relocate_store(db)


def _safe(tracking_uri: str) -> str:
    """The URI without a password."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return tracking_uri


def _problem(err, tracking_uri: str) -> str:
    text = str(getattr(err, "message", err)).strip().splitlines()
    first = text[0] if text else type(err).__name__
    if "download" in first.lower():
        return f"its files could not be fetched from {_safe(tracking_uri)} ({first.rstrip(':')})"
    if mlflow_store.is_missing(err) or "not found" in first.lower():
        return f"not found in {_safe(tracking_uri)} ({first})"
    return f"{_safe(tracking_uri)} refused it ({first})"


def _resolve(client, uri: str) -> tuple[str | None, str | None]:
    """``(logged model id, None)``, or ``(None, artifact URI)`` for a model that is no MLflow-3 logged model."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/"):].strip("/")
        if rest.startswith("m-") and "/" not in rest and "@" not in rest:
            return client.get_logged_model(rest).model_id, None
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = rest.rpartition("/")
            if not name:
                raise DataError(uri, "give a version (models:/NAME/VERSION), an alias (models:/NAME@ALIAS) or "
                                     "models:/NAME/latest")
            if number == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise DataError(uri, f"the registered model '{name}' has no version")
                version = max(versions, key=lambda v: int(v.version))
            elif number.isdigit():
                version = client.get_model_version(name, number)
            else:
                raise DataError(uri, f"'{number}' is no version number (stages are gone in MLflow 3: use an alias, "
                                     f"models:/{name}@ALIAS)")
        # MLflow 3 registers a logged model as source models:/m-ID (``model_id`` is not always filled in)
        source = str(version.source or "")
        model_id = getattr(version, "model_id", None) or (
            source[len("models:/"):] if source.startswith("models:/m-") and "/" not in source[len("models:/"):] else None)
        if model_id:
            return client.get_logged_model(model_id).model_id, None
        return None, source
    if uri.startswith("runs:/"):
        path = uri[len("runs:/"):].strip("/")
        run_id, _, name = path.partition("/")
        if not run_id or not name:
            raise DataError(uri, "expected runs:/RUN_ID/model")
        run = client.get_run(run_id)
        for model in client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                 filter_string=f"name = '{name}'"):
            if model.source_run_id == run_id:
                return model.model_id, None
        return None, uri
    raise DataError(uri, "not an MLflow model URI (models:/... or runs:/...)")


def _cached_download(client, model_id: str, tracking_uri: str) -> Path:
    """The model's artifacts under ``cache_root()/MODEL_ID`` (a logged model never changes once ready)."""
    import mlflow.artifacts

    target = cache_root() / model_id
    if (target / "MLmodel").exists():
        return target
    model = client.get_logged_model(model_id)
    status = str(getattr(model, "status", "READY"))
    if "READY" not in status.upper():
        raise DataError(f"models:/{model_id}", f"the model is not ready ({status}): its logging did not finish")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_id}-", dir=target.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(staging),
                                                         tracking_uri=tracking_uri))
        if staging.resolve() not in local.resolve().parents:  # a repository that hands back its own folder
            shutil.copytree(local, staging / "model")
            local = staging / "model"
        try:
            os.replace(local, target)
        except OSError:  # another process got there first
            if not (target / "MLmodel").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _checkpoint_in(folder: Path, uri: str) -> Path:
    """The checkpoint file named by the model's ``MLmodel`` (pyfunc artifact ``checkpoint``)."""
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.exists():
        raise DataError(uri, f"no MLflow model there (no MLmodel file in {folder})")
    conf = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
    artifacts = (conf.get("flavors", {}).get("python_function", {}).get("artifacts") or {})
    entry = artifacts.get(CHECKPOINT)
    if not entry or not entry.get("path"):
        raise DataError(uri, "not a medseg-diff model (its pyfunc has no 'checkpoint' artifact)")
    path = folder / entry["path"]
    if not path.exists():
        raise DataError(uri, f"the model's checkpoint {entry['path']} is missing from {folder}")
    return path
