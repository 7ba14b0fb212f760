"""``evaluate --workers N``: the cases scored in N processes give the same per_case.csv, tables and failures, in the
same order, as one process; a bad case stops the run with the same error; N < 1 is refused."""

import csv
import io

import nibabel as nib
import numpy as np
import pytest

from factories import run_cli
from medseg_diff.data.conventions import get_convention
from medseg_diff.data.manifest import load_manifest
from medseg_diff.errors import ConfigError, DataError
from medseg_diff.stages.evaluate import evaluate
from medseg_diff.stages.options import Scoring, Tracking

OUTPUTS = ("per_case.csv", "summary.md", "comparison.json", "comparison.md")


@pytest.fixture(scope="module")
def folders(phantoms, tmp_path_factory) -> dict[str, object]:
    """Two prediction folders of every phantom: ``ours`` in this package's layout with probability and uncertainty
    maps (so that reliability bins travel back from the workers too), ``tool`` in nnU-Net's; each case's labels
    moved by a different amount, and the third case of ``tool`` holding a label value of no convention."""
    manifest = load_manifest(phantoms)
    conv = get_convention(manifest.convention)
    root = tmp_path_factory.mktemp("workers")
    rng = np.random.default_rng(0)
    cases = sorted(manifest.cases, key=lambda c: c.id)
    for i, case in enumerate(cases):
        img = nib.load(str(manifest.path_of(case.label)))
        truth = np.asarray(img.dataobj).astype(np.uint8)
        regions = conv.to_regions(np.roll(truth, i % 3, axis=1)).astype(np.float32)  # [3, X, Y, Z]
        probs = np.clip(0.15 + 0.7 * regions + rng.normal(0, 0.1, regions.shape), 0, 1).astype(np.float32)
        ours = root / "ours" / case.id
        ours.mkdir(parents=True)
        nib.save(nib.Nifti1Image(conv.from_regions(probs > 0.5).astype(np.uint8), img.affine),
                 str(ours / f"{case.id}_seg.nii.gz"))
        nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1), img.affine), str(ours / f"{case.id}_probabilities.nii.gz"))
        nib.save(nib.Nifti1Image(rng.uniform(0, 1, truth.shape).astype(np.float32), img.affine),
                 str(ours / f"{case.id}_uncertainty.nii.gz"))
        tool = np.roll(truth, 1 + i % 2, axis=0)
        if i == 2:
            tool[0, 0, 0] = 7
        (root / "tool").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(tool, img.affine), str(root / "tool" / f"{case.id}.nii.gz"))
    return {"root": root, "bad": cases[2].id}


def _evaluate_cli(capsys, phantoms, folders, out, workers: int) -> tuple[int, str, dict[str, bytes]]:
    root = folders["root"]
    rc, printed = run_cli(capsys, "evaluate", "--manifest", phantoms, "--predictions", f"ours={root / 'ours'}",
                          "--predictions", f"tool={root / 'tool'}", "--out", out, "--subset", "all", "--no-tracking",
                          "--continue-on-error", "--export-cases", "0", "--workers", workers)
    return rc, printed, {name: (out / name).read_bytes() for name in OUTPUTS}


def test_two_workers_write_the_same_tables_and_failures_as_one(capsys, phantoms, folders, tmp_path):
    rc1, printed1, serial = _evaluate_cli(capsys, phantoms, folders, tmp_path / "one", 1)
    rc2, printed2, parallel = _evaluate_cli(capsys, phantoms, folders, tmp_path / "two", 2)
    assert rc1 == rc2 == 1  # the bad case was skipped and named, by both
    failures = [ln for ln in printed1.splitlines() if ln.startswith("FAILED ")]
    assert failures == [ln for ln in printed2.splitlines() if ln.startswith("FAILED ")]
    assert len(failures) == 1 and f"tool/{folders['bad']}" in failures[0] and "label values [7]" in failures[0]
    for name in OUTPUTS:
        assert parallel[name] == serial[name], name
    rows = list(csv.DictReader(io.StringIO(serial["per_case.csv"].decode())))
    assert len(rows) == (6 + 5) * 3  # 6 cases of ours and 5 of tool, 3 regions each
    assert all(np.isfinite(float(r["ece"])) for r in rows if r["model"] == "ours")  # the maps were scored too


def test_a_bad_case_stops_the_workers_with_the_serial_runs_error(phantoms, folders, tmp_path):
    """Without --continue-on-error the first bad case in the serial order ends the run, whichever worker scored
    it: the same error (class, file, case, message) crosses the process boundary."""
    predictions = {"tool": folders["root"] / "tool"}
    errors = []
    for workers in (1, 2):
        with pytest.raises(DataError) as caught:
            evaluate(phantoms, tmp_path / f"w{workers}", predictions=predictions, tracking=Tracking(enabled=False),
                     scoring=Scoring(subset="all", workers=workers, n_boot=200))
        errors.append(caught.value)
    serial, parallel = errors
    assert type(parallel) is type(serial) and str(parallel) == str(serial)
    assert (parallel.path, parallel.case, parallel.problem) == (serial.path, serial.case, serial.problem)
    assert parallel.case == folders["bad"] and parallel.path.endswith(f"{folders['bad']}.nii.gz")
    assert not (tmp_path / "w2" / "per_case.csv").exists()


def test_fewer_than_one_worker_is_refused(capsys, phantoms, folders, tmp_path):
    with pytest.raises(SystemExit) as code:
        run_cli(capsys, "evaluate", "--manifest", phantoms, "--predictions", f"tool={folders['root'] / 'tool'}",
                "--out", tmp_path / "out", "--workers", "0")
    assert code.value.code == 2 and "argument --workers: must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--workers.*must be an integer >= 1, got 0"):
        evaluate(phantoms, tmp_path / "out", predictions={"tool": folders["root"] / "tool"},
                 tracking=Tracking(enabled=False), scoring=Scoring(workers=0))
    assert not (tmp_path / "out").exists()
