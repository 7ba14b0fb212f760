"""The stages: what the CLI, ``pipelines/`` and the demo call. Each composes the libraries below it (data, inference,
predictions, evaluation, export, dicom, tracking, training, audit) and nothing below imports a stage
(``docs/architecture.md``, ``tests/test_layout.py``).

``data`` (synth, manifest, check), ``train``, ``predict`` (cases into prediction folders), ``evaluate`` (predict,
export the first cases, score every folder), ``export`` (prediction folders into reports), ``dicomweb`` (a study
from a PACS and back), ``diagnose`` (the mechanism audit), ``serve`` (the MLflow pyfunc), ``demo``; ``models``
(a checkpoint or an MLflow model URI into a model) and ``report`` (what a many-case stage reports).
Importing this package imports no stage.
"""
