"""A real Orthanc (with its DICOMweb plugin) on loopback for the DICOMweb tests, and a tiny MR study to send it.

``orthanc`` starts ``/usr/sbin/Orthanc`` once per test session on a free port with a generated configuration in a
temporary folder (storage there too, no DICOM port, no authentication, loopback only) and stops it at the end.
The tests are skipped, saying why, where Orthanc or its DICOMweb plugin is not installed (Debian/Ubuntu:
``apt-get install orthanc orthanc-dicomweb``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomweb_support import free_port, write_mr_series

ORTHANC = Path(os.environ.get("MEDSEG_TEST_ORTHANC", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path(os.environ.get("MEDSEG_TEST_ORTHANC_DICOMWEB",
                                      "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Orthanc:
    root: str  # http://127.0.0.1:PORT (Orthanc's own REST API)
    dicomweb: str  # http://127.0.0.1:PORT/dicom-web (the DICOMweb root)
    log: Path


def orthanc_config(folder: Path, http_port: int) -> dict:
    return {
        "Name": "medseg-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpDescribeErrors": True,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }


def _get(url: str, timeout: float = 2.0, auth: tuple[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    with opener.open(request, timeout=timeout) as answer:
        return answer.read()


@contextlib.contextmanager
def running_orthanc(folder: Path, users: dict[str, str] | None = None):
    """An Orthanc on a free loopback port, configured in and storing to ``folder``; ``users`` (name: password)
    turns HTTP basic authentication on. Stopped (SIGTERM, then SIGKILL after 10 s) on leaving."""
    for path, what in ((ORTHANC, "Orthanc"), (DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin")):
        if not path.exists():
            pytest.skip(f"{what} is not installed at {path} (Debian/Ubuntu: apt-get install orthanc orthanc-dicomweb)")
    probe_auth = next(iter(users.items())) if users else None
    for attempt in range(3):  # the free port may be taken between choosing it and Orthanc binding it
        port = free_port()
        config = orthanc_config(folder, port)
        if users:
            config.update(AuthenticationEnabled=True, RegisteredUsers=users)
        config_file = folder / f"orthanc-{attempt}.json"
        config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
        log = folder / f"orthanc-{attempt}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(ORTHANC), str(config_file)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=folder)
        root = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if json.loads(_get(f"{root}/system", auth=probe_auth)).get("Name") == "medseg-test":
                    break
            except (OSError, ValueError):
                time.sleep(0.1)
        else:
            if proc.poll() is None:  # still running, never answered
                proc.kill()
                proc.wait()
                pytest.fail(f"Orthanc did not answer {root}/system within {START_TIMEOUT_S:.0f} s; its log:\n"
                            + log.read_text(errors="replace")[-4000:])
            text = log.read_text(errors="replace")
            if attempt < 2 and "port" in text.lower():
                continue  # lost the port race: try another
            pytest.fail(f"Orthanc exited with status {proc.returncode} before answering; its log:\n" + text[-4000:])
        break
    try:
        yield Orthanc(root=root, dicomweb=f"{root}/dicom-web", log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> Orthanc:
    """Orthanc without authentication, for the whole session."""
    saved = {key: os.environ.get(key) for key in ("NO_PROXY", "no_proxy")}
    loopback = ",".join(filter(None, [saved["NO_PROXY"] or saved["no_proxy"], "127.0.0.1", "localhost"]))
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = loopback  # requests must not send loopback to a proxy
    try:
        with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
            yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def orthanc_with_users(orthanc, tmp_path_factory) -> Orthanc:
    """A second Orthanc that wants HTTP basic authentication (user "alice", password "wonder land")."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc_users"), users={"alice": "wonder land"}) as server:
        yield server


@pytest.fixture(scope="session")
def mr_study(tmp_path_factory) -> tuple[str, dict[str, list[Path]]]:
    """A study of two MR series (T1, FLAIR) x 8 slices of 16 x 16: (StudyInstanceUID, {description: files})."""
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("mr_study")
    study_uid = generate_uid()
    series = {name: write_mr_series(root / name, study_uid=study_uid, series_number=n,
                                    description=name)
              for n, name in enumerate(("T1", "FLAIR"), start=1)}
    return study_uid, series
