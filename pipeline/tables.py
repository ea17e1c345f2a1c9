"""Arrow tables as Beam elements: how they travel between stages and how they land in Parquet.

- `ArrowTableCoder`, registered for `pa.Table`: Arrow's IPC stream format on the wire, and a
  size estimate from the table's buffers. Beam samples every PCollection's elements to estimate
  their encoded size (for its metrics and, on Dataflow, autoscaling); with no coder for the type
  it pickles each sampled table to measure it, which for 64k-row tables cost a K=1 job more
  time than its own Parquet reads (bench/RESULTS.md). A transform that emits tables declares
  `.with_output_types(pa.Table)` to get this coder.
- `WriteParquetTables`: Beam's file sink writing each table as row groups, with dictionary
  encoding only for the string columns. pyarrow's default tries a dictionary for every column
  and, for high-cardinality floats (scores, latent codes), builds one per row group only to
  fall back to plain encoding: on the scored table that is 2-3x the write time, for a larger
  file.
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes

PARQUET_CODEC = "zstd"  # Beam's default is no compression


class ArrowTableCoder(beam.coders.Coder):
    """pa.Table <-> Arrow IPC stream bytes; sizes estimated without encoding."""

    def encode(self, table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    def decode(self, encoded: bytes) -> pa.Table:
        return pa.ipc.open_stream(pa.py_buffer(encoded)).read_all()

    def estimate_size(self, table: pa.Table) -> int:
        return table.nbytes

    def is_deterministic(self) -> bool:
        return False  # batch boundaries and chunking are not canonical; never a key

    def to_type_hint(self):
        return pa.Table

    def __eq__(self, other) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


beam.coders.registry.register_coder(pa.Table, ArrowTableCoder)


def string_columns(schema: pa.Schema) -> list[str]:
    """The Parquet column paths of `schema`'s string and binary leaves (nested ones included,
    e.g. `top_features.list.element.feature`), as the writer names them."""
    empty = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), empty)
    parquet = pq.ParquetFile(pa.BufferReader(empty.getvalue())).schema
    return [
        parquet.column(i).path
        for i in range(len(parquet))
        if parquet.column(i).physical_type == "BYTE_ARRAY"
    ]


class _ParquetTableSink(filebasedsink.FileBasedSink):
    """Each element, a pa.Table of the sink's schema, appended to the shard's Parquet file."""

    def __init__(self, file_path_prefix: str, schema: pa.Schema, *, num_shards: int):
        super().__init__(
            file_path_prefix,
            coder=None,
            file_name_suffix=".parquet",
            num_shards=num_shards,
            shard_name_template="-SSSSS-of-NNNNN",
            mime_type="application/x-parquet",
            compression_type=CompressionTypes.UNCOMPRESSED,  # compressed per page instead
        )
        self._schema = schema
        self._dictionary = string_columns(schema)

    def open(self, temp_path: str):
        """(the Parquet writer, the file it writes): each open file keeps its own handle."""
        handle = super().open(temp_path)
        writer = pq.ParquetWriter(
            handle, self._schema, compression=PARQUET_CODEC, use_dictionary=self._dictionary
        )
        return writer, handle

    def write_record(self, opened, table: pa.Table) -> None:
        opened[0].write_table(table)

    def close(self, opened) -> None:
        writer, handle = opened
        writer.close()
        handle.close()

    def display_data(self):
        return {**super().display_data(), "codec": PARQUET_CODEC, "schema": str(self._schema)}


class WriteParquetTables(beam.PTransform):
    """PCollection[pa.Table] -> Parquet files `prefix-SSSSS-of-NNNNN.parquet` (zstd), one row
    group per table or more; returns Beam's PCollection of the written file names.
    `num_shards=0` lets the runner decide."""

    def __init__(self, file_path_prefix: str, schema: pa.Schema, *, num_shards: int = 0):
        super().__init__()
        self._sink = _ParquetTableSink(file_path_prefix, schema, num_shards=num_shards)

    def expand(self, tables):
        return tables | beam.io.Write(self._sink)
