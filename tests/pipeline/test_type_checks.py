"""Every transform vaewatch ships builds under Beam's pipeline type checking, with no type-hint
warning, and every DoFn's `process` / `process_batch` is typed as Beam documents it: an iterator
(or iterable) of outputs. Beam tightens these checks between releases (2.78 refused a `process`
annotated `-> None` and a `GroupByKey` value typed `Iterator`); this suite is where such a
change should surface, not a user's pipeline."""

import collections.abc
import importlib
import logging
import pkgutil
import typing

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.ml.anomaly.transforms import AnomalyDetection
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions

import vaewatch.pipeline
from vaewatch.model.contract import score_schema
from vaewatch.pipeline.batching import Rebatch
from vaewatch.pipeline.inference import VaewatchModelHandler, vaewatch_detector
from vaewatch.pipeline.outputs import Output, WriteOutputs
from vaewatch.pipeline.score import ScoreParquet
from vaewatch.pipeline.transforms import (
    REJECTED_TAG,
    SCORED_TAG,
    ModelSettings,
    ReadParquetTables,
    ScoreRecords,
)

ITERATORS = {
    collections.abc.Iterator,
    collections.abc.Iterable,
    collections.abc.Generator,
}
INPUT = pa.schema([("id", pa.int64()), ("amount", pa.float64()), ("shop", pa.string())])


def _shipped_dofns() -> list[type]:
    found = set()
    for info in pkgutil.walk_packages(vaewatch.pipeline.__path__, "vaewatch.pipeline."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, beam.DoFn)
                and value.__module__.startswith("vaewatch.")
            ):
                found.add(value)
    return sorted(found, key=lambda cls: cls.__qualname__)


def test_the_dofn_scan_finds_the_dofns_vaewatch_ships():
    names = {cls.__name__ for cls in _shipped_dofns()}
    assert {"ScoreBatches", "_ReadRowGroups", "_RebatchFn", "_WriteBundles"} <= names


@pytest.mark.parametrize("dofn", _shipped_dofns(), ids=lambda cls: cls.__name__)
def test_process_is_typed_as_an_iterator_of_outputs(dofn):
    for name in ("process", "process_batch"):
        method = dofn.__dict__.get(name)
        if method is None:
            continue
        hints = typing.get_type_hints(method)
        assert "return" in hints, f"{dofn.__name__}.{name} has no return annotation"
        origin = typing.get_origin(hints["return"]) or hints["return"]
        assert origin in ITERATORS, (
            f"{dofn.__name__}.{name} returns {hints['return']!r}: Beam expects an iterator or "
            "iterable of outputs (a generator that yields nothing for a DoFn that emits only in "
            "finish_bundle)"
        )


def _checked_pipeline() -> beam.Pipeline:
    return beam.Pipeline(
        options=PipelineOptions(pipeline_type_check=True, type_check_strictness="DEFAULT_TO_ANY")
    )


def _type_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "type hint" in r.getMessage().lower()
    ]


def test_the_composite_transforms_build_with_type_checking_and_no_hint_warnings(caplog, tmp_path):
    caplog.set_level(logging.WARNING)
    model = ModelSettings(str(tmp_path / "model"))  # loaded by the workers, not when building
    scored = pa.schema([INPUT.field("id"), *score_schema(4)])
    p = _checked_pipeline()
    paths = p | "Paths" >> beam.Create([str(tmp_path / "in.parquet")])
    tables = paths | ReadParquetTables(INPUT.names, provenance=True)
    rebatched = tables | "Rebatch" >> Rebatch(100)
    outputs = rebatched | ScoreRecords(model, input_schema=INPUT, scored_schema=scored, keep=["id"])
    written = {
        SCORED_TAG: outputs[SCORED_TAG],
        REJECTED_TAG: outputs[REJECTED_TAG],
    } | "Write" >> WriteOutputs(
        {
            SCORED_TAG: Output(str(tmp_path / "out" / "scored"), scored),
            REJECTED_TAG: Output(str(tmp_path / "out" / "rejected"), INPUT),
        },
        shards=2,
        sharded=SCORED_TAG,
    )
    files = paths | "ScoreParquet" >> ScoreParquet(
        model,
        input_schema=INPUT,
        scored_schema=scored,
        scored_prefix=str(tmp_path / "sp" / "scored"),
        rejected_prefix=str(tmp_path / "sp" / "rejected"),
        keep=["id"],
        batch_size=100,
    )
    assert set(written) >= {SCORED_TAG, REJECTED_TAG} and set(files) >= {SCORED_TAG, REJECTED_TAG}
    assert _type_warnings(caplog) == []


def test_run_inference_and_anomaly_detection_build_with_type_checking(caplog, trained):
    job, _ = trained
    caplog.set_level(logging.WARNING)
    p = _checked_pipeline()
    records = p | beam.Create([{"amount": 1.0}])
    records | RunInference(VaewatchModelHandler("models:/transactions/1", job.tracking_uri))
    detector = vaewatch_detector("models:/transactions/1", job.tracking_uri)
    (records | beam.Map(lambda row: (0, beam.Row(**row))) | AnomalyDetection(detector))
    assert _type_warnings(caplog) == []


def test_a_dofn_typed_as_returning_none_is_caught_here():
    """The check above is not vacuous: the shape that broke on Beam 2.78 fails it."""

    class Silent(beam.DoFn):
        def process(self, element) -> None:
            pass

    with pytest.raises(AssertionError, match="Beam expects an iterator"):
        test_process_is_typed_as_an_iterator_of_outputs(Silent)
