"""Process-wide settings shared by every stage: the device, logging, and what reproducibility needs pinned.

The library logs through ``logging`` (logger names under ``medseg_diff``) and never configures handlers;
the command line (``medseg_diff.cli``) and the pipeline scripts call ``configure_logging``.

torch's intra-op CPU threads per process (``thread_count``, set by ``pin_reproducibility``), first that applies:

1. ``MEDSEG_DIFF_THREADS``: this package's setting, for every process alike (e.g. the same count on machines with
   different core counts, to compare their numbers);
2. ``OMP_NUM_THREADS``: the usual OpenMP setting; ``torchrun`` sets it to 1 per process unless it is already set,
   so under DDP the processes of a machine do not each take all its CPUs;
3. the CPUs this process may run on (``default_threads``), shared among the ``LOCAL_WORLD_SIZE`` processes of the
   machine when a launcher other than ``torchrun`` starts several without ``OMP_NUM_THREADS``.

An empty or zero value counts as unset; a non-numeric ``OMP_NUM_THREADS`` (OpenMP's own variable) is
ignored, a non-numeric ``MEDSEG_DIFF_THREADS`` is refused (``ConfigError`` naming it). The same seed gives the
same numbers to the last decimal only with the same thread count.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device or thread count is set, not to print --help
    import torch

LOGGER = "medseg_diff"


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """``auto``: the local GPU when there is one, else the CPU. ``cuda`` without a GPU is refused by name."""
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from medseg_diff.errors import ConfigError

        raise ConfigError(key, f"'{name}' asked for, but torch sees no CUDA GPU here; use auto or cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    try:
        return torch.device(name)
    except RuntimeError:
        from medseg_diff.errors import ConfigError

        raise ConfigError(key, f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (so redirection and capture work)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Plain one-line messages on stderr for the ``medseg_diff`` loggers (idempotent)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    if not sys.stderr.isatty():  # MLflow's artifact download bars would fill log files with carriage returns
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def show_progress(enabled: bool = True) -> bool:
    """Progress bars only on an interactive terminal, so that logs written to files stay readable."""
    return enabled and sys.stderr.isatty()


def default_threads() -> int:
    """The CPU threads a process uses when neither ``MEDSEG_DIFF_THREADS`` nor ``OMP_NUM_THREADS`` is set: the CPUs
    this process may run on, divided among the ``LOCAL_WORLD_SIZE`` processes of the machine (at least 1).

    Float reductions split over a different number of threads round differently, so the same seed gives the same
    numbers to the last decimal only with the same thread count. The CPUs a process may use are fixed for a machine
    kind and do not change with its load (torch's own default follows physical cores); set ``MEDSEG_DIFF_THREADS``
    to the same value to compare machines with different core counts.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, cpus // (_positive_int("LOCAL_WORLD_SIZE") or 1))


def thread_count() -> int:
    """torch's intra-op threads for this process: ``MEDSEG_DIFF_THREADS``, else ``OMP_NUM_THREADS``, else
    ``default_threads()`` (the precedence of the module docstring)."""
    own = os.environ.get("MEDSEG_DIFF_THREADS", "").strip()
    if own and not own.isdigit():  # this package's own setting: a typo is an error, not silently every CPU
        from medseg_diff.errors import ConfigError

        raise ConfigError("MEDSEG_DIFF_THREADS", f"the environment variable must be a whole number of threads "
                                                 f"(0 or empty: unset), got {own!r}")
    return _positive_int("MEDSEG_DIFF_THREADS") or _positive_int("OMP_NUM_THREADS") or default_threads()


def _positive_int(name: str) -> int | None:
    """The environment variable ``name`` as a positive integer, None when unset or not one (OpenMP's nested form
    ``4,2`` gives its first level)."""
    value = os.environ.get(name, "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def pin_reproducibility(deterministic: bool = True) -> int:
    """Fix what would otherwise vary between runs on the same machine kind: torch's intra-op thread count
    (``thread_count()``: ``MEDSEG_DIFF_THREADS``, else ``OMP_NUM_THREADS``, else ``default_threads()``) and, when
    ``deterministic``, deterministic algorithms (cuDNN included; ``CUBLAS_WORKSPACE_CONFIG`` is set for cuBLAS).
    Returns the thread count."""
    import torch

    threads = thread_count()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return torch.get_num_threads()


def deterministic_algorithms(mode: bool = True, warn_only: bool = True) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=warn_only)`` without its import of ``torch._inductor``
    (4.4 s on 2 CPU cores, paid by every command before it did any work) while nothing is compiled: torch's own
    function only adds the inductor's ``deterministic`` flag to the switch it sets. Where the inductor is loaded
    already, torch's function sets both; ``compile_deterministically`` sets the flag before ``torch.compile``."""
    import sys

    import torch

    if "torch._inductor.config" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def compile_deterministically(module):
    """``torch.compile(module)`` with the inductor's ``deterministic`` flag following torch's switch (which
    ``deterministic_algorithms`` set without loading the inductor)."""
    import torch

    torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled(),
                                       warn_only=torch.is_deterministic_algorithms_warn_only_enabled())
    return torch.compile(module)
