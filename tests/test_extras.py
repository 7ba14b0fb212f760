"""The core without its extras (pyproject.toml): with MLflow, nilearn and the DICOM stack made unimportable, a user
still builds a manifest, trains, predicts and evaluates (``--no-tracking``); a command that needs a missing extra
says which package and which extra, with status 2 and no traceback.

The extras are hidden from a child interpreter by a meta-path finder that refuses them, as an environment where
they were never installed does (``ModuleNotFoundError`` with the module's name). pandas stays: panoptica, a core
dependency, needs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from factories import BRATS2021, tiny_config, write_case

HIDDEN = ("mlflow", "nilearn", "pydicom", "highdicom", "dicomweb_client", "requests")

CHILD = r"""
import contextlib, io, json, sys, importlib.abc

HIDDEN = set(sys.argv[1].split(","))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
from medseg_diff.cli import main

results = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append({"argv": argv, "rc": rc, "stderr": err.getvalue()})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
print("RESULT " + json.dumps({"results": results, "loaded": loaded}))
"""


def _run_without_extras(commands: list[list[str]], cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(HIDDEN), json.dumps(commands)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "MEDSEG_DIFF_THREADS": "1", "MLFLOW_TRACKING_URI": ""})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_core_trains_predicts_and_evaluates_without_the_extras(tmp_path):
    data = tmp_path / "data"
    for i in range(4):
        write_case(data, f"BraTS2021_{i:05d}", BRATS2021, seed=i)
    manifest = tmp_path / "manifest.json"
    cfg = tiny_config(manifest, tmp_path / "run", "unet", data={"max_val_cases": 1},
                      train={"epochs": 1, "steps_per_epoch": 1}).to_dict()
    cfg["tracking"] = {"enabled": False}
    config = tmp_path / "unet.yaml"
    config.write_text(yaml.safe_dump(cfg))
    pred = tmp_path / "pred"
    commands = [
        ["manifest", str(data), "--out", str(manifest), "--folds", "2"],
        ["train", "--config", str(config), "--skip-data-check"],
        ["predict", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--input", str(data), "--out", str(pred),
         "--device", "cpu"],
        ["evaluate", "--manifest", str(manifest), "--predictions", f"unet={pred}", "--out", str(tmp_path / "eval"),
         "--subset", "all", "--no-tracking", "--export-cases", "0"],
        # the commands that need an extra say which
        ["synth", "--out", str(tmp_path / "synth"), "--cases", "1"],
        ["evaluate", "--manifest", str(manifest), "--predictions", f"unet={pred}", "--out", str(tmp_path / "eval2"),
         "--subset", "all", "--export-cases", "0", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
    ]
    out = _run_without_extras(commands, tmp_path)
    results = out["results"]
    for step in results[:4]:
        assert step["rc"] == 0, (step["argv"][0], step["stderr"][-2000:])
    assert out["loaded"] == [], f"the core imported an optional package: {out['loaded']}"
    assert sorted(p.name for p in pred.iterdir() if p.is_dir()) == [f"BraTS2021_{i:05d}" for i in range(4)]
    per_case = (tmp_path / "eval" / "per_case.csv").read_text().splitlines()
    assert len(per_case) > 4 and "dice" in per_case[0]

    synth, tracked = results[4], results[5]
    assert synth["rc"] == 2 and "nilearn" in synth["stderr"] and "medseg-diff[synth]" in synth["stderr"], synth
    assert tracked["rc"] == 2 and "mlflow" in tracked["stderr"] and "medseg-diff[tracking]" in tracked["stderr"], \
        tracked
    for step in results:
        assert "Traceback" not in step["stderr"], step["stderr"]
