"""The prediction folder: the hand-off between ``predict`` and ``export``, ``evaluate``, the DICOM writer and MLflow.

A prediction folder ``DIR/CASE/`` holds, on the input's exact grid (shape, affine, s/q-form of the reference):
``CASE_seg.nii.gz`` (labels of the input's convention), ``CASE_probabilities.nii.gz`` (4D, TC/WT/ET),
``CASE_uncertainty.nii.gz`` (predictive entropy of the mean probabilities, nats, summed over the 3 regions),
``CASE_variance.nii.gz`` (diffusion: variance across the ensemble members, mean over the regions),
``CASE_attention_*.nii.gz`` (1 = the map's 99.5th percentile in the brain; display window 0–1), colour tables, and
``prediction.json`` (inputs, model, run id, timing, provenance: checkpoint, training data, sampler settings; Dice against the case's label file when it has one), from which
``export`` rebuilds the case without the model.

One module per concern, below every package that uses them (none of them redefines a name):
``layout`` (file names), ``meta`` (``prediction.json``), ``types`` (the case in memory and its provenance),
``volumes`` (NIfTI and colour tables, all-or-nothing), ``folder`` (write and read a whole folder). This ``__init__``
imports nothing, so reading a file name does not load torch.
"""
