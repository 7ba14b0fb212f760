"""Synthetic BraTS-like phantoms (the demo's data, no download): MNI152 anatomy deformed per case, a tumour grown in
it, T1/T1ce/T2/FLAIR contrasts with scanner artefacts, written in the BraTS 2021 or 2023 layout.

``synthesize(out, cases, spacing, seed, layout, workers, progress, timepoints) -> list[Path]`` is the API the
``medseg-diff synth`` command calls (``timepoints`` > 1: several scans per patient, BraTS 2023 layout).
Modules: anatomy (templates), fields (smooth random fields), geometry (grid, warp, mass effect), tumour (labels),
contrast (intensities, artefacts), case (one case in memory), writer (files), api (``synthesize``).
"""

from medseg_diff.data.synth.api import SPACING_RANGE, synthesize
from medseg_diff.data.synth.case import SynthCase, make_case
from medseg_diff.data.synth.writer import LAYOUTS, case_files, case_id

__all__ = ["LAYOUTS", "SPACING_RANGE", "SynthCase", "case_files", "case_id", "make_case", "synthesize"]
