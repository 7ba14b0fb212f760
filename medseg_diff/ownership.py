"""One writer per output: a lock file that names its holder (pid, host, start time, command).

``evaluate`` and ``export`` hold ``OUT/.medseg-diff.lock`` for their whole run; ``predict`` holds one lock per case
(``OUT/.CASE.lock``) while it predicts and installs that case, so runs that share an ``--out`` (the shards of one
job) never write the same case at once, and two unrelated runs never delete each other's staging or replace each
other's finished case.

A lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+). A second writer
finds it and is refused, the holder named. A lock whose holder is gone — same host, and its pid no longer runs, or
runs as another process (a recycled pid: its start time differs) — is taken over, with a log line saying so. A lock
from another host cannot be checked from here: it is refused, and the message says how to remove it by hand.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path

from medseg_diff.errors import DataError

log = logging.getLogger(__name__)

FOLDER_LOCK = ".medseg-diff.lock"
#: A lock file still empty or unreadable after this many seconds lost its writer between creating and writing it.
UNWRITTEN_LOCK_S = 10.0


class BusyError(DataError):
    """An output (folder or case) is being written by another live run."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (``/proc/PID/stat`` field 22, clock ticks since boot): tells a
    recycled pid from the process that took a lock. None where ``/proc`` is absent (macOS) or the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that pid: it exists
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def holder_of(lock: Path) -> dict | None:
    """What a lock file says about its holder, or None when it is gone (released meanwhile)."""
    try:
        text = lock.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        return {}  # being written this instant, or damaged: treated as held (refused, not taken over)
    return found if isinstance(found, dict) else {}


def describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"
            + (f", `{holder['command']}`" if holder.get("command") else ""))


class OutputLock:
    """``with OutputLock(path, what):`` — ``path`` (a lock file) is ours until the block ends. ``what`` names what
    it guards in messages (``"output folder OUT"``, ``"case C of OUT"``)."""

    def __init__(self, path: str | Path, what: str, command: str | None = None):
        self.path, self.what = Path(path), what
        self.command = command if command is not None else " ".join(Path(a).name if i == 0 else a
                                                                    for i, a in enumerate(sys.argv[:6]))
        self.token = secrets.token_hex(8)
        self.held = False

    def acquire(self) -> "OutputLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "process_start": _process_start(os.getpid()), "command": self.command, "token": self.token}
        for _ in range(3):  # a dead holder's lock is moved aside, then created again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = holder_of(self.path)
                if holder is None:
                    continue  # released between our open and our read
                self._take_over_or_refuse(holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise BusyError(self.path, f"{self.what} keeps changing hands; try again")

    def _take_over_or_refuse(self, holder: dict) -> None:
        same_host = holder.get("host") == socket.gethostname()
        pid = holder.get("pid")
        if same_host and isinstance(pid, int) and not _alive(pid, holder.get("process_start")):
            if self._move_aside(holder):
                log.warning("took over %s: its holder (%s) is no longer running", self.what, describe(holder))
            return
        if not holder and _age(self.path) > UNWRITTEN_LOCK_S:  # its writer died between creating and writing it
            if self._move_aside(holder):
                log.warning("took over %s: its lock file %s was left empty or unreadable", self.what, self.path)
            return
        hint = ("wait for it to finish, or choose another --out" if same_host else
                f"wait for it to finish, or choose another --out; if that run is gone, delete {self.path}")
        raise BusyError(self.path.parent, f"{self.what} is being written by another run ({describe(holder)}); {hint}")

    def _move_aside(self, stale: dict) -> bool:
        """Move the stale lock out of the way; True when it was the one read as ``stale``. Of several runs that
        found the same stale lock, one moves it; a later one may move the fresh lock the first just made, sees
        that it is not the stale one, and links it back (``os.link`` fails rather than replace a newer lock)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{secrets.token_hex(4)}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        if holder_of(aside) == stale:
            aside.unlink(missing_ok=True)
            return True
        try:
            os.link(aside, self.path)  # a live run's fresh lock: back where it was
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = holder_of(self.path)
        if holder is not None and holder.get("token") == self.token:  # never remove a lock that is not ours
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def folder_lock(folder: str | Path, command: str | None = None) -> OutputLock:
    """The lock of a whole output folder (created if needed): ``evaluate`` and ``export`` hold it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(folder, "the output folder is a file")
    folder.mkdir(parents=True, exist_ok=True)
    return OutputLock(folder / FOLDER_LOCK, f"output folder {folder}", command)


def case_lock(out_dir: str | Path, case_id: str, command: str | None = None) -> OutputLock:
    """The lock of one case of a prediction folder: ``predict`` holds it while it predicts and installs the case."""
    out_dir = Path(out_dir)
    return OutputLock(out_dir / f".{case_id}.lock", f"case {case_id} of {out_dir}", command)


_STAGING = re.compile(r"\.(?:partial|old)-(\d+)-([0-9a-f]{6})-[0-9a-f]{8}$")


def staging_owner_alive(name: str) -> bool:
    """Whether the run that made a staging name (``staging_name``) still runs. Names from another host are kept
    (not ours to judge); older names without a pid count as left behind."""
    found = _STAGING.search(name)
    if found is None:
        return False
    if found.group(2) != _host_hash():
        return True
    return _alive(int(found.group(1)), None)


_STAGED_CASE = re.compile(r"^\.(.+)\.(partial|old)-[^.]+$")


def staged_case(name: str) -> tuple[str, str] | None:
    """``(case, kind)`` of a staging / old-copy folder name (``.CASE.partial-…`` or ``.CASE.old-…``, with or without
    the process in it); None for any other name."""
    found = _STAGED_CASE.match(name)
    return (found.group(1), found.group(2)) if found else None


def staging_name(case_id: str, kind: str = "partial") -> str:
    """A hidden staging / old-copy name that says which process made it: ``.CASE.partial-PID-HOSTHASH-TOKEN``."""
    return f".{case_id}.{kind}-{os.getpid()}-{_host_hash()}-{secrets.token_hex(4)}"


def _host_hash() -> str:
    import hashlib

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
