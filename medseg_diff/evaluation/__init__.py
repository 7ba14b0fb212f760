"""Evaluation: score label maps against a manifest's labels, whoever predicted them.

``metrics`` (global Dice, HD95, ... and uncertainty quality), ``lesionwise`` (the BraTS 2023+ lesion-wise
metrics through panoptica), ``stats`` (paired comparison), ``tables`` (CSV, markdown, plots), ``scoring`` (one case scored: ``score_case``, the
process pool of ``evaluate --workers``), ``sources``
(prediction folders of this package, nnU-Net or a BraTS submission), ``run`` (``evaluate``).
Nothing is imported here eagerly, so that ``evaluation.metrics`` stays cheap for the other stages.
"""
