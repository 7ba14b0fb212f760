"""Training: the generic trainer (exact resume, EMA, DDP), the per-model objectives and the MLflow hooks.

``trainer`` (the loop and checkpoints), ``hooks`` (MLflow, log lines),
``run`` (``train(cfg)``: manifest → datasets → trainer), ``distributed`` (torchrun plumbing).
"""
