"""Arrow tables as Beam elements (pipeline/tables.py): the coder the pipeline's PCollections of
tables get, and the overlapped Parquet writer."""

import gc
import io
import weakref

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from vaewatch.model.contract import score_schema
from vaewatch.pipeline.batching import Rebatch
from vaewatch.pipeline.tables import (
    PARQUET_CODEC,
    ArrowTableCoder,
    _OverlappedWriter,
    string_columns,
)
from vaewatch.pipeline.transforms import ReadParquetTables


def _scored(n: int, seed: int = 0) -> pa.Table:
    """A table of the output contract's score columns (latent size 3) plus a string id."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([pa.field("id", pa.string()), *score_schema(3)])
    columns = {"id": pa.array([f"r{i}" for i in range(n)])}
    for field in score_schema(3):
        if pa.types.is_dictionary(field.type):  # model_version, baseline
            columns[field.name] = pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, np.int32)), pa.array(["7"])
            )
        elif pa.types.is_fixed_size_list(field.type):
            flat = pa.array(rng.normal(size=3 * n).astype(np.float32))
            columns[field.name] = pa.FixedSizeListArray.from_arrays(flat, type=field.type)
        elif pa.types.is_list(field.type):
            columns[field.name] = pa.array(
                [[{"feature": "amount", "contribution": float(v)}] for v in rng.normal(size=n)],
                field.type,
            )
        elif pa.types.is_boolean(field.type):
            columns[field.name] = pa.array(rng.random(n) < 0.1)
        else:
            columns[field.name] = pa.array(rng.normal(size=n), field.type)
    return pa.table(columns, schema=schema).replace_schema_metadata({b"vaewatch.k": b"24"})


def test_the_coder_round_trips_every_column_type_and_estimates_without_encoding(monkeypatch):
    table = _scored(50)
    with_nulls = pa.table({"x": pa.array([1.5, None, 3.0]), "s": pa.array(["a", None, "c"])})
    coder = beam.coders.registry.get_coder(pa.Table)
    assert isinstance(coder, ArrowTableCoder)
    for t in (table, table.slice(10, 20), with_nulls, table.schema.empty_table()):
        back = coder.decode(coder.encode(t))
        assert back.equals(t) and back.schema.metadata == t.schema.metadata
    # the size Beam samples for its metrics comes from the buffers: nothing is serialised
    monkeypatch.setattr(ArrowTableCoder, "encode", lambda self, t: 1 / 0)
    assert coder.get_impl().estimate_size(table) == table.nbytes > 0


def test_the_pipelines_tables_travel_with_the_arrow_coder(tmp_path):
    """ReadParquetTables and Rebatch declare pa.Table, so Beam gives their PCollections the
    Arrow coder instead of pickling each table (and each sampled size estimate)."""
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"v": list(range(30))}), path)
    with TestPipeline() as p:
        tables = p | beam.Create([str(path)], reshuffle=False) | ReadParquetTables(["v"])
        batches = tables | Rebatch(7)
        for pcoll in (tables, batches):
            assert pcoll.element_type is pa.Table
            coder = beam.coders.registry.get_coder(pcoll.element_type)
            assert isinstance(coder, ArrowTableCoder)
        rows = batches | beam.Map(lambda t: t.num_rows) | beam.combiners.ToList()
        assert_that(rows, _sorted_is([2, 7, 7, 7, 7]))


def _sorted_is(expected):
    def check(got):
        assert sorted(got[0]) == expected, got

    return check


def test_string_columns_are_the_byte_array_leaves():
    assert string_columns(_scored(1).schema) == [
        "id",
        "top_features.list.element.feature",
        "top_features.list.element.basis",
        "top_features.list.element.direction",
        "top_features.list.element.observed",
        "top_features.list.element.likely.list.element",
        "baseline",
        "model_version",
    ]
    assert string_columns(pa.schema([("x", pa.float64())])) == []


class _Handle(io.BytesIO):
    """A file that fails like a full disk once `limit` bytes are written."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.limit = limit
        self.written = 0

    def write(self, data) -> int:
        self.written += len(data)
        if self.limit is not None and self.written > self.limit:
            raise OSError(28, "No space left on device")
        return super().write(data)

    def close(self) -> None:
        self.final = self.getvalue()
        super().close()


def _writer(handle: _Handle, schema: pa.Schema) -> _OverlappedWriter:
    return _OverlappedWriter(pq.ParquetWriter(handle, schema, compression=PARQUET_CODEC), handle)


def test_the_overlapped_writer_keeps_the_order_of_its_tables():
    tables = [_scored(500, seed=s) for s in range(6)]
    handle = _Handle()
    writer = _writer(handle, tables[0].schema)
    for table in tables:
        writer.write(table)
    writer.close()
    assert handle.closed
    back = pq.read_table(pa.BufferReader(handle.final))
    assert back.column("id").to_pylist() == pa.concat_tables(tables).column("id").to_pylist()
    assert pq.ParquetFile(pa.BufferReader(handle.final)).metadata.num_row_groups == 6


def test_a_failed_background_write_is_raised_and_the_file_closed():
    """The write runs on a thread: its error must reach the bundle (Beam then retries it and
    discards the temporary file), from the next write or from close, never be dropped, and the
    failed writer must go with the error, not linger in a reference cycle."""
    tables = [_scored(2_000, seed=s) for s in range(4)]
    handle = _Handle(limit=30_000)  # less than one table's worth
    writer = _writer(handle, tables[0].schema)
    with pytest.raises(OSError, match="No space left") as raised:
        for table in tables:
            writer.write(table)
        writer.close()
    assert handle.closed
    writer.close()  # Beam may close it again: nothing left to do, nothing raised
    with pytest.raises(ValueError, match="closed"):
        writer.write(tables[0])
    alive = weakref.ref(writer)
    gc.disable()
    try:
        del writer, raised
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("redistribute", [True, False])
def test_files_are_read_whole_with_or_without_redistribution(tmp_path, redistribute):
    """Without redistribution (a single worker) a path element is split and read in place;
    both graphs read every row of every row group once."""
    for i in range(2):
        pq.write_table(
            pa.table({"v": list(range(i * 1_000, (i + 1) * 1_000))}),
            tmp_path / f"in{i}.parquet",
            row_group_size=90,
        )
    paths = sorted(str(p) for p in tmp_path.glob("*.parquet"))
    with TestPipeline() as p:
        tables = (
            p
            | beam.Create(paths, reshuffle=False)
            | ReadParquetTables(["v"], redistribute=redistribute)
        )
        values = tables | beam.FlatMap(lambda t: t["v"].to_pylist()) | beam.combiners.ToList()
        assert_that(values, _sorted_is(list(range(2_000))))
    labels = _labels(p)
    assert any("Redistribute" in label for label in labels) == redistribute, labels


def _labels(pipeline) -> list[str]:
    found = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node):
            found.append(node.full_label)

        def visit_transform(self, node):
            found.append(node.full_label)

    pipeline.visit(Visitor())
    return found
