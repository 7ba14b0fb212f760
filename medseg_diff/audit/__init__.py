"""Mechanism audit of a trained model: does each part of the diffusion model do its job (``medseg-diff diagnose``).

``run_audit`` (``audit.run``) is the API; ``audit.scores`` holds the map scores the audit and the study share.
Importing this package stays light (``scores`` needs only numpy and scipy): ``run_audit`` is loaded on first use.
"""

from __future__ import annotations

__all__ = ["run_audit"]


def __getattr__(name: str):
    if name == "run_audit":
        from medseg_diff.audit.run import run_audit

        return run_audit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
