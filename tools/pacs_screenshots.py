"""Screenshots of a prediction as a PACS shows it: a local Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) gets
a DICOM study, ``medseg-diff predict --dicomweb`` segments it and stores the SEG and parametric maps back, and headless
Chromium photographs Orthanc Explorer's study page (the SEG and maps listed beside the MR series).

    python tools/pacs_screenshots.py --study demo_out/dicom/study --checkpoint demo_out/runs/diffusion/best.pt \\
        --out docs/images

Writes ``OUT/orthanc_study.png`` and prints what Orthanc reports for each series (modality, description, count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from medseg_diff.cli import main as cli
from medseg_diff.dicom import read_study
from medseg_diff.dicom.web import connect, store_instances

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: bytes | None = None) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, data=data), timeout=10) as reply:
        return reply.read()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", type=Path, required=True, help="a DICOM study folder")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("docs/images"))
    p.add_argument("--steps", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacs-shot-"))
    port = _free_port()
    config = {"Name": "medseg-demo", "HttpPort": port, "StorageDirectory": str(work / "storage"),
              "IndexDirectory": str(work / "storage"), "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "OrthancExplorerEnabled": True, "Plugins": [PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (work / "orthanc.json").write_text(json.dumps(config))
    server = subprocess.Popen(["Orthanc", str(work / "orthanc.json")], stdout=subprocess.DEVNULL,
                              stderr=open(work / "orthanc.log", "w"))
    root = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                _get(root + "/system")
                break
            except OSError:
                time.sleep(0.2)
        study = read_study(args.study)
        files = [f for s in study.series.values() for f in s.files]
        store_instances(connect(root + "/dicom-web"), files)
        argv = ["predict", "--checkpoint", str(args.checkpoint), "--dicomweb", root + "/dicom-web",
                "--study", study.study_uid, "--out", str(work / "predictions")]
        if args.steps:
            argv += ["--steps", args.steps]
        if cli(argv) != 0:
            return 1
        [orthanc_id] = [r["ID"] for r in json.loads(_get(root + "/tools/lookup", study.study_uid.encode()))]
        for series_id in json.loads(_get(f"{root}/studies/{orthanc_id}"))["Series"]:
            info = json.loads(_get(f"{root}/series/{series_id}"))
            tags = info["MainDicomTags"]
            print(f"{tags.get('SeriesNumber', ''):>4} {tags.get('Modality', ''):4} {tags.get('SeriesDescription', '')!r}: "
                  f"{len(info['Instances'])} instance(s)")
        args.out.mkdir(parents=True, exist_ok=True)
        shot = args.out / "orthanc_study.png"
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={work / 'chrome'}", "--window-size=1100,1000",
                        "--virtual-time-budget=8000", f"--screenshot={shot}",
                        f"{root}/app/explorer.html#study?uuid={orthanc_id}"],
                       check=True, capture_output=True, timeout=120)
        print(f"wrote {shot}")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
