"""vaewatch in Apache Beam: the transforms, the RunInference model handler and the detector for
Beam's AnomalyDetection, for use in your own pipeline.

    from vaewatch.pipeline import ReadParquetTables, ScoreRecords

    tables = paths | ReadParquetTables(columns)
    outputs = tables | ScoreRecords.for_model(
        "models:/transactions@champion", tracking_uri, input_schema=schema, keep=["id"]
    )
    outputs.scored, outputs.rejected  # PCollections of Arrow tables

Names resolve lazily: importing this package imports neither Beam nor torch until a name is
used. `vaewatch score` and `vaewatch nightly` are built from the same transforms.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    # reading, batching, scoring
    "ReadParquetTables": "vaewatch.pipeline.transforms",
    "Rebatch": "vaewatch.pipeline.batching",
    "ScoreRecords": "vaewatch.pipeline.transforms",
    "ScoreBatches": "vaewatch.pipeline.transforms",
    "ModelSettings": "vaewatch.pipeline.transforms",
    "CorruptInputError": "vaewatch.pipeline.transforms",
    "SCORED_TAG": "vaewatch.pipeline.transforms",
    "REJECTED_TAG": "vaewatch.pipeline.transforms",
    # writing
    "WriteOutputs": "vaewatch.pipeline.outputs",
    "Output": "vaewatch.pipeline.outputs",
    "ScoreParquet": "vaewatch.pipeline.score",
    # RunInference and AnomalyDetection
    "VaewatchModelHandler": "vaewatch.pipeline.inference",
    "vaewatch_detector": "vaewatch.pipeline.inference",
    "to_anomaly_prediction": "vaewatch.pipeline.inference",
}

__all__ = [  # the keys of _EXPORTS (a test keeps them equal)
    "REJECTED_TAG",
    "SCORED_TAG",
    "CorruptInputError",
    "ModelSettings",
    "Output",
    "ReadParquetTables",
    "Rebatch",
    "ScoreBatches",
    "ScoreParquet",
    "ScoreRecords",
    "VaewatchModelHandler",
    "WriteOutputs",
    "to_anomaly_prediction",
    "vaewatch_detector",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves them
    from vaewatch.pipeline.batching import Rebatch
    from vaewatch.pipeline.inference import (
        VaewatchModelHandler,
        to_anomaly_prediction,
        vaewatch_detector,
    )
    from vaewatch.pipeline.outputs import Output, WriteOutputs
    from vaewatch.pipeline.score import ScoreParquet
    from vaewatch.pipeline.transforms import (
        REJECTED_TAG,
        SCORED_TAG,
        CorruptInputError,
        ModelSettings,
        ReadParquetTables,
        ScoreBatches,
        ScoreRecords,
    )


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vaewatch.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
