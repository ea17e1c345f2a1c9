"""The output sink (pipeline/outputs.py): scored and rejected tables and the day's drift
statistics written by one DoFn per bundle and finalised once."""

import dataclasses
import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from tests.pipeline.test_tables import _scored
from vaewatch.model.calibration.drift import Reference
from vaewatch.pipeline.commit import TEMP_PREFIX
from vaewatch.pipeline.drift import DayStatsOf
from vaewatch.pipeline.outputs import Output, WriteOutputs, Written, _finalize
from vaewatch.pipeline.tables import PARQUET_CODEC

REJECTED = pa.schema([("id", pa.string()), ("amount", pa.float64()), ("reason", pa.string())])
QUANTILES = (-1.0, 0.0, 0.5, 1.5)
REFERENCE = Reference(
    levels=(0.1, 0.5, 0.7, 0.9),
    quantiles=QUANTILES,
    threshold_quantile=0.9,
    expected_rate=0.1,
    rows=1_000,
    features=("amount", "merchant", "hour"),
    shares=None,
)


def _rejected(n: int, start: int = 0) -> pa.Table:
    ids = [f"bad{i}" for i in range(start, start + n)]
    return pa.table(
        {"id": ids, "amount": [float("inf")] * n, "reason": ["non_finite_value"] * n},
        schema=REJECTED,
    )


def _write(tmp_path, tables, **options):
    scored_schema = _scored(1).schema
    sink = WriteOutputs(
        {
            "scored": Output(str(tmp_path / "out" / "part"), scored_schema),
            "rejected": Output(str(tmp_path / "out" / "_rejected" / "part"), REJECTED),
        },
        stats=(DayStatsOf(REFERENCE), str(tmp_path / "out" / "stats.json")),
        stats_tag="scored",
        **options,
    )
    with TestPipeline() as p:
        scored = p | "Scored" >> beam.Create(
            [t for t in tables if "reason" not in t.column_names], reshuffle=False
        ).with_output_types(pa.Table)
        rejected = p | "Rejected" >> beam.Create(
            [t for t in tables if "reason" in t.column_names], reshuffle=False
        ).with_output_types(pa.Table)
        _ = {"scored": scored, "rejected": rejected} | sink
    return tmp_path / "out"


def _ids(paths) -> list[str]:
    return sorted(i for p in paths for i in pq.read_table(p)["id"].to_pylist())


def _with_top(table: pa.Table, names: list[str]) -> pa.Table:
    """`table` with each row's top_features naming `names[i]` (a known feature or not)."""
    field = table.schema.field("top_features")
    top = pa.array([[{"feature": f, "contribution": 1.0}] for f in names], field.type)
    return table.set_column(table.schema.get_field_index("top_features"), field, top)


def test_scored_and_rejected_rows_land_once_each_with_the_days_statistics(tmp_path):
    features = ["amount", "merchant", "hour", "unknown"]
    scored = [
        _with_top(_scored(n, seed=s), [features[i % 4] for i in range(n)])
        for s, n in enumerate((700, 45, 1_300))
    ]
    rejected = [_rejected(3), _rejected(4, start=3)]
    out = _write(tmp_path, [scored[0], rejected[0], scored[1], rejected[1], scored[2]])

    files = sorted(out.glob("part-*.parquet"))
    bad = sorted((out / "_rejected").glob("part-*.parquet"))
    assert files and bad
    n = len(files)
    assert [f.name for f in files] == [f"part-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    everything = pa.concat_tables(scored)
    assert _ids(files) == sorted(everything["id"].to_pylist())
    assert _ids(bad) == sorted(f"bad{i}" for i in range(7))
    assert not list(out.rglob(f"{TEMP_PREFIX}*"))

    # the statistics, counted here from the rows themselves
    scores = everything["anomaly_score"].to_numpy()
    named = [features[i % 4] for t in scored for i in range(t.num_rows)]
    flagged = everything["is_anomaly"].to_numpy()
    unflagged = [f for f, flag in zip(named, flagged, strict=True) if not flag]
    stats = json.loads((out / "stats.json").read_text())
    assert stats == {
        "rows": everything.num_rows,
        "flagged": int(flagged.sum()),
        "below": [int((scores <= q).sum()) for q in QUANTILES],
        "feature_counts": [named.count(f) for f in REFERENCE.features],
        "unflagged_counts": [unflagged.count(f) for f in REFERENCE.features],
        "segments": {},  # a model without per-segment baselines
    }


def test_small_tables_are_written_as_large_row_groups_with_string_dictionaries(tmp_path):
    """Tables are held per output until `chunk_rows` rows are there: a small batch size does
    not make small row groups. Only string columns are dictionary-encoded (pyarrow's default
    tries every column and falls back on the floats, slower and larger)."""
    tables = [_scored(30, seed=s) for s in range(10)]
    out = _write(tmp_path, tables, chunk_rows=100)
    (written,) = out.glob("part-*.parquet")
    meta = pq.ParquetFile(written).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == 300 and all(s >= 100 for s in sizes[:-1]), sizes
    back = pq.read_table(written)
    assert back.schema.metadata[b"vaewatch.k"] == b"24"
    expected = pa.concat_tables(tables)
    key = [("log_likelihood", "ascending")]
    assert back.sort_by(key).equals(expected.sort_by(key).cast(back.schema))
    group = meta.row_group(0)
    for i in range(group.num_columns):
        column = group.column(i)
        dictionary = any("DICTIONARY" in e for e in column.encodings)
        assert dictionary == (column.physical_type == "BYTE_ARRAY"), column.path_in_schema
        assert column.compression == PARQUET_CODEC.upper()


def test_shards_give_exactly_that_many_scored_files(tmp_path):
    tables = [_scored(50, seed=s) for s in range(2)]
    out = _write(tmp_path, [*tables, _rejected(2)], shards=3, sharded="scored")
    files = sorted(out.glob("part-*.parquet"))
    assert [f.name for f in files] == [f"part-{i:05d}-of-00003.parquet" for i in range(3)]
    assert sorted(pq.ParquetFile(f).metadata.num_rows for f in files) == [0, 50, 50]
    assert _ids(files) == sorted(pa.concat_tables(tables)["id"].to_pylist())
    assert _ids((out / "_rejected").glob("part-*.parquet")) == ["bad0", "bad1"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows"] == 100


def test_no_rows_at_all_still_give_each_output_a_readable_empty_file(tmp_path):
    out = _write(tmp_path, [])
    (scored,) = out.glob("part-*.parquet")
    (rejected,) = (out / "_rejected").glob("part-*.parquet")
    assert pq.read_table(scored).schema.equals(_scored(1).schema, check_metadata=False)
    assert pq.read_table(rejected).num_rows == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats == {"rows": 0, "flagged": 0, "below": [0] * 4, "feature_counts": [0] * 3,
                     "unflagged_counts": [0] * 3, "segments": {}}  # fmt: skip


def test_finalising_renames_only_what_succeeded_and_may_run_again(tmp_path):
    """A retried bundle's temporary file is not in any `Written` record: it is never renamed,
    and goes with the temporary folder. A second run of the step (a runner's retry) finds the
    files renamed and leaves them, with the same names and statistics."""
    sink = WriteOutputs(
        {"scored": Output(str(tmp_path / "out" / "part"), _scored(1).schema)},
        stats=(DayStatsOf(REFERENCE), str(tmp_path / "out" / "stats.json")),
        stats_tag="scored",
    )._sink
    temp = tmp_path / "out" / f"{TEMP_PREFIX}x"
    temp.mkdir(parents=True)
    sink = dataclasses.replace(sink, temp_dir=str(temp))
    tables = {name: _scored(10, seed=i) for i, name in enumerate(("a", "b", "failed"))}
    for name, table in tables.items():
        pq.write_table(table, temp / f"{name}.parquet")
    of = DayStatsOf(REFERENCE)
    written = [
        Written("scored", str(temp / f"{name}.parquet"), of.add(of.empty(), tables[name]))
        for name in ("b", "a")
    ]
    first = list(_finalize(None, sink, {}, written))
    again = list(_finalize(None, sink, {}, written))
    paths = [o.value for o in first if o.tag == "scored"]
    assert paths == [o.value for o in again if o.tag == "scored"]
    assert [p.rsplit("/", 1)[1] for p in paths] == ["part-00000-of-00002.parquet",
                                                     "part-00001-of-00002.parquet"]  # fmt: skip
    assert _ids(paths) == sorted(tables["a"]["id"].to_pylist() + tables["b"]["id"].to_pylist())
    assert not temp.exists()
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows"] == 20


def test_a_table_of_another_schema_is_refused_by_name(tmp_path):
    with pytest.raises(Exception, match=r"'scored' output has columns \['x'\], not the output's"):
        _write(tmp_path, [_scored(5), pa.table({"x": [1.0]})])


def test_every_written_file_is_a_complete_zstd_parquet_file(tmp_path):
    out = _write(tmp_path, [_scored(2_000, seed=1), _rejected(5)], chunk_rows=512)
    for path in [*out.glob("part-*.parquet"), *(out / "_rejected").glob("part-*.parquet")]:
        meta = pq.ParquetFile(path).metadata  # a footer: the file was closed
        assert meta.num_rows in (2_000, 5)
        assert meta.row_group(0).column(0).compression == "ZSTD"
    np.testing.assert_array_equal(
        np.sort(pq.read_table(next(out.glob("part-*.parquet")))["log_likelihood"].to_numpy()),
        np.sort(_scored(2_000, seed=1)["log_likelihood"].to_numpy()),
    )
