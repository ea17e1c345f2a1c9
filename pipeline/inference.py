"""A registered vaewatch model in Beam's own ML APIs: `RunInference` and `AnomalyDetection`.

```python
from apache_beam.ml.inference.base import RunInference
from apache_beam.ml.anomaly.transforms import AnomalyDetection
from vaewatch.pipeline.inference import VaewatchModelHandler, vaewatch_detector

rows | RunInference(VaewatchModelHandler("models:/transactions/3", tracking_uri))
rows | AnomalyDetection(vaewatch_detector("models:/transactions/3", tracking_uri))
```

`VaewatchModelHandler` takes examples that are Arrow tables or record batches (each a batch of
records: the fast path), `beam.Row`s or dicts (one record each). A batch of examples becomes one
Arrow table and one `Scorer.score` call; each example gets back a `PredictionResult` whose
`inference` is, for a table, an Arrow table with one row per input row (the score columns,
null where the row was rejected, and `reason`), for a record, a dict of the same columns.

The constructor stores settings only; `load_model` runs on the worker, once per process (Beam
shares it across threads), and reads config.json + safetensors weights: nothing is unpickled,
unlike Beam's PyOD adapter, which `pickle.load`s its model file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.ml.anomaly.base import AnomalyPrediction
from apache_beam.ml.anomaly.detectors.offline import OfflineDetector
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult

from vaewatch.model import defaults, process
from vaewatch.model.contract import REASON_COLUMN
from vaewatch.model.scoring import Scorer, ScoringOverrides
from vaewatch.pipeline.transforms import METRICS_NAMESPACE, ModelSettings

Example = pa.Table | pa.RecordBatch | beam.Row | dict


class VaewatchModelHandler(ModelHandler[Example, PredictionResult, Scorer]):
    """RunInference over a vaewatch model: a pinned `models:/NAME/VERSION` URI (resolved with
    `tracking_uri`) or a local model folder."""

    def __init__(
        self,
        model_uri: str,
        tracking_uri: str = "",
        *,
        k: int | None = None,
        seed: int | None = None,
        threshold_quantile: float | None = None,
        flag_rule: str | None = None,
        model_version: str = "",
        precision: str = defaults.PRECISION,
        min_batch_size: int = 1,
        max_batch_size: int = 4096,
    ):
        super().__init__()
        self._settings = ModelSettings(
            location=model_uri,
            tracking_uri=tracking_uri,
            model_version=model_version,
            overrides=ScoringOverrides(k, seed, threshold_quantile, flag_rule),
            precision=precision,
        )
        self._batching = {"min_batch_size": min_batch_size, "max_batch_size": max_batch_size}

    def load_model(self) -> Scorer:
        process.keep_large_blocks()
        return self._settings.load()

    def run_inference(
        self,
        batch: Sequence[Example],
        model: Scorer,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        tables = list(_as_tables(batch))
        scored = model.score(pa.concat_tables(tables, promote_options="permissive")).aligned()
        records = None  # the score rows of the records, as dicts, made once for the batch
        start = 0
        for example in batch:
            if isinstance(example, pa.Table | pa.RecordBatch):
                inference = scored.slice(start, example.num_rows)
                start += example.num_rows
            else:
                if records is None:
                    records = scored.to_pylist()
                inference = records[start]
                start += 1
            yield PredictionResult(example, inference, model_id=self._settings.location)

    def batch_elements_kwargs(self) -> dict:
        return dict(self._batching)

    def get_num_bytes(self, batch: Sequence[Example]) -> int:
        if all(isinstance(e, pa.Table | pa.RecordBatch) for e in batch):
            return sum(e.nbytes for e in batch)
        return super().get_num_bytes(batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def threshold(self) -> float:
        """The anomaly-score threshold these settings flag at (reads the model's config on the
        calling machine, as a launcher does once)."""
        return self._settings.overrides.threshold(self._settings.load_artifact())


def _as_tables(batch: Sequence[Example]):
    """The batch as Arrow tables in order: tables as they are, each run of consecutive records
    as one table (one conversion per run, not per record)."""
    records: list[dict] = []
    for example in batch:
        if isinstance(example, pa.Table | pa.RecordBatch):
            if records:
                yield pa.Table.from_pylist(records)
                records = []
            yield example if isinstance(example, pa.Table) else pa.Table.from_batches([example])
        elif hasattr(example, "_asdict"):  # a beam.Row, or the NamedTuple Beam infers from rows
            records.append(example._asdict())
        elif hasattr(example, "as_dict"):
            records.append(example.as_dict())
        else:
            records.append(dict(example))
    if records:
        yield pa.Table.from_pylist(records)


def to_anomaly_prediction(
    keyed: tuple[Any, PredictionResult], threshold: float | None = None
) -> tuple[Any, AnomalyPrediction]:
    """(key, PredictionResult of one record) -> (key, AnomalyPrediction): the anomaly score, the
    model's own label (1 where `is_anomaly`, else 0; None for a rejected record, whose score is
    None too), the anomaly-score `threshold` above which every record is flagged, the reason."""
    key, prediction = keyed
    columns = prediction.inference
    flagged = columns["is_anomaly"]
    return key, AnomalyPrediction(
        score=columns["anomaly_score"],
        label=None if flagged is None else int(flagged),
        threshold=threshold,
        info=columns[REASON_COLUMN],
    )


def vaewatch_detector(
    model_uri: str, tracking_uri: str = "", *, features: Sequence[str] | None = None, **kwargs
) -> OfflineDetector:
    """An offline detector for Beam's `AnomalyDetection`: scores with the model and labels with
    its own rule, `is_anomaly` (`threshold_quantile=` and `flag_rule=` override the model's).
    The rule looks at each feature's term as well as the total score, so it is the model's label
    rather than a `ThresholdFn` on the score; `threshold_criterion=` replaces it with one (Beam's
    `FixedThreshold`, `QuantileThreshold`) on `anomaly_score`. Other `kwargs` go to
    `VaewatchModelHandler`."""
    criterion = kwargs.pop("threshold_criterion", None)
    handler = VaewatchModelHandler(model_uri, tracking_uri, **kwargs)
    postprocess = partial(to_anomaly_prediction, threshold=handler.threshold())
    keyed = KeyedModelHandler(handler).with_postprocess_fn(postprocess)
    return OfflineDetector(
        keyed,
        threshold_criterion=criterion,
        model_id=f"vaewatch:{model_uri}",
        features=features,
    )
