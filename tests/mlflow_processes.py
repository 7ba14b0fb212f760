"""MLflow's own servers as subprocesses of a test: a free loopback port, waiting for an address to answer, and
stopping the whole process group (``mlflow server`` and ``mlflow models serve`` both run uvicorn as a child), and
a client of a store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until ``url`` answers 200; the test fails with the tail of ``log`` when ``proc`` ends or time runs out
    (the process group stopped first)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            pytest.fail(f"{url} did not answer (exit status {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_group(proc: subprocess.Popen) -> None:
    """Terminate the process group that ``proc`` leads (started with ``start_new_session=True``), then kill what is
    left of it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:  # children that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def mlflow_client(uri: str):
    """An ``MlflowClient`` of the store or server ``uri`` (no process-wide tracking URI set)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)
