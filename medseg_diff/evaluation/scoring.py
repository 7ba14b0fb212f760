"""Scoring one prediction (``score_case``: global, lesion-wise and uncertainty metrics of a case), and many of them
in worker processes (``scored_cases``) for ``evaluation.run.score_folders``.

A case's scores are a pure function of its files, so the cases may be scored in any process and order; the
results are handed back in the order asked for, and with them, as values, the errors of bad files, so that N
workers and one give the same tables and the same failures.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg_diff.data.conventions import REGIONS, LabelConvention, get_convention
from medseg_diff.errors import MedsegError
from medseg_diff.evaluation.lesionwise import lesion_row, lesionwise_metrics
from medseg_diff.evaluation.metrics import (
    CaseResult, ReliabilityBins, UndefinedMetricWarning, case_metrics, evaluation_mask, reliability_bins,
    uncertainty_auroc,
)
from medseg_diff.evaluation.sources import ScoredInputs, read_case


@dataclass(frozen=True)
class ScoreJob:
    """One prediction to score: model ``name``'s label map of ``case_id`` in ``folder``, against ``label``."""

    name: str
    folder: Path
    case_id: str
    label: Path


class CaseFailure:
    """A case's ``MedsegError``, as a worker process hands it back. ``DataError`` and ``ConfigError`` take several
    constructor arguments, which the default pickling of an exception (its message only) cannot rebuild; this one
    carries the class, the message and the attributes (path, problem, case), and rebuilds the same error."""

    def __init__(self, error: MedsegError):
        self.error = error

    def __reduce__(self):
        return _rebuilt_failure, (type(self.error), str(self.error), dict(vars(self.error)))


def _rebuilt_failure(cls: type, message: str, attributes: dict) -> CaseFailure:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(attributes)
    return CaseFailure(error)


#: What ``score_case`` returns: the result, extra columns per region, the reliability bins (None without maps).
Scored = tuple[CaseResult, dict[str, dict[str, float]], ReliabilityBins | None]


def score_job(job: ScoreJob, convention: str, lesion_task: str = "GLI") -> Scored | CaseFailure:
    """Read and score one prediction (``score_case``); a bad file is returned as a ``CaseFailure``, not raised."""
    conv = get_convention(convention)
    try:
        return score_case(job.name, read_case(job.folder, job.case_id, job.label, conv), conv, lesion_task)
    except MedsegError as err:
        return CaseFailure(err)


def scored_cases(jobs: Sequence[ScoreJob], convention: str, lesion_task: str = "GLI", workers: int = 1
                 ) -> Iterator[Scored | CaseFailure]:
    """``score_job`` of each job, yielded in the order of ``jobs``; with ``workers`` > 1 computed ahead in that many
    processes (at most one per job).

    The processes are *spawned* (fresh interpreters), not forked: by the time evaluate scores, this process may hold
    a CUDA context (models predicted on the GPU), OpenMP and MLflow threads, none of which survives a fork safely;
    a spawned worker pays one import of the scoring modules instead (seconds, once). Each uses one torch thread
    (``_one_thread``), so N workers use about N cores. Stopping early (the caller raises on a failed case) cancels the
    jobs not yet started."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield score_job(job, convention, lesion_task)
        return
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_one_thread)
    try:
        futures = [pool.submit(score_job, job, convention, lesion_task) for job in jobs]
        for job, future in zip(jobs, futures):
            try:
                outcome = future.result()
            except BrokenProcessPool:
                raise RuntimeError(
                    f"a scoring worker process died while scoring {job.name}/{job.case_id} or a case beside it: out of "
                    "memory (each worker holds one case's volumes; use fewer --workers), or evaluate was called with "
                    "workers > 1 from a script without an `if __name__ == \"__main__\":` guard") from None
            yield outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _one_thread() -> None:
    """A scoring worker's start: one intra-op thread for torch (MONAI's Hausdorff distance runs in torch), so that
    the workers do not oversubscribe the cores between them."""
    import torch

    torch.set_num_threads(1)


def score_case(name: str, inputs: ScoredInputs, conv: LabelConvention, lesion_task: str = "GLI") -> Scored:
    """Global and lesion-wise metrics of one case, and its uncertainty quality when it has probability maps.
    Returns the result, extra columns per region, and the case's reliability bins (None without maps)."""
    truth, mask = conv.to_regions(inputs.truth), conv.to_regions(inputs.labels)
    result = CaseResult(case=inputs.case_id, model=name, regions=case_metrics(mask, truth, inputs.spacing),
                        seconds=inputs.seconds, peak_memory_mb=inputs.peak_memory_mb)
    lesions = lesionwise_metrics(mask, truth, inputs.spacing, task=lesion_task)
    per_region = {r: dict(lesion_row(lesions[r])) for r in REGIONS}
    case_bins = None
    if inputs.probs is not None and inputs.uncertainty is not None:
        quality, case_bins = uncertainty_quality(inputs.probs, inputs.uncertainty, mask, truth)
        for r in REGIONS:
            per_region[r].update(quality)
    return result, per_region, case_bins


def uncertainty_quality(probs: np.ndarray, uncertainty: np.ndarray, mask: np.ndarray, truth: np.ndarray
                        ) -> tuple[dict[str, float], ReliabilityBins]:
    """AUROC of the voxel uncertainty for wrong voxels, and reliability of the region probabilities, both within
    the tumour neighbourhood (pred ∪ truth of WT, dilated 3 voxels). ``mask``/``truth``: boolean [3, X, Y, Z]."""
    neighbourhood = evaluation_mask(mask[1], truth[1])
    wrong = np.any(mask != truth, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        auroc = uncertainty_auroc(uncertainty, wrong, neighbourhood)
    case_bins = reliability_bins(probs, truth, mask=np.broadcast_to(neighbourhood, truth.shape))
    return {"uncertainty_auroc": auroc, "ece": case_bins.ece}, case_bins
