"""Inference: a trained model rebuilt from its checkpoint, and whole cases predicted onto their original grid as
arrays. Imports nothing from training, export, MLflow or the prediction folder's writer (the predict stage writes).

``loading`` (checkpoint → model), ``sliding_window`` (whole-volume windows), ``case`` (one case on its original
grid), ``provenance`` (where a prediction comes from).
"""
