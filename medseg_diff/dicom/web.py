"""A PACS over DICOMweb: fetch a study's images (QIDO-RS + WADO-RS), store our results back (STOW-RS), find them.

``connect(url)`` gives a ``dicomweb_client.DICOMwebClient`` for a DICOMweb root such as Orthanc's
``http://HOST:8042/dicom-web``, DCM4CHEE's ``http://HOST:8080/dcm4chee-arc/aets/DCM4CHEE/rs`` or the Google Cloud
Healthcare API's ``https://healthcare.googleapis.com/v1/projects/P/locations/L/datasets/D/dicomStores/S/dicomWeb``.
Credentials come from the arguments, from ``http://USER:PASSWORD@HOST/...``, or (to keep them off the command line
and out of shell histories) from the environment: ``MEDSEG_DICOMWEB_TOKEN`` (sent as ``Authorization: Bearer``)
or ``MEDSEG_DICOMWEB_USER`` + ``MEDSEG_DICOMWEB_PASSWORD`` (HTTP basic). They are never shown in a message.

``fetch_study(client, study_uid, dest)`` writes ``dest/SERIES_UID/SOP_INSTANCE_UID.dcm`` for every image series of
the study (SEG, SR, PR, parametric maps and other non-image objects are left on the server) in a staging folder
beside ``dest`` and renames it into place only once every series arrived complete, so a folder at ``dest`` is never
half-written. ``dest/.medseg-dicomweb.json`` records where it came from. ``store_instances(client, paths)`` sends
DICOM files (our SEG and parametric maps) with STOW-RS and checks the server's answer instance by instance;
``find_results(client, study_uid, "SEG")`` lists a study's series of one modality (QIDO-RS).

An unreachable server, a study it does not hold, or an instance it refuses is a ``ServiceError`` (exit status 1)
naming the URL and the study or file; an unusable argument or local file is a ``DataError`` (exit status 2).

Over 400 lines on purpose: one protocol client (connect, QIDO-RS, WADO-RS, STOW-RS), each call checked against the
server's own counts; its error handling is shared by every call.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg_diff.data.dicom.study import NON_IMAGE_MODALITIES, is_non_image_sop_class
from medseg_diff.errors import DataError, ServiceError

if TYPE_CHECKING:
    import pydicom
    from dicomweb_client.api import DICOMwebClient

__all__ = ["ENV_PASSWORD", "ENV_TOKEN", "ENV_USER", "MARKER", "connect", "fetch_study", "find_results",
           "store_instances"]

log = logging.getLogger(__name__)

ENV_USER = "MEDSEG_DICOMWEB_USER"
ENV_PASSWORD = "MEDSEG_DICOMWEB_PASSWORD"
ENV_TOKEN = "MEDSEG_DICOMWEB_TOKEN"
MARKER = ".medseg-dicomweb.json"  # written last into a fetched study folder: what it holds and where it came from

DEFAULT_TIMEOUT = (10.0, 300.0)  # seconds to connect, and to wait for the next bytes of an answer
STOW_BATCH_BYTES = 64 * 2**20  # one STOW-RS request carries at most this much (at least one file)

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# Failure Reason (0008,1197) codes a STOW-RS answer may carry (DICOM status codes).
_FAILURE_REASONS = {
    0x0110: "processing failure", 0x0122: "SOP class not supported", 0x0124: "not authorized",
    0xA700: "out of resources", 0xA900: "data set does not match its SOP class", 0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}


# ----------------------------------------------------------------------------------------------------- connect


def connect(url: str, *, username: str | None = None, password: str | None = None, token: str | None = None,
            timeout: float | tuple[float, float] = DEFAULT_TIMEOUT, attempts: int = 3) -> DICOMwebClient:
    """A client for the DICOMweb root ``url`` (the base under which ``/studies`` lies); nothing is sent yet.

    Credentials: ``token`` (bearer), or ``username`` + ``password`` (basic), or ``USER:PASSWORD@`` in the URL;
    an argument left ``None`` falls back to ``MEDSEG_DICOMWEB_TOKEN`` / ``MEDSEG_DICOMWEB_USER`` /
    ``MEDSEG_DICOMWEB_PASSWORD``. ``timeout``: seconds (connect, read) for every request. ``attempts``: tries
    per request when the connection fails or the server answers 408/429/503/504, 1 s then 2 s, 4 s, ... apart
    (dicomweb_client's own default, 5 tries over 30 s, kept a closed port waiting for half a minute). A
    CA bundle for an in-house HTTPS certificate is taken from ``REQUESTS_CA_BUNDLE`` (as everywhere in
    ``requests``).
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    parts = urllib.parse.urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DataError(_safe_url(str(url)), "not a DICOMweb URL: give http(s)://HOST[:PORT]/PATH of its root "
                        "(e.g. http://localhost:8042/dicom-web)")
    if parts.query or parts.fragment:
        raise DataError(_safe_url(str(url)), "a DICOMweb root URL has no ?query or #fragment")
    url_user = urllib.parse.unquote(parts.username) if parts.username else None
    url_password = urllib.parse.unquote(parts.password) if parts.password else None
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    try:
        port = parts.port
    except ValueError:
        raise DataError(_safe_url(str(url)), "the port is not a number") from None
    if port:
        netloc += f":{port}"
    base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))

    token = token if token is not None else (os.environ.get(ENV_TOKEN) or None)
    if username is None and password is None:
        username, password = url_user, url_password
    if username is None and password is None:
        username, password = os.environ.get(ENV_USER) or None, os.environ.get(ENV_PASSWORD)
    if password is not None and username is None:
        raise DataError(base, f"a DICOMweb password without a user name (set {ENV_USER})")
    if token and username is not None:
        raise DataError(base, f"give either a bearer token ({ENV_TOKEN}) or a user and password "
                        f"({ENV_USER}/{ENV_PASSWORD}), not both")

    session = requests.Session()
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token.strip()}"
    elif username is not None:
        session.auth = (username, password or "")
    try:
        client = DICOMwebClient(base, session=session, headers=headers or None, timeout=timeout)
    except ValueError as err:
        raise DataError(base, f"not a usable DICOMweb URL ({err})") from None
    client.set_http_retry_params(retry=attempts > 1, max_attempts=max(1, int(attempts)),
                                 wait_exponential_multiplier=500)
    return client


# ------------------------------------------------------------------------------------------------------- fetch


def fetch_study(client: DICOMwebClient, study_uid: str, dest: str | Path) -> Path:
    """Every image series of ``study_uid`` as ``dest/SERIES_UID/SOP_INSTANCE_UID.dcm``; returns ``dest``.

    The instances arrive as Explicit VR Little Endian (the server decompresses), are written into a staging
    folder beside ``dest``, counted against the server's own count, and the staging folder is then renamed to
    ``dest``. A ``dest`` that already exists is replaced only if it is empty or an earlier fetch (it holds
    ``.medseg-dicomweb.json``); anything else there is refused, never overwritten.
    """
    study_uid = _check_uid(study_uid, "study UID")
    dest = Path(dest)
    _check_dest(dest)
    where = f"{client.base_url}: study {study_uid}"

    series = _call(client, f"{where}: searching its series",
                   lambda: client.search_for_series(study_uid, fields=["SeriesDescription", "SeriesNumber",
                                                                        "NumberOfSeriesRelatedInstances"]))
    if not series:
        raise ServiceError(f"{where}: the server holds no such study (QIDO-RS found no series); check the "
                           "Study Instance UID and that the URL is the DICOMweb root the study was sent to")
    images = []
    for item in series:
        uid = _check_uid(_value(item, "0020000E"), "series UID", where)
        modality = str(_value(item, "00080060") or "").upper()
        if modality in NON_IMAGE_MODALITIES:
            log.info("dicomweb: skipping series %s (%s)", uid, modality)
            continue
        images.append((uid, modality, _value(item, "0008103E"), _count(_value(item, "00201209"))))
    if not images:
        raise DataError(None, f"{where}: no image series to segment (only "
                        f"{', '.join(sorted({str(_value(i, '00080060')) for i in series}))})")

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        record: dict[str, Any] = {"url": client.base_url, "study_uid": study_uid, "series": {}}
        for uid, modality, description, expected in images:
            written = _fetch_series(client, where, study_uid, uid, staging)
            if written is None:
                log.info("dicomweb: skipping series %s (no image instances)", uid)
                continue
            received, count = written
            if expected is not None and received < expected:
                raise ServiceError(f"{where}: series {uid} arrived incomplete ({received} of {expected} "
                                   "instances); try again")
            record["series"][uid] = {"modality": modality, "description": description, "instances": count}
            log.info("dicomweb: fetched series %s (%s %r, %d instances)", uid, modality, description or "", count)
        if not record["series"]:
            raise DataError(None, f"{where}: no image instances to segment (every series holds SEG, SR or "
                            "other non-image objects)")
        record["fetched"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _fetch_series(client, where: str, study_uid: str, series_uid: str, staging: Path) -> tuple[int, int] | None:
    """Write one series under ``staging/SERIES_UID``: (instances received, image instances written), or None."""
    import pydicom

    folder = staging / series_uid
    folder.mkdir()
    received, written = 0, set()

    def stream():
        nonlocal received
        for ds in client.iter_series(study_uid, series_uid):
            received += 1
            sop_class = str(ds.get("SOPClassUID", ""))
            if is_non_image_sop_class(sop_class):
                continue
            if str(ds.get("SeriesInstanceUID", "")) != series_uid or str(ds.get("StudyInstanceUID", "")) != study_uid:
                raise ServiceError(f"{where}: asked for series {series_uid}, the server sent an instance of "
                                   f"series {ds.get('SeriesInstanceUID')} of study {ds.get('StudyInstanceUID')}")
            sop = _check_uid(str(ds.get("SOPInstanceUID", "")), "SOP instance UID", where)
            pydicom.dcmwrite(folder / f"{sop}.dcm", ds, enforce_file_format=True)
            written.add(sop)

    _call(client, f"{where}: retrieving series {series_uid}", stream)
    if not written:
        folder.rmdir()
        return None
    return received, len(written)


def _count(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_dest(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise DataError(dest, "exists and is not a folder; give another destination")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MARKER).is_file():
        raise DataError(dest, "exists and holds files that are not a study fetched over DICOMweb "
                        f"(no {MARKER}); give an empty or new folder")


def _replace(staging: Path, dest: Path) -> None:
    """Rename ``staging`` to ``dest``; an earlier fetch there is moved aside first and removed after."""
    _check_dest(dest)  # again: something may have appeared there during the download
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / "study")
    try:
        os.replace(staging, dest)
    except BaseException:
        if old is not None:
            os.replace(old / "study", dest)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- store


def store_instances(client: DICOMwebClient, paths: Iterable[str | Path]) -> list[str]:
    """Send DICOM files with STOW-RS; returns their SOPInstanceUIDs (in the order given) once the server confirmed
    each one. Every file is read (and refused, by name, if it is no DICOM instance) before anything is sent."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    paths = [Path(p) for p in paths]
    uids: list[str] = []
    seen: dict[str, Path] = {}
    for path in paths:
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            raise DataError(path, "not a DICOM file (no 'DICM' file header)") from None
        except (OSError, ValueError, EOFError) as err:
            raise DataError(path, f"not a readable DICOM file ({type(err).__name__}: {err})") from None
        sop = str(head.get("SOPInstanceUID", ""))
        if not sop or not _UID.match(sop) or not _UID.match(str(head.get("StudyInstanceUID", ""))):
            raise DataError(path, "has no valid SOPInstanceUID / StudyInstanceUID; not a storable DICOM instance")
        if sop in seen:
            raise DataError(path, f"has the same SOPInstanceUID {sop} as {seen[sop]}")
        seen[sop] = path
        uids.append(sop)

    batches: list[list[int]] = [[]]
    size = 0
    for i, path in enumerate(paths):
        nbytes = path.stat().st_size
        if batches[-1] and size + nbytes > STOW_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(i)
        size += nbytes
    done = 0
    for batch in batches:
        if batch:
            _store_batch(client, [paths[j] for j in batch], [uids[j] for j in batch], done)
            done += len(batch)
    return uids


def _store_batch(client, paths: list[Path], uids: list[str], done: int = 0) -> None:
    """One STOW-RS request; ``done``: instances an earlier request of this call stored (said in an error)."""
    import pydicom
    import requests

    where = f"{client.base_url}: STOW-RS" + (f" (the first {done} instances were stored)" if done else "")
    datasets = [pydicom.dcmread(p) for p in paths]
    by_uid = dict(zip(uids, paths))
    answer = None
    try:
        answer = client.store_instances(datasets)
    except requests.HTTPError as err:
        answer = _dataset_of(err.response)
        if answer is None or ("FailedSOPSequence" not in answer and "ReferencedSOPSequence" not in answer):
            raise _service_error(client, f"{where} of {_names(paths)}", err) from None
    except Exception as err:  # noqa: BLE001 -- connection, timeout, malformed answer: all named below
        raise _service_error(client, f"{where} of {_names(paths)}", err) from None

    failed = answer.get("FailedSOPSequence") or []
    for item in failed:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        code = item.get("FailureReason")
        reason = _FAILURE_REASONS.get(int(code), "failure") if code is not None else "no reason given"
        code_text = f" (Failure Reason 0x{int(code):04X})" if code is not None else ""
        path = by_uid.get(uid)
        named = f"{path} (SOP instance {uid})" if path else f"SOP instance {uid}"
        raise ServiceError(f"{where}: the server refused {named}: {reason}{code_text}")

    stored = answer.get("ReferencedSOPSequence")
    if stored is None:  # an answer dicomweb_client did not parse (e.g. a media type with parameters): ask QIDO
        confirmed = _confirm_by_qido(client, datasets)
    else:
        confirmed = {str(item.get("ReferencedSOPInstanceUID", "")) for item in stored}
    missing = [uid for uid in uids if uid not in confirmed]
    if missing:
        raise ServiceError(f"{where}: the server did not confirm storing {_names([by_uid[u] for u in missing])} "
                           f"(SOP instance {missing[0]}{' and others' if len(missing) > 1 else ''})")
    log.info("dicomweb: stored %d instance(s) at %s", len(uids), client.base_url)


def _confirm_by_qido(client, datasets) -> set[str]:
    """The SOPInstanceUIDs of ``datasets`` that QIDO-RS finds on the server."""
    found: set[str] = set()
    for study, series in sorted({(str(d.StudyInstanceUID), str(d.SeriesInstanceUID)) for d in datasets}):
        items = _call(client, f"{client.base_url}: study {study}: confirming what STOW-RS stored",
                      lambda: client.search_for_instances(study, series, fields=["SOPInstanceUID"]))
        found |= {str(_value(item, "00080018")) for item in items}
    return found


def _dataset_of(response) -> pydicom.Dataset | None:
    """The DICOM JSON body of an answer (Orthanc 1.10 sends its 400/409 STOW answers without a Content-Type)."""
    import pydicom

    if response is None or not response.content:
        return None
    try:
        return pydicom.Dataset.from_json(json.loads(response.content))
    except Exception:  # noqa: BLE001 -- XML, HTML or plain text: not a dataset
        return None


def _names(paths: list[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


# ------------------------------------------------------------------------------------------------------- find


def find_results(client: DICOMwebClient, study_uid: str, modality: str | None = "SEG") -> list[pydicom.Dataset]:
    """The series of ``study_uid`` with this ``modality`` (all series for ``None``), as QIDO-RS answers them:
    datasets with ``SeriesInstanceUID``, ``Modality``, ``SeriesDescription``, ``SeriesNumber`` and
    ``NumberOfSeriesRelatedInstances``, ordered by series number. An unknown study has no results (``[]``)."""
    import pydicom

    study_uid = _check_uid(study_uid, "study UID")
    filters = {"Modality": modality} if modality else None
    items = _call(client, f"{client.base_url}: study {study_uid}: searching its {modality or 'all'} series",
                  lambda: client.search_for_series(study_uid, search_filters=filters, fields=[
                      "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances"]))
    results = [pydicom.Dataset.from_json(item) for item in items]
    if modality:  # a server that ignores the filter
        results = [r for r in results if str(r.get("Modality", "")).upper() == modality.upper()]
    return sorted(results, key=lambda r: (int(r.get("SeriesNumber") or 0), str(r.get("SeriesInstanceUID", ""))))


# ---------------------------------------------------------------------------------------------------- helpers


def _check_uid(uid: Any, what: str, where: str | None = None) -> str:
    text = "" if uid is None else str(uid).strip()
    if not text or len(text) > 64 or not _UID.match(text):
        if where:  # it came from the server
            raise ServiceError(f"{where}: the server answered with an invalid {what} {text!r}")
        raise DataError(None, f"{text!r} is not a DICOM {what} (digits and dots, at most 64 characters)")
    return text


def _value(item: dict, tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON object (None when absent or empty)."""
    values = (item.get(tag) or item.get(tag.lower()) or {}).get("Value") or [None]
    return values[0]


def _call(client, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (ServiceError, DataError):
        raise
    except Exception as err:  # noqa: BLE001 -- translated into a ServiceError that names the URL
        raise _service_error(client, what, err) from None


def _service_error(client, what: str, err: BaseException) -> ServiceError:
    """A ServiceError for a failed request: the server does not answer, refuses us, or answers nonsense."""
    import requests

    response = getattr(err, "response", None)
    last = getattr(err, "last_attempt", None)  # retrying.RetryError: the server kept answering 429/503/...
    if response is None and last is not None:
        value = getattr(last, "value", None)
        response = value[1] if isinstance(value, tuple) and len(value) > 1 else value
        response = response if isinstance(response, requests.Response) else None
    if isinstance(err, requests.exceptions.SSLError):
        return ServiceError(f"{what}: the TLS handshake with the server failed ({_reason(err)}); for an in-house "
                            "certificate set REQUESTS_CA_BUNDLE to its CA bundle")
    if isinstance(err, requests.exceptions.Timeout):
        return ServiceError(f"{what}: the server did not answer in time ({_reason(err)})")
    if isinstance(err, requests.exceptions.ConnectionError):
        return ServiceError(f"{what}: the DICOMweb server does not answer ({_reason(err)}); is it running, and "
                            "is the URL right?")
    if isinstance(response, requests.Response):
        status = response.status_code
        if status in (401, 403):
            return ServiceError(f"{what}: the server refused the credentials (HTTP {status}); set {ENV_TOKEN}, "
                                f"or {ENV_USER} and {ENV_PASSWORD}")
        if status == 404:
            return ServiceError(f"{what}: not found (HTTP 404); is {client.base_url} the DICOMweb root "
                                "(the URL under which /studies lies)?")
        body = " ".join(response.text.split())[:200] if response.content else ""
        later = "; try again later" if status in (408, 429, 503, 504) else ""
        return ServiceError(f"{what}: the server answered HTTP {status} {response.reason or ''}".rstrip()
                            + (f": {body}" if body else "") + later)
    return ServiceError(f"{what}: unexpected answer from the server ({type(err).__name__}: {err})")


def _reason(err: BaseException) -> str:
    """The innermost cause of a requests error, without the URL (which the message already names)."""
    inner: BaseException = err
    for _ in range(10):  # requests.ConnectionError -> urllib3 MaxRetryError -> NewConnectionError / OSError
        nxt = getattr(inner, "reason", None)
        if not isinstance(nxt, BaseException):
            args = getattr(inner, "args", ())
            nxt = args[0] if args and isinstance(args[0], BaseException) else None
        if nxt is None or nxt is inner:
            break
        inner = nxt
    text = str(inner)
    text = re.sub(r"^<[^>]+>: ", "", text)  # urllib3's "<urllib3.connection.HTTPConnection object at 0x...>: "
    return text or type(inner).__name__


def _safe_url(url: str) -> str:
    """``url`` without a password."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password:
            netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return url
