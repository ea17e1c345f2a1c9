"""The Beam-native API: the composite transforms in a user's own pipeline (TestPipeline +
assert_that), RunInference with the model handler, and Beam's AnomalyDetection."""

import pickle

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.ml.anomaly.base import AnomalyResult
from apache_beam.ml.anomaly.transforms import AnomalyDetection
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from vaewatch.model.contract import REASON_COLUMN, SCORE_COLUMNS, RejectReason, score_schema
from vaewatch.model.scoring import Scorer
from vaewatch.pipeline.inference import VaewatchModelHandler, vaewatch_detector
from vaewatch.pipeline.transforms import (
    REJECTED_TAG,
    SCORED_TAG,
    CorruptInputError,
    ModelSettings,
    ReadParquetTables,
    Rebatch,
    ScoreRecords,
)

MODEL = "models:/transactions/1"


def _table(n: int, start: int = 0, wide: bool = False) -> pa.Table:
    values = pa.array(range(start, start + n), pa.int64() if wide else pa.int32())
    return pa.table({"v": values})


def test_rebatch_bounds_rows_and_never_merges_schemas():
    tables = [_table(7), _table(3, 7), _table(25, 10), _table(4, 35, wide=True), _table(1, 39)]

    def check(batches):
        assert all(b.num_rows <= 10 for b in batches), [b.num_rows for b in batches]
        assert all(len(set(map(str, b.schema.types))) == 1 for b in batches)
        values = sorted(v for b in batches for v in b["v"].to_pylist())
        assert values == list(range(40))
        wide = [b for b in batches if b.schema.field("v").type == pa.int64()]
        assert sum(b.num_rows for b in wide) == 4  # the int64 rows stayed on their own

    with TestPipeline() as p:
        out = p | beam.Create(tables, reshuffle=False) | Rebatch(10)
        assert_that(out | beam.combiners.ToList(), lambda lists: check(lists[0]))


def test_rebatch_emits_full_batches_and_keeps_windows_apart():
    """The DoFn on its own, one bundle: sizes worked out by hand from the rule (cut full
    10-row tables as rows arrive; a new schema sends the held rows out first; the rest goes out
    when the bundle ends, in its own window)."""
    from apache_beam.transforms.window import GlobalWindow, IntervalWindow

    from vaewatch.pipeline.batching import _RebatchFn

    fn, glob, other = _RebatchFn(10), GlobalWindow(), IntervalWindow(0, 60)
    fn.start_bundle()
    out = []
    for table, window in [
        (_table(7), glob),
        (_table(3, 7), glob),
        (_table(6, 100), other),
        (_table(25, 10), glob),
        (_table(4, 35, wide=True), glob),
        (_table(1, 39), glob),
    ]:
        out += [(t, window) for t in fn.process(table, window)]
    out += [(w.value, w.windows[0]) for w in fn.finish_bundle()]
    assert [(t.num_rows, w) for t, w in out] == [
        (10, glob), (10, glob), (10, glob), (5, glob), (4, glob), (1, glob), (6, other)
    ]  # fmt: skip
    assert [v for t, w in out if w == glob for v in t["v"].to_pylist()] == list(range(40))
    assert out[4][0].schema.field("v").type == pa.int64()  # the wide rows alone
    assert out[6][0]["v"].to_pylist() == list(range(100, 106))


@pytest.fixture(scope="module")
def holdout(workspace):
    table = pq.read_table(next((workspace / "holdout").glob("*.parquet"))).slice(0, 600)
    # two unscorable rows: every feature missing, and an infinite amount
    features = [c for c in table.column_names if c not in ("record_id",)]
    broken = table.slice(0, 2).to_pylist()
    for row in broken:
        for name in features:
            row[name] = None
    broken[1]["amount"] = float("inf")
    broken[0]["record_id"], broken[1]["record_id"] = 10**9, 10**9 + 1
    return pa.concat_tables([table, pa.Table.from_pylist(broken, schema=table.schema)])


@pytest.fixture(scope="module")
def scorer(trained):
    _, outcome = trained
    return Scorer(outcome.artifact, model_version="transactions/1", device="cpu")


def test_score_records_in_a_user_pipeline(trained, holdout, scorer):
    job, outcome = trained
    input_schema = holdout.schema
    scored_schema = pa.schema([input_schema.field("record_id"), *score_schema(8)])
    expected = scorer.score(holdout)
    expected_ll = dict(
        zip(
            holdout["record_id"].take(pa.array(expected.scored_rows)).to_pylist(),
            expected.scores["log_likelihood"].to_pylist(),
            strict=True,
        )
    )
    with TestPipeline() as p:
        outputs = (
            p
            | beam.Create([holdout.slice(0, 250), holdout.slice(250)], reshuffle=False)
            | ScoreRecords(
                ModelSettings(MODEL, job.tracking_uri, model_version="transactions/1"),
                input_schema=input_schema,
                scored_schema=scored_schema,
                keep=["record_id"],
                batch_size=128,
            )
        )
        scored = outputs[SCORED_TAG] | "ScoredRows" >> beam.FlatMap(
            lambda t: zip(t["record_id"].to_pylist(), t["log_likelihood"].to_pylist(), strict=True)
        )
        rejected = outputs[REJECTED_TAG] | "RejectedRows" >> beam.FlatMap(
            lambda t: t[REASON_COLUMN].to_pylist()
        )
        # scores do not depend on the batching: one direct call's, to float rounding
        assert_that(scored | beam.combiners.ToList(), _close_to(expected_ll), label="Scores")
        assert_that(
            rejected,
            equal_to([RejectReason.ALL_FEATURES_MISSING.value, "non_finite_value"]),
            label="Rejected",
        )


def _close_to(expected: dict):
    def check(lists):
        got = dict(lists[0])
        assert got.keys() == expected.keys(), f"{len(got)} ids, expected {len(expected)}"
        keys = sorted(expected)
        np.testing.assert_allclose([got[k] for k in keys], [expected[k] for k in keys], rtol=1e-12)

    return check


def test_read_parquet_tables_projects_and_names_a_corrupt_file(workspace, tmp_path):
    good = next((workspace / "holdout").glob("*.parquet"))

    def check(lists):
        [tables] = lists
        assert sum(n for _, n in tables) == 5_000
        assert all(columns == ["record_id", "amount"] for columns, _ in tables)

    with TestPipeline() as p:
        tables = p | beam.Create([str(good)]) | ReadParquetTables(["record_id", "amount"])
        shapes = tables | beam.Map(lambda t: (t.column_names, t.num_rows))
        assert_that(shapes | beam.combiners.ToList(), check)
    data = good.read_bytes()
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(data[:4] + bytes(footer - 4) + data[footer:])  # pages zeroed, footer intact
    with pytest.raises(CorruptInputError, match="bad.parquet"):
        with TestPipeline() as p:
            _ = p | beam.Create([str(bad)]) | ReadParquetTables(["record_id", "amount"])


def test_run_inference_with_the_model_handler(trained, holdout, scorer):
    job, _ = trained
    handler = VaewatchModelHandler(MODEL, job.tracking_uri, model_version="transactions/1")
    assert len(pickle.dumps(handler)) < 4096  # settings only: the model is loaded on the worker
    expected = scorer.score(holdout).aligned()
    records = holdout.slice(0, 40).to_pylist()
    rows = [beam.Row(**r) for r in records[:20]]  # beam.Row examples, and dicts below

    def check_tables(results):
        [result] = results
        assert result.inference.column_names == [*SCORE_COLUMNS, REASON_COLUMN]
        got = result.inference["log_likelihood"].to_numpy(zero_copy_only=False)
        want = expected["log_likelihood"].to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(got, want)  # nan where rejected, in both
        assert result.inference[REASON_COLUMN].to_pylist()[-2:] == [
            "all_features_missing",
            "non_finite_value",
        ]

    def check_records(results):
        # a record goes through Python values (an int32 column comes back int64, a float32
        # one float64), so its score may differ from the table's in the last float32 digits
        got = {_field(r.example, "record_id"): r.inference for r in results}
        ids = holdout["record_id"].to_pylist()[:40]
        assert sorted(got) == sorted(ids)
        want = expected.slice(0, 40).to_pylist()
        np.testing.assert_allclose(
            [got[i]["log_likelihood"] for i in ids], [w["log_likelihood"] for w in want], rtol=1e-6
        )
        assert [got[i]["is_anomaly"] for i in ids] == [w["is_anomaly"] for w in want]

    with TestPipeline() as p:
        tables = p | "Tables" >> beam.Create([holdout], reshuffle=False)
        from_tables = tables | "InferTables" >> RunInference(handler)
        assert_that(from_tables | "AllTables" >> beam.combiners.ToList(),
                    lambda lists: check_tables(lists[0]), label="Tables")  # fmt: skip
        examples = (
            p | "Rows" >> beam.Create(rows),
            p | "Dicts" >> beam.Create(records[20:]),
        ) | beam.Flatten()
        from_rows = examples | "InferRecords" >> RunInference(handler)
        assert_that(from_rows | "AllRecords" >> beam.combiners.ToList(),
                    lambda lists: check_records(lists[0]), label="Records")  # fmt: skip


def _field(example, name):
    return example[name] if isinstance(example, dict) else getattr(example, name)


def test_beam_anomaly_detection_with_the_vaewatch_detector(trained, holdout, scorer):
    job, outcome = trained
    detector = vaewatch_detector(MODEL, job.tracking_uri, model_version="transactions/1")
    threshold = outcome.artifact.calibration.threshold()
    expected = scorer.score(holdout).aligned().to_pylist()
    want = dict(zip(holdout["record_id"].to_pylist(), expected, strict=True))

    def check(lists):
        got = {}
        for key, result in lists[0]:
            assert isinstance(result, AnomalyResult)
            [prediction] = result.predictions
            assert prediction.threshold == threshold
            got[key] = prediction
        assert sorted(got) == sorted(want)
        scored = [k for k in want if want[k]["anomaly_score"] is not None]
        np.testing.assert_allclose(
            [got[k].score for k in scored], [want[k]["anomaly_score"] for k in scored], rtol=1e-6
        )
        assert [got[k].label for k in scored] == [int(want[k]["is_anomaly"]) for k in scored]
        assert sum(got[k].label for k in scored) > 5  # the holdout holds flagged records
        rejected = [k for k in want if k not in scored]
        assert [(got[k].score, got[k].label, got[k].info) for k in rejected] == [
            (None, None, "all_features_missing"),
            (None, None, "non_finite_value"),
        ]

    features = [c for c in holdout.column_names if c != "record_id"]
    with TestPipeline() as p:
        keyed = (
            p
            | beam.Create(holdout.to_pylist())
            | beam.Map(lambda r: (r["record_id"], beam.Row(**{f: r[f] for f in features})))
        )
        results = keyed | AnomalyDetection(detector)
        assert_that(results | beam.combiners.ToList(), check)


def test_a_file_of_the_wrong_types_is_rejected_as_schema_mismatch(trained, holdout):
    """Beam users apply ScoreRecords without vaewatch's launch-time schema check: a batch
    whose columns cannot be read as the model's types is rejected whole, with the reason."""
    table = holdout.slice(0, 30)
    amounts = pa.array([f"{v} EUR" for v in table["amount"].to_pylist()])
    broken = table.set_column(table.schema.get_field_index("amount"), "amount", amounts)
    scored_schema = pa.schema([broken.schema.field("record_id"), *score_schema(8)])
    job, _ = trained
    with TestPipeline() as p:
        outputs = (
            p
            | beam.Create([broken], reshuffle=False)
            | ScoreRecords(
                ModelSettings(MODEL, job.tracking_uri, model_version="transactions/1"),
                input_schema=broken.schema,
                scored_schema=scored_schema,
                keep=["record_id"],
            )
        )
        reasons = outputs[REJECTED_TAG] | beam.FlatMap(lambda t: t[REASON_COLUMN].to_pylist())
        scored = outputs[SCORED_TAG] | "Scored" >> beam.FlatMap(lambda t: [t.num_rows])
        assert_that(
            reasons | beam.combiners.ToList(),
            lambda lists: (
                len(lists[0]) == 30
                and all(r.startswith("schema_mismatch: ") and "amount" in r for r in lists[0])
                or pytest.fail(f"reasons {lists[0][:3]}")
            ),
            label="Reasons",
        )
        assert_that(scored, equal_to([]), label="NothingScored")


def test_an_id_the_output_type_cannot_hold_is_rejected_not_lost(trained, holdout):
    """The output declares record_id int32; rows whose id does not fit are rejected with
    keep_column_not_castable (their input values kept), the others scored."""
    table = holdout.slice(0, 30)
    ids = pa.array([2**40 + i if i % 3 == 0 else i for i in range(30)], pa.int64())
    table = table.set_column(table.schema.get_field_index("record_id"), "record_id", ids)
    scored_schema = pa.schema([pa.field("record_id", pa.int32()), *score_schema(8)])
    job, _ = trained
    with TestPipeline() as p:
        outputs = (
            p
            | beam.Create([table.slice(0, 15), table.slice(15)], reshuffle=False)
            | ScoreRecords(
                ModelSettings(MODEL, job.tracking_uri, model_version="transactions/1"),
                input_schema=table.schema,
                scored_schema=scored_schema,
                keep=["record_id"],
                batch_size=15,
            )
        )
        rejected = outputs[REJECTED_TAG] | beam.FlatMap(
            lambda t: zip(t["record_id"].to_pylist(), t[REASON_COLUMN].to_pylist(), strict=True)
        )
        scored = outputs[SCORED_TAG] | "Ids" >> beam.FlatMap(lambda t: t["record_id"].to_pylist())
        assert_that(
            rejected | "RejectedIds" >> beam.Map(lambda pair: pair[0]),
            equal_to([i for i in ids.to_pylist() if i >= 2**31]),
            label="Rejected",
        )
        assert_that(
            rejected | "Codes" >> beam.Map(lambda pair: pair[1].split(":")[0]),
            equal_to([RejectReason.KEEP_COLUMN_NOT_CASTABLE.value] * 10),
            label="Codes",
        )
        assert_that(scored, equal_to([i for i in range(30) if i % 3]), label="Scored")


def test_score_parquet_in_a_user_pipeline(trained, workspace, tmp_path):
    """The whole read -> score -> write composite applied by a Beam user: file paths in, the
    written scored and rejected files out, every input row in exactly one of them."""
    import pyarrow.dataset as ds

    from vaewatch.pipeline.score import ScoreParquet

    job, _ = trained
    source = next((workspace / "holdout").glob("*.parquet"))
    input_schema = pq.read_schema(source)
    scored_schema = pa.schema([input_schema.field("record_id"), *score_schema(8)])
    with TestPipeline() as p:
        written = (
            p
            | beam.Create([str(source)])
            | ScoreParquet(
                ModelSettings(MODEL, job.tracking_uri, model_version="transactions/1"),
                input_schema=input_schema,
                scored_schema=scored_schema,
                scored_prefix=str(tmp_path / "scored" / "part"),
                rejected_prefix=str(tmp_path / "rejected" / "part"),
                keep=["record_id"],
                batch_size=1_000,
            )
        )
        assert_that(
            written[SCORED_TAG] | beam.combiners.Count.Globally(),
            lambda counts: counts[0] >= 1 or pytest.fail(f"no scored file written: {counts}"),
        )
    scored = ds.dataset(str(tmp_path / "scored"), format="parquet").to_table()
    assert sorted(scored["record_id"].to_pylist()) == sorted(
        pq.read_table(source, columns=["record_id"])["record_id"].to_pylist()
    )
    assert scored.schema.names == scored_schema.names
