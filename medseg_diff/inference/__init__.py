"""Inference: load a trained model from its checkpoint (or an MLflow model URI) and predict whole cases onto
their original grid, writing prediction folders. Imports nothing from ``medseg_diff.training``.

``adapters`` (what differs between models), ``loading`` (checkpoint → model), ``sliding_window`` (whole-volume
windows), ``case`` (one case on its original grid), ``prediction_folder`` (what is written, and read back),
``run`` (many cases, a bad one reported instead of ending the run).
"""
