"""Every expected failure of the CLI is one line naming the culprit: status 2 for bad input, 1 for a runtime fault;
a traceback only with --debug."""

import errno

import pytest

import medseg_diff.stages.predict as predict_stage
from medseg_diff.cli import main
from medseg_diff.errors import DataError


def _predict(tmp_path, *extra):
    (tmp_path / "m.pt").touch()  # the CLI refuses a missing checkpoint before the stage runs; the stage is faked here
    return main(["predict", "--checkpoint", str(tmp_path / "m.pt"), "--input", str(tmp_path), "--out",
                 str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("fault, status, text", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/case/x.nii.gz"), 1,
     "/data/out/case/x.nii.gz: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"), 1, "/data/out: Permission denied"),
    (DataError("/data/in/c1_t1.nii.gz", "truncated", case="c1"), 2, "case c1: /data/in/c1_t1.nii.gz: truncated"),
    (RuntimeError("something unforeseen"), 1, "internal error: RuntimeError: something unforeseen"),
])
def test_one_line_and_an_exit_status_by_kind(tmp_path, monkeypatch, capsys, fault, status, text):
    def fail(*args, **kwargs):
        raise fault

    monkeypatch.setattr(predict_stage, "predict_cases", fail)
    assert _predict(tmp_path) == status
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("medseg-diff predict: ") and text in lines[0], err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x")

    monkeypatch.setattr(predict_stage, "predict_cases", fail)
    with pytest.raises(OSError, match="No space left"):
        _predict(tmp_path, "--debug")


def test_a_mistyped_path_is_refused_before_the_heavy_imports(tmp_path):
    """A missing checkpoint, input or manifest is one line (exit 2) before torch, MONAI or MLflow are imported."""
    code = ("import sys; from medseg_diff.cli import main; "
            "rc = main(['predict', '--checkpoint', sys.argv[1] + '/no.pt', '--input', sys.argv[1], '--out', "
            "sys.argv[1] + '/o']); "
            "print(rc, sorted(m for m in ('torch', 'monai', 'mlflow') if m in sys.modules))")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "2 []" and "no.pt: checkpoint not found" in out.stderr
