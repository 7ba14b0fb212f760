"""Compare two `make demo` outputs (e.g. before and after a refactor that must not change behaviour).

    .venv/bin/python tools/compare_demo_outputs.py OLD/demo_out NEW/demo_out

Prints, for each kind of output: per_case.csv (every column but the timings), the prediction folders' NIfTI volumes and
colour tables, the exported overlays, the DICOM study, the DICOM SEG / Parametric Map pixel data, and report.html with
time stamps, version strings, MLflow run ids, embedded images and the clones' paths removed. A montage PNG differs
between two runs only where it prints the MLflow run id (its title line).
"""
import csv, hashlib, re, sys
from pathlib import Path
import pydicom
a, b = Path(sys.argv[1]), Path(sys.argv[2])
def rows(p):
    with open(p) as f:
        return list(csv.DictReader(f))
ra, rb = rows(a / "evaluation/per_case.csv"), rows(b / "evaluation/per_case.csv")
timing = {"seconds", "peak_memory_mb"}
cols = [c for c in ra[0] if c not in timing]
diff = [(i, c) for i, (x, y) in enumerate(zip(ra, rb)) for c in cols if x[c] != y[c]]
print("per_case.csv:", len(ra), "rows,", len(cols), "compared columns; differing cells:", len(diff), diff[:5], "| same columns:", list(ra[0]) == list(rb[0]))
def files(root, pattern):
    return sorted(p.relative_to(root) for p in root.glob(pattern))
for pattern in ["dicom/study/**/*.dcm", "evaluation/predictions/*/*/*.nii.gz", "evaluation/predictions/*/*/*.ctbl", "evaluation/predictions/*/*/*.txt",
                "evaluation/overlays/*/*/*.nii.gz", "evaluation/overlays/*/*/*.png", "dicom/predictions/*/*.nii.gz"]:
    fa, fb = files(a, pattern), files(b, pattern)
    same = [f for f in fa if f in fb and (a / f).read_bytes() == (b / f).read_bytes()]
    print(f"{pattern}: {len(fa)} vs {len(fb)} files, byte-identical {len(same)}", "" if len(same) == len(fa) == len(fb) else [str(f) for f in fa if f not in same][:5])
fa, fb = files(a, "dicom/predictions/*/dicom/*.dcm"), files(b, "dicom/predictions/*/dicom/*.dcm")
px = lambda d: d.get("PixelData") or d.get("FloatPixelData") or d.get("DoubleFloatPixelData")
same = sum(px(pydicom.dcmread(a / f)) == px(pydicom.dcmread(b / f)) for f in fa if f in fb)
print(f"DICOM objects: {len(fa)} vs {len(fb)}, equal PixelData {same}")
stamp = re.compile(r"[0-9a-f]{32}|data:image/png;base64,[A-Za-z0-9+/=]+|\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2})?( UTC)?|medseg-diff [0-9][^ <\"]*|version [0-9][^ <\"]*")
for f in files(a, "evaluation/overlays/*/*/report.html"):
    ta, tb = stamp.sub("T", (a / f).read_text()), stamp.sub("T", (b / f).read_text())
    # paths of the two runs differ (absolute paths of the two clones)
    ta, tb = ta.replace(str(a.resolve().parent), "ROOT"), tb.replace(str(b.resolve().parent), "ROOT")
    if ta != tb:
        import difflib
        d = [l for l in difflib.unified_diff(ta.splitlines(), tb.splitlines(), lineterm="", n=0) if l[:1] in "+-" and not l.startswith(("+++", "---"))]
        print("report", f, "differs:", len(d), "lines", [l[:160] for l in d[:6]])
    else:
        print("report", f, "identical (timestamps, versions, clone paths removed)")
