"""Where the runs go: the tracking URI a run uses, whether its server answers, and the UI's address of a runs table.

No MLflow import here: resolving a URI and asking a server for ``/health`` need neither.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(uri: str | None) -> str:
    """Config URI, else ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def check_server(uri: str) -> None:
    """An http(s) tracking server must answer within 5 s (MLflow itself would retry for minutes)."""
    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            pass
    except urllib.error.HTTPError:
        pass  # it answered (a proxy may refuse /health)
    except ValueError:
        pass  # a URI urllib cannot open (credentials in it): MLflow's own client will say
    except OSError as err:
        from medseg_diff.errors import ServiceError

        parts = urllib.parse.urlsplit(uri)  # shown without any credentials
        host = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        raise ServiceError(f"tracking.uri: the MLflow server {host} does not answer ({getattr(err, 'reason', err)}); "
                           "start it, or use tracking.uri=sqlite:///mlflow.db, or tracking.enabled=false") from None


def runs_table_url(base_url: str, experiment_id: str) -> str:
    """The address that opens an experiment's runs table in the MLflow 3 UI, not its GenAI overview.

    The UI (MLflow 3.x, a hash router) has the route ``/experiments/:experimentId/runs`` for the runs tab; its
    sidebar follows a per-browser "workflow type" that defaults to GenAI, which ``workflowType=machine_learning``
    switches to the machine-learning one (Runs, Models, ...).
    """
    experiment = urllib.parse.quote(str(experiment_id), safe="")
    return f"{base_url.rstrip('/')}/#/experiments/{experiment}/runs?workflowType=machine_learning"
