"""The serve stage: the MLflow pyfunc that runs the whole prediction of a case (logged by
``tracking.registry.log_model``, whose models-from-code script imports :class:`CaseSegmenter` from here), behind
``mlflow models serve -m models:/NAME@ALIAS --env-manager local`` (see ``tracking.registry``, "Serving").

A stage, not part of ``tracking``: it composes inference and the prediction folder, while ``tracking`` stays below
the libraries that log to it.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import torch

from medseg_diff.data.conventions import get_convention
from medseg_diff.data.dataset import CASE_ID
from medseg_diff.data.transforms import IMAGE
from medseg_diff.errors import DataError
from medseg_diff.inference.case import predict_case
from medseg_diff.inference.loading import LoadedModel, load_model
from medseg_diff.predictions import layout
from medseg_diff.runtime import pin_reproducibility
from medseg_diff.stages.predict import write_prediction
from medseg_diff.tracking.registry import CHECKPOINT, INPUT_COLUMNS, OUTPUT_COLUMNS, PARAMS


class CaseSegmenter(mlflow.pyfunc.PythonModel):
    """Whole-case prediction: one row per case in, one prediction folder per case written, their paths out."""

    def load_context(self, context) -> None:
        """The checkpoint (the model's ``checkpoint`` artifact) on the GPU when there is one, else the CPU, with
        the thread count and deterministic algorithms of ``medseg-diff predict`` (``runtime.pin_reproducibility``):
        a served prediction is the one the command line gives."""
        pin_reproducibility()
        self.checkpoint = Path(context.artifacts[CHECKPOINT])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._models = {(None, None): load_model(self.checkpoint, self.device)}

    def _model(self, params: dict | None) -> LoadedModel:
        """The model with the sampler of ``params`` (``sample_steps``, ``ensemble``; 0: as trained), loaded once."""
        key = tuple(int((params or {}).get(p) or 0) or None for p in PARAMS)
        if key not in self._models:
            self._models[key] = load_model(self.checkpoint, self.device, sample_steps=key[0], ensemble=key[1])
        return self._models[key]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Each row's case into ``out_dir/CASE_ID/`` (a prediction folder); ``case_id, seg_path, seconds`` back."""
        missing = [c for c in INPUT_COLUMNS if c not in model_input.columns]
        if missing:
            raise DataError(None, f"the input frame lacks the column(s) {', '.join(missing)} "
                                  f"(expected {', '.join(INPUT_COLUMNS)})")
        model = self._model(params)
        rows = []
        for row in model_input.itertuples(index=False):
            case = str(row.case_id)
            try:
                conv = get_convention(str(row.convention))
            except ValueError as err:
                raise DataError(None, str(err), case=case) from None
            record = {CASE_ID: case, IMAGE: [str(row.t1), str(row.t1ce), str(row.t2), str(row.flair)]}
            pred = predict_case(model, record, conv, self.device)
            folder = write_prediction(pred, Path(str(row.out_dir)) / case, model.kind, model, conv, record)
            rows.append({"case_id": case, "seg_path": str(folder / layout.seg(case)),
                         "seconds": float(pred.seconds)})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
