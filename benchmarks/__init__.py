"""Speed, memory, cost and quality benchmarks (not part of the installed package; see benchmarks/README.md).

Run each as a module from the repository root, e.g. ``python -m benchmarks.bench_cost``; the shared set-up, timing and
results code is ``benchmarks.harness``.
"""
