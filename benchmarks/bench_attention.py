"""Linear (Efficient) attention vs softmax attention: fwd+bwd time and peak memory of one attention block.

Every block is the same pre-norm residual layer (GroupNorm, 1x1 qkv projection, attention, 1x1 output
projection); only the attention core differs:

* ``linear``    -- :class:`medseg_diff.models.LinearAttention3d` (O(N d^2), no N x N matrix)
* ``sdpa``      -- ``F.scaled_dot_product_attention``, default backend (fused flash kernel on CPU and GPU)
* ``sdpa-math`` -- the same call forced onto its math path (materialises N x N)
* ``explicit``  -- ``softmax(q k^T / sqrt(d)) v`` written out

Timing is the median of ``repeats`` fwd+bwd steps after one warm-up step. Peak memory is what the step needs
beyond its inputs and weights: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the growth of the process's
peak RSS during the first step, measured in a fresh subprocess per configuration (torch's CPU allocator does not
cache, and tracemalloc cannot see it). "largest" is the largest single tensor any op creates in the first step,
counted by a dispatch mode; for CPU runs that are skipped it is counted on the ``meta`` device instead (fp32, free).

Usage (from the repository root)::

    python -m benchmarks.bench_attention                          # CPU: 8^3..32^3 tokens, markdown table
    python -m benchmarks.bench_attention --device cuda --sides 32 48 64 --linear-sides   # GPU, bf16 autocast

From Python (e.g. on a GPU machine): ``benchmarks.bench_attention.measure("linear", 64, device="cuda")`` ->
:class:`Result`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.harness import GIB, ROOT, pin_threads, sync
from medseg_diff.models import LinearAttention3d

KINDS = ("linear", "sdpa", "sdpa-math", "explicit")


@dataclass
class Result:
    kind: str
    side: int
    ms: float | None  # median fwd+bwd wall time
    peak_bytes: int | None  # peak memory of one fwd+bwd beyond inputs and weights
    largest_bytes: int  # largest single tensor of the first step (skipped runs: counted on the meta device)
    note: str = ""


class SoftmaxAttention3d(LinearAttention3d):
    """The same block as :class:`LinearAttention3d` with softmax attention over positions (O(N^2))."""

    def __init__(self, dim: int, heads: int, dim_head: int, core: str):
        super().__init__(dim, heads=heads, dim_head=dim_head)
        self.core = core

    def forward(self, x: Tensor) -> Tensor:
        # position-major projection: d has stride 1, as the fused SDPA kernels require
        qkv = F.linear(rearrange(self.norm(x), "b c ... -> b (...) c"), self.to_qkv.weight[..., 0])
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if self.core == "explicit":
            weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)  # [B, h, N, N]
            out = weights @ v
        elif self.core == "sdpa-math":
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out(rearrange(out, "b h n d -> b (h d) n"))
        return x + out.reshape(x.shape)


def build_block(kind: str, dim: int = 64, heads: int = 4, dim_head: int = 32) -> nn.Module:
    if kind == "linear":
        return LinearAttention3d(dim, heads=heads, dim_head=dim_head)
    if kind in KINDS:
        return SoftmaxAttention3d(dim, heads, dim_head, core=kind)
    raise ValueError(f"unknown attention kind {kind!r}; choose from {KINDS}")


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def largest_intermediate(kind: str, side: int, dim: int = 64, batch: int = 1, **block_kw) -> int:
    """Bytes of the largest tensor one fp32 fwd+bwd creates, counted on the meta device (no memory used)."""
    block = build_block(kind, dim, **block_kw).to("meta")
    x = torch.randn(batch, dim, side, side, side, device="meta", requires_grad=True)
    with _LargestTensor() as mode:
        block(x).sum().backward()
    return mode.bytes


def _step(block: nn.Module, x: Tensor, amp_dtype: torch.dtype | None) -> None:
    """One fwd+bwd (optionally under autocast), gradients dropped."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = block(x).float().square().mean()
    loss.backward()
    block.zero_grad(set_to_none=True)
    x.grad = None


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(
    kind: str,
    side: int,
    device: str = "cpu",
    amp_dtype: torch.dtype | None = None,
    repeats: int = 5,
    dim: int = 64,
    heads: int = 4,
    dim_head: int = 32,
    batch: int = 1,
) -> Result:
    """Time and peak memory of fwd+bwd of one ``kind`` block on ``side^3`` tokens (in this process).

    On CUDA pass ``amp_dtype=torch.bfloat16`` for bf16 autocast; the peak is ``torch.cuda.max_memory_allocated``.
    On the CPU the peak is the growth of this process's peak RSS, only meaningful in a fresh process
    (see :func:`measure_cpu_isolated`).
    """
    dev = torch.device(device)
    block = build_block(kind, dim, heads, dim_head).to(dev)
    x = torch.randn(batch, dim, side, side, side, device=dev, requires_grad=True)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _peak_rss_bytes()
    with _LargestTensor() as largest:  # also the warm-up
        _step(block, x, amp_dtype)
    sync(dev)
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss_bytes()) - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(block, x, amp_dtype)
        sync(dev)
        times.append(time.perf_counter() - start)
    return Result(kind, side, 1000 * statistics.median(times), max(peak, 0), largest.bytes)


def measure_cpu_isolated(kind: str, side: int, repeats: int, max_gib: float) -> Result:
    """:func:`measure` on the CPU in a fresh subprocess; skipped when ~3x its largest tensor exceeds ``max_gib``."""
    largest = largest_intermediate(kind, side)  # the meta device takes SDPA's math path: an upper bound
    if kind != "sdpa" and 3 * largest > max_gib * GIB:
        return Result(kind, side, None, None, largest, note=f"skipped: would need > {3 * largest / GIB:.0f} GiB")
    cmd = [sys.executable, "-m", "benchmarks.bench_attention", "--worker", kind, str(side), "--repeats", str(repeats),
           "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return Result(kind, side, None, None, largest, note=f"failed (exit {done.returncode})")
    return Result(**json.loads(done.stdout.strip().splitlines()[-1]))


def measure_cuda(kind: str, side: int, repeats: int, amp_dtype: torch.dtype | None) -> Result:
    """:func:`measure` on CUDA, with out-of-memory reported instead of raised."""
    try:
        return measure(kind, side, "cuda", amp_dtype, repeats)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Result(kind, side, None, None, largest_intermediate(kind, side), note="out of memory")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def markdown_table(results: list[Result]) -> str:
    lines = [
        "| tokens | attention | fwd+bwd (median) | peak memory | largest tensor | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        ms = "—" if r.ms is None else f"{r.ms:.1f} ms"
        tokens = f"{r.side}³ = {r.side**3:,}"
        peak, largest = _fmt_bytes(r.peak_bytes), _fmt_bytes(r.largest_bytes)
        lines.append(f"| {tokens} | {r.kind} | {ms} | {peak} | {largest} | {r.note} |")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--sides", type=int, nargs="+", default=[8, 16, 24, 32], help="token grid sides, all kinds")
    p.add_argument("--linear-sides", type=int, nargs="*", default=[48, 64], help="extra sides, linear only")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-gib", type=float, default=12.0, help="CPU: skip runs that would need more memory")
    p.add_argument("--fp32", action="store_true", help="CUDA: no bf16 autocast")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default MEDSEG_DIFF_THREADS, else torch's choice)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SIDE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    pin_threads(args.threads)
    if args.worker:
        print(json.dumps(asdict(measure(args.worker[0], int(args.worker[1]), repeats=args.repeats))))
        return
    runs = [(kind, side) for side in args.sides for kind in args.kinds]
    runs += [("linear", side) for side in args.linear_sides if "linear" in args.kinds]
    amp = None if args.fp32 else torch.bfloat16
    results = []
    for kind, side in runs:
        if args.device == "cuda":
            results.append(measure_cuda(kind, side, args.repeats, amp))
        else:
            results.append(measure_cpu_isolated(kind, side, args.repeats, args.max_gib))
        print(f"done {kind} {side}^3", file=sys.stderr, flush=True)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    precision = "bf16 autocast" if args.device == "cuda" and amp is not None else "fp32"
    print(f"\n64 channels, 4 heads x 32, batch 1, {where}, {precision}\n")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
