"""``runtime.pin_reproducibility`` turns torch's deterministic algorithms on without importing the inductor (torch's
own ``use_deterministic_algorithms`` imports ``torch._inductor``: 4.4 s on 2 cores before any command does work),
and ``compile_deterministically`` still gives the inductor the flag before compiling."""

import subprocess
import sys

import torch

from medseg_diff.runtime import deterministic_algorithms


def _child(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_pinning_sets_torch_switch_without_loading_the_inductor():
    printed = _child(
        "import sys, torch\n"
        "from medseg_diff.runtime import pin_reproducibility\n"
        "pin_reproducibility()\n"
        "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),"
        " 'torch._inductor' in sys.modules)\n")
    assert printed == "True True False"


def test_compile_deterministically_gives_the_inductor_the_flag():
    printed = _child(
        "import torch\n"
        "from medseg_diff.runtime import compile_deterministically, deterministic_algorithms\n"
        "deterministic_algorithms(True, warn_only=True)\n"
        "compiled = compile_deterministically(torch.nn.Linear(2, 2))\n"
        "import torch._inductor.config as c\n"
        "print(c.deterministic, torch.are_deterministic_algorithms_enabled(),"
        " torch.is_deterministic_algorithms_warn_only_enabled(), callable(compiled))\n")
    assert printed == "True True True True"


def test_switch_off_and_on_in_this_process():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        deterministic_algorithms(False)
        assert not torch.are_deterministic_algorithms_enabled()
        deterministic_algorithms(True, warn_only=False)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
