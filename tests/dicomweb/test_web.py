"""``medseg_diff.dicom.web`` against a real Orthanc (DICOMweb plugin) on loopback: a two-series MR study goes up
with STOW-RS and comes back with QIDO-RS + WADO-RS unchanged; a SEG made on it goes up and is found again; an
unknown study, a closed port, a wrong root, a busy server, wrong credentials, a refused or unconfirmed instance, a short
series and a non-DICOM file are errors that name the URL and the study or file, and leave no folder behind; basic
authentication works against an Orthanc that wants it, and credentials never appear in a message."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomweb_support import free_port, write_mr_series
from medseg_diff.dicom.web import MARKER, connect, fetch_study, find_results, store_instances
from medseg_diff.errors import DataError, ServiceError

GEOMETRY = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
            "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
            "BitsAllocated", "PixelRepresentation", "InstanceNumber", "Modality", "SeriesDescription", "PatientID")


@pytest.fixture(scope="module")
def stored(orthanc, mr_study):
    """The MR study, sent once: (client, study UID, {description: files}, returned SOP UIDs)."""
    study_uid, series = mr_study
    client = connect(orthanc.dicomweb)
    paths = [p for files in series.values() for p in files]
    return client, study_uid, series, store_instances(client, paths)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_stow_then_fetch_gives_back_the_same_instances(stored, tmp_path):
    client, study_uid, series, uids = stored
    sent = {p: pydicom.dcmread(p) for files in series.values() for p in files}
    assert uids == [ds.SOPInstanceUID for ds in sent.values()]  # in the order given

    dest = tmp_path / "study"
    assert fetch_study(client, study_uid, dest) == dest
    by_series = {ds.SeriesInstanceUID for ds in sent.values()}
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == sorted(by_series)
    for ds in sent.values():
        path = dest / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        back = pydicom.dcmread(path)
        for keyword in GEOMETRY:
            assert back.get(keyword) == ds.get(keyword), (keyword, path)
        assert back.PixelData == ds.PixelData
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert sum(1 for _ in dest.rglob("*.dcm")) == len(sent)

    record = json.loads((dest / MARKER).read_text())
    assert record["url"] == client.base_url and record["study_uid"] == study_uid
    assert {s["description"]: s["instances"] for s in record["series"].values()} == {"T1": 8, "FLAIR": 8}
    assert _leftovers(tmp_path) == []


def test_a_seg_is_stored_found_and_read_back_and_fetch_skips_it(stored, tmp_path):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    client, study_uid, series, _ = stored
    source = sorted((pydicom.dcmread(p) for p in series["T1"]), key=lambda d: float(d.ImagePositionPatient[2]))
    mask = np.zeros((len(source), 16, 16), dtype=bool)
    mask[2:6, 4:12, 5:11] = True
    seg = hd.seg.Segmentation(
        source_images=source, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="tumour",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="medseg-diff", version="test", family=codes.cid7162.ArtificialIntelligence))],
        series_instance_uid=hd.UID(), series_number=100, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medseg-diff", manufacturer_model_name="test", software_versions="0", device_serial_number="0",
        series_description="tumour SEG", omit_empty_frames=False)
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path)

    assert store_instances(client, [seg_path]) == [seg.SOPInstanceUID]
    found = find_results(client, study_uid, "SEG")
    assert [r.SeriesInstanceUID for r in found] == [seg.SeriesInstanceUID]
    assert found[0].Modality == "SEG" and int(found[0].NumberOfSeriesRelatedInstances) == 1
    assert {r.Modality for r in find_results(client, study_uid, None)} == {"MR", "SEG"}

    [back] = client.retrieve_series(study_uid, found[0].SeriesInstanceUID)
    assert back.SOPInstanceUID == seg.SOPInstanceUID and back.SOPClassUID == seg.SOPClassUID
    assert back.PixelData == seg.PixelData
    volume = hd.seg.Segmentation.from_dataset(back).get_volume(combine_segments=True)
    assert np.array_equal(volume.array > 0, mask)  # slice k of the volume on source slice k (z = 2k)

    # the fetched study holds the images only, and a fetch over an earlier one replaces it
    dest = tmp_path / "fetched"
    (dest / "stale-series").mkdir(parents=True)
    (dest / MARKER).write_text("{}")
    fetch_study(client, study_uid, dest)
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == sorted(
        pydicom.dcmread(files[0]).SeriesInstanceUID for files in series.values())
    assert not list(dest.rglob(f"{seg.SOPInstanceUID}.dcm"))
    assert _leftovers(tmp_path) == []


def test_an_unknown_study_is_named_and_nothing_is_written(orthanc, tmp_path):
    client = connect(orthanc.dicomweb)
    unknown = generate_uid()
    with pytest.raises(ServiceError, match="no such study") as err:
        fetch_study(client, unknown, tmp_path / "out")
    assert unknown in str(err.value) and orthanc.dicomweb in str(err.value)
    assert list(tmp_path.iterdir()) == []
    assert find_results(client, unknown) == []

    with pytest.raises(DataError, match="not a DICOM study UID"):
        fetch_study(client, "1.2.abc", tmp_path / "out")


def test_a_closed_port_or_a_wrong_root_is_a_service_error(orthanc, mr_study, tmp_path):
    study_uid, series = mr_study
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    client = connect(url)
    with pytest.raises(ServiceError, match="does not answer") as err:
        fetch_study(client, study_uid, tmp_path / "out")
    assert url in str(err.value) and study_uid in str(err.value)
    with pytest.raises(ServiceError, match="does not answer") as err:
        store_instances(connect(url, attempts=1), series["T1"][:1])
    assert url in str(err.value) and str(series["T1"][0]) in str(err.value)
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ServiceError, match="HTTP 404.*DICOMweb root"):
        fetch_study(connect(orthanc.root + "/not-dicomweb"), study_uid, tmp_path / "out")


def test_credentials_are_sent_but_never_shown(monkeypatch, tmp_path):
    url = "http://127.0.0.1:1/dicom-web"  # nothing is sent, but to port 1 (refused)
    client = connect("http://alice:s3cret@127.0.0.1:1/dicom-web/", attempts=1)
    assert client.base_url == url and client._session.auth == ("alice", "s3cret")
    with pytest.raises(ServiceError) as err:
        fetch_study(client, generate_uid(), tmp_path / "out")
    assert "s3cret" not in str(err.value) and "alice" not in str(err.value)

    monkeypatch.setenv("MEDSEG_DICOMWEB_TOKEN", "tok-123")
    assert connect(url)._session.headers["Authorization"] == "Bearer tok-123"
    with pytest.raises(DataError, match="either a bearer token"):
        connect(url, username="bob", password="pw")
    monkeypatch.delenv("MEDSEG_DICOMWEB_TOKEN")
    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", "bob")
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", "pw")
    assert connect(url)._session.auth == ("bob", "pw")
    assert connect(url, username="carol", password="x")._session.auth == ("carol", "x")
    with pytest.raises(DataError, match="not a DICOMweb URL") as err:
        connect("ftp://dave:hunter2@127.0.0.1/dicom-web")
    assert "hunter2" not in str(err.value)


class _Refusing(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self):  # noqa: N802
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, says", [(503, "HTTP 503"), (401, "refused the credentials.*MEDSEG_DICOMWEB_TOKEN")])
def test_a_busy_or_refusing_server_is_a_service_error(status, says, tmp_path):
    handler = type("Handler", (_Refusing,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/dicom-web"
        with pytest.raises(ServiceError, match=says) as err:
            fetch_study(connect(url, attempts=2), generate_uid(), tmp_path / "out")  # 503: retried once, 1 s
        assert url in str(err.value)
    finally:
        server.shutdown()
        server.server_close()
    assert list(tmp_path.iterdir()) == []


def test_a_refused_instance_is_named(orthanc, mr_study, tmp_path):
    """Orthanc refuses an instance POSTed under another study's URL (HTTP 409, Failure Reason 0x0110)."""
    study_uid, series = mr_study
    client = connect(orthanc.dicomweb)
    client.store_instances = functools.partial(client.store_instances, study_instance_uid=generate_uid())
    path = series["FLAIR"][0]
    with pytest.raises(ServiceError, match=r"refused .*0x0110") as err:
        store_instances(client, [path])
    assert str(path) in str(err.value) and orthanc.dicomweb in str(err.value)


def test_an_unparsed_stow_answer_is_checked_with_qido(orthanc, mr_study, tmp_path):
    study_uid, series = mr_study
    client = connect(orthanc.dicomweb)
    path = series["T1"][0]
    original = client.store_instances

    def stored_but_unparsed(datasets, **kwargs):
        original(datasets, **kwargs)
        return pydicom.Dataset()  # what dicomweb_client returns for an answer it did not parse

    client.store_instances = stored_but_unparsed
    assert store_instances(client, [path]) == [pydicom.dcmread(path).SOPInstanceUID]

    lost = write_mr_series(tmp_path / "lost", study_uid=study_uid, series_number=9,
                           description="lost", slices=1)
    client.store_instances = lambda datasets, **kwargs: pydicom.Dataset()  # claims success, stores nothing
    with pytest.raises(ServiceError, match="did not confirm storing") as err:
        store_instances(client, lost)
    assert str(lost[0]) in str(err.value)


def test_a_non_dicom_file_is_refused_before_anything_is_sent(orthanc, tmp_path):
    client = connect(orthanc.dicomweb)
    study_uid = generate_uid()
    good = write_mr_series(tmp_path / "good", study_uid=study_uid, series_number=1,
                           description="good", slices=1)
    bad = tmp_path / "notes.dcm"
    bad.write_text("not DICOM")
    with pytest.raises(DataError, match="not a DICOM file") as err:
        store_instances(client, [*good, bad])
    assert str(bad) in str(err.value)
    assert find_results(client, study_uid, None) == []  # the good file was not sent either


def test_a_destination_with_other_files_is_refused(stored, tmp_path):
    client, study_uid, _, _ = stored
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not a study fetched over DICOMweb"):
        fetch_study(client, study_uid, dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path) == []


def test_a_fetched_phantom_study_reads_as_a_case(orthanc, tmp_path):
    """``dicom.write_phantom_study`` up, ``fetch_study`` down, ``dicom.read_study`` finds its four modalities; an
    instance of a non-image SOP class (a parametric map) in a series labelled MR stays on the server."""
    from medseg_diff.data.dicom import read_study
    from medseg_diff.dicom import write_phantom_study

    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    images = {m: (rng.integers(0, 500, (16, 16, 6)).astype(np.int16), affine) for m in ("t1", "t1ce", "t2", "flair")}
    study_uid = generate_uid()
    source = read_study(write_phantom_study(images, tmp_path / "phantom", study_uid=study_uid, suffix=".dcm"))

    fake = pydicom.dcmread(source.series["t1"].files[0])  # an MR header with a parametric map's SOP class
    fake.SOPClassUID = fake.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.30"
    fake.SOPInstanceUID = fake.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    fake.SeriesInstanceUID, fake.SeriesNumber = generate_uid(), 99
    fake.save_as(tmp_path / "pmap.dcm", enforce_file_format=True)

    client = connect(orthanc.dicomweb)
    files = [p for s in source.series.values() for p in s.files]
    store_instances(client, [*files, tmp_path / "pmap.dcm"])
    fetched = read_study(fetch_study(client, study_uid, tmp_path / "fetched"))

    assert fetched.study_uid == study_uid and sorted(fetched.series) == sorted(source.series)
    for name, series in source.series.items():
        assert fetched.series[name].series_uid == series.series_uid
        assert len(fetched.series[name].files) == len(series.files) == 6
    assert not (tmp_path / "fetched" / fake.SeriesInstanceUID).exists()


def test_basic_authentication_against_a_server_that_wants_it(orthanc_with_users, mr_study, monkeypatch, tmp_path):
    study_uid, series = mr_study
    url = orthanc_with_users.dicomweb
    with pytest.raises(ServiceError, match="refused the credentials \\(HTTP 401\\)"):
        store_instances(connect(url), series["T1"][:2])
    with pytest.raises(ServiceError, match="refused the credentials \\(HTTP 401\\)") as err:
        fetch_study(connect(url, username="alice", password="wrong"), study_uid, tmp_path / "out")
    assert "wrong" not in str(err.value)

    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", "alice")
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", "wonder land")
    client = connect(url)
    assert store_instances(client, series["T1"][:2]) == [pydicom.dcmread(p).SOPInstanceUID for p in series["T1"][:2]]
    fetched = fetch_study(client, study_uid, tmp_path / "out")
    assert sum(1 for _ in fetched.rglob("*.dcm")) == 2


def test_a_short_series_or_a_study_without_images_is_refused(stored, tmp_path):
    client, study_uid, _, _ = stored
    original = client.iter_series

    def one_short(*args, **kwargs):  # a transfer that ends early
        return list(original(*args, **kwargs))[:-1]

    client.iter_series = one_short
    try:
        with pytest.raises(ServiceError, match=r"arrived incomplete \(7 of 8 instances\)") as err:
            fetch_study(client, study_uid, tmp_path / "out")
    finally:
        client.iter_series = original
    assert study_uid in str(err.value)
    assert list(tmp_path.iterdir()) == []

    report = write_mr_series(tmp_path / "sr", study_uid=generate_uid(), series_number=1,
                             description="report", slices=1)
    ds = pydicom.dcmread(report[0])
    ds.Modality = "SR"  # a study whose only series is a report
    ds.save_as(report[0], enforce_file_format=True)
    store_instances(client, report)
    with pytest.raises(DataError, match="no image series to segment"):
        fetch_study(client, ds.StudyInstanceUID, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sr"]
