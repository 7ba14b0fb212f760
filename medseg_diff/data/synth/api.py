"""``synthesize``: write a seeded set of BraTS-like phantom cases to disk (the ``medseg-diff synth`` API)."""

from __future__ import annotations

import logging
import multiprocessing
import numbers
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from medseg_diff.data.synth.anatomy import Anatomy, load_anatomy, template_resolution
from medseg_diff.data.synth.case import make_case
from medseg_diff.data.synth.writer import case_id, layout_convention, write_case

#: accepted output spacing (mm)
SPACING_RANGE: tuple[float, float] = (0.5, 5.0)
#: most scans per patient (BraTS 2023 ids carry a three-digit timepoint)
MAX_TIMEPOINTS = 1000

_WORKER_ANATOMY: Anatomy | None = None


def synthesize(
    out: Path, cases: int, spacing: float = 2.0, seed: int = 0, layout: str = "brats2021",
    workers: int = 1, progress: bool = False, timepoints: int = 1,
) -> list[Path]:
    """Write ``cases`` phantom patients under ``out``, ``timepoints`` scans each, and return the case folders in
    order (patient by patient, each patient's scans in time order).

    Scan ``t`` of patient ``i`` depends only on (``seed``, ``i``, ``t``, ``spacing``, ``layout``): its files are
    byte-identical across runs, across ``workers`` (processes; each scan is drawn and written by one worker) and
    across ``timepoints`` (scan 0 is the same with 1 or 3 timepoints). ``layout`` is ``"brats2021"``
    (``CASE_{t1,t1ce,t2,flair,seg}``, labels 0/1/2/4) or ``"brats2023"`` (``CASE-{t1n,t1c,t2w,t2f,seg}``, labels
    0/1/2/3). ``timepoints`` > 1 needs ``"brats2023"``, whose case ids carry the timepoint (``BraTS-SYN-00000-000``,
    ``-001``): a follow-up is the same patient's head and tumour, repositioned, the tumour changed a little
    (``case.make_case``). Raises ValueError on invalid arguments.
    """
    # 1. validate before touching the disk
    _validate(cases, spacing, seed, workers)
    layout_convention(layout)
    _validate_timepoints(timepoints, layout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, int(seed), i, float(spacing), layout, t) for i in range(int(cases)) for t in range(int(timepoints))]
    total = len(jobs)
    # 2. the template anatomy, loaded once and shared with the workers
    anatomy = load_anatomy(template_resolution(spacing))
    # 3. draw and write each scan
    done: list[Path] = []
    if workers == 1 or total == 1:
        for job in jobs:
            done.append(_write_one(*job, anatomy=anatomy))
            _report(progress, len(done), total)
        return done
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, total), mp_context=context, initializer=_init_worker, initargs=(anatomy,)) as pool:
        for path in pool.map(_write_job, jobs):
            done.append(path)
            _report(progress, len(done), total)
    return done


def _validate(cases: int, spacing: float, seed: int, workers: int) -> None:
    """ValueError with a clear message for any out-of-range argument."""
    if not _is_int(cases) or cases < 1:
        raise ValueError(f"cases must be an integer ≥ 1, got {cases!r}")
    lo, hi = SPACING_RANGE
    if not isinstance(spacing, numbers.Real) or isinstance(spacing, bool) or not lo <= float(spacing) <= hi:
        raise ValueError(f"spacing must be a number of mm in [{lo}, {hi}], got {spacing!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer ≥ 0, got {seed!r}")
    if not _is_int(workers) or workers < 1:
        raise ValueError(f"workers must be an integer ≥ 1, got {workers!r}")


def _validate_timepoints(timepoints: int, layout: str) -> None:
    """ValueError unless ``timepoints`` is an integer in 1..``MAX_TIMEPOINTS`` and the layout can name them."""
    if not _is_int(timepoints) or not 1 <= timepoints <= MAX_TIMEPOINTS:
        raise ValueError(f"timepoints must be an integer in [1, {MAX_TIMEPOINTS}], got {timepoints!r}")
    if timepoints > 1 and layout != "brats2023":
        raise ValueError(f"timepoints > 1 need layout 'brats2023' (its case ids carry the timepoint: "
                         f"BraTS-SYN-00000-000, -001); layout {layout!r} has one scan per patient")


def _is_int(value) -> bool:
    """True for integers (Python or numpy), False for bool and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _write_one(out: Path, seed: int, index: int, spacing: float, layout: str, timepoint: int,
               anatomy: Anatomy | None) -> Path:
    """Draw scan ``timepoint`` of patient ``index`` and write it under ``out``; returns its folder."""
    case = make_case(seed, index, spacing, anatomy, timepoint=timepoint)
    case_dir = out / case_id(layout, index, timepoint)
    write_case(case_dir, layout_convention(layout), case.volumes, case.grid.affine)
    return case_dir


def _init_worker(anatomy: Anatomy) -> None:
    """Worker start-up: keep the parent's anatomy (no nilearn import or template load per worker)."""
    global _WORKER_ANATOMY
    _WORKER_ANATOMY = anatomy


def _write_job(job: tuple) -> Path:
    """``_write_one`` for a pool worker, with the anatomy its initializer received."""
    return _write_one(*job, anatomy=_WORKER_ANATOMY)


def _report(progress: bool, done: int, total: int) -> None:
    """One progress line on stderr when ``progress`` is on."""
    if progress:
        logging.getLogger(__name__).info("synth: %d/%d cases", done, total)
