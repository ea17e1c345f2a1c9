"""The MLflow pyfunc face of a vaewatch model, logged with MLflow's models-from-code.

MLflow stores this file's source with the model and runs it at load time: nothing is pickled,
so loading works with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false. The weights and config come
from the model's `vaewatch` artifact folder (config.json + weights.safetensors).

`predict(pandas.DataFrame)` returns one row per input row with the score columns of the output
contract plus `reason` (the rejected output's column): empty for scored rows; for a row that
cannot be scored (every feature missing, +-inf, a non-finite score) the scores are null and
the reason says why.
Params: `model_version` (the label written in the model_version column).
"""

from __future__ import annotations

import mlflow
import pandas as pd
import pyarrow as pa
from mlflow.models import set_model

from vaewatch.model.artifact import ModelArtifact
from vaewatch.model.contract import REASON_COLUMN, SCORE_COLUMNS
from vaewatch.model.scoring import Scorer

ARTIFACT_KEY = "vaewatch"


class VaewatchModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        artifact = ModelArtifact.load(context.artifacts[ARTIFACT_KEY])
        label = artifact.metadata.get("model_label", "vaewatch")
        config = context.model_config or {}
        self.scorer = Scorer(
            artifact, model_version=config.get("model_version", label), device="auto"
        )

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        version = str(params["model_version"]) if params and params.get("model_version") else None
        out = self.scorer.score(table, model_version=version).aligned().to_pandas()
        out["model_version"] = out["model_version"].astype(object)
        return out[[*SCORE_COLUMNS, REASON_COLUMN]]


set_model(VaewatchModel())
