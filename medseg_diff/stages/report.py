"""What a stage that runs over many cases reports: what was written, and what failed and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunReport:
    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # case -> error message

    def summary(self) -> str:
        lines = [f"{len(self.written)} case(s) written, {len(self.failed)} failed"]
        lines += [f"  FAILED {case}: {err}" for case, err in self.failed.items()]
        return "\n".join(lines)
