"""Print the local file that pip would install, from ``pip install --dry-run --report -`` on stdin.

``make torch`` asks pip which torch wheel it would take (pip alone sees this machine's wheel folder, through its
``find-links``). When that is a local file whose name holds the build tag given as the argument (``+cpu``), its path
is printed and uv installs it (about 4 s against pip's 21 s for torch's 700 MB); otherwise nothing is printed.
"""

from __future__ import annotations

import json
import sys
from urllib.parse import unquote, urlparse


def local_wheel(report: dict, tag: str) -> str:
    for item in report.get("install", []):
        url = item.get("download_info", {}).get("url", "")
        parsed = urlparse(url)
        path = unquote(parsed.path)
        if parsed.scheme == "file" and path.endswith(".whl") and tag in path.rsplit("/", 1)[-1]:
            return path
    return ""


if __name__ == "__main__":
    try:
        report = json.load(sys.stdin)
    except ValueError:
        sys.exit(0)
    print(local_wheel(report, sys.argv[1] if len(sys.argv) > 1 else ""))
