"""Where the runs go: the tracking URI a run uses, whether its server answers, and the UI's address of a runs table.

No MLflow import here: resolving a URI and asking a server for ``/health`` need neither.

The tracking URI's forms and what MLflow can open are ``medseg_diff.store_uris``'s (the config check uses the same
rules); they are re-exported here.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

from medseg_diff.store_uris import (
    BARE_SCHEMES, DEFAULT_URI, ENV, STORE_DB, TRACKING_SCHEMES, check_tracking_uri, file_store_allowed,
    folder_of, folder_problem, holds_file_store, resolve_uri, store_uri, uri_problem,
)

__all__ = ["BARE_SCHEMES", "DEFAULT_URI", "ENV", "STORE_DB", "TRACKING_SCHEMES", "check_server", "check_tracking_uri",
           "compare_runs_url", "file_store_allowed", "folder_of", "folder_problem", "holds_file_store",
           "resolve_uri", "runs_table_url", "store_uri", "uri_problem"]


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


def compare_runs_url(base_url: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The address of MLflow's *Compare* page for ``run_ids`` (the UI's own ``/compare-runs?runs=[…]&experiments=[…]``
    route, JSON lists): a reviewer opens the comparison directly instead of finding and ticking the runs."""
    runs = urllib.parse.quote(json.dumps(list(run_ids), separators=(",", ":")), safe="")
    experiments = urllib.parse.quote(json.dumps(sorted(set(map(str, experiment_ids))), separators=(",", ":")), safe="")
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"
