"""Prediction of a study held in a PACS: fetched over DICOMweb, segmented, and the results stored back.

``predict_dicomweb(checkpoint, url, study_uid, out_dir)``:

1. WADO-RS: the study's image series are fetched into ``out_dir/.dicomweb/STUDY_UID/`` (``dicom.web.fetch_study``:
   staged, counted against the server's own counts; kept, because ``prediction.json`` and ``export`` read the
   images back from there);
2. the study is predicted like a local DICOM study folder (``stages.predict.predict_cases``): ``out_dir/CASE/``
   holds the NIfTI prediction and ``CASE/dicom/`` the DICOM Segmentation and Parametric Maps, which reference the
   fetched series' instances and share their Frame of Reference;
3. STOW-RS: those DICOM objects are stored back into the same study on the same server (unless ``store=False``);
   the server's answer is checked instance by instance (``dicom.web.store_instances``).

The objects' UIDs derive from the study, the prediction (model, run, time) and the voxels: storing the same
prediction folder twice stores the same instances; a new run is a new prediction with new UIDs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from medseg_diff.dicom.web import connect, fetch_study, find_results, store_instances
from medseg_diff.errors import DataError
from medseg_diff.predictions import layout
from medseg_diff.stages.options import Cases, Sampling, Writing
from medseg_diff.stages.predict import predict_cases
from medseg_diff.stages.report import RunReport

log = logging.getLogger(__name__)

#: hidden folder of ``out_dir`` that holds the fetched studies
FETCHED = ".dicomweb"


@dataclass
class DicomwebReport:
    predictions: RunReport
    study_folder: Path
    url: str  # the DICOMweb root without credentials (``client.base_url``)
    stored: dict[str, list[str]] = field(default_factory=dict)  # case -> SOP Instance UIDs stored back

    def summary(self) -> str:
        lines = [self.predictions.summary()]
        for case, uids in self.stored.items():
            lines.append(f"  stored {len(uids)} DICOM object(s) of {case} (SEG, parametric maps) to {self.url}")
        return "\n".join(lines)


def predict_dicomweb(checkpoint: str | Path, url: str, study_uid: str, out_dir: str | Path,
                     sampling: Sampling = Sampling(), cases: Cases = Cases(), writing: Writing = Writing(),
                     store: bool = True, tracking_uri: str | None = None) -> DicomwebReport:
    """Fetch ``study_uid`` from the DICOMweb root ``url``, predict it into ``out_dir``, store the results back.
    The options are ``predict_cases``'; the series numbers the server holds are added to ``writing``'s."""
    client = connect(url)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "the output folder is a file")
    study_folder = fetch_study(client, study_uid, out_dir / FETCHED / str(study_uid).strip())
    # series the fetch left on the server (earlier SEGs and maps): the new ones are numbered above them
    taken = [int(d.SeriesNumber) for d in find_results(client, study_uid, None) if d.get("SeriesNumber") is not None]
    writing = replace(writing, taken_series_numbers=[*writing.taken_series_numbers, *taken])
    predictions = predict_cases(checkpoint, study_folder, out_dir, sampling, cases, writing,
                                tracking_uri=tracking_uri)
    report = DicomwebReport(predictions, study_folder, client.base_url)
    if store:
        for folder in predictions.written:
            paths = sorted((folder / layout.DICOM_FOLDER).glob("*.dcm"))
            report.stored[folder.name] = store_instances(client, paths)
            log.info("dicomweb: stored %d object(s) of %s to %s", len(paths), folder.name, client.base_url)
    return report
