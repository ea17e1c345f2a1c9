"""Arrow tables as Beam elements: how they travel between stages and how they land in Parquet.

- `ArrowTableCoder`, registered for `pa.Table`: Arrow's IPC stream format on the wire, and a
  size estimate from the table's buffers. Beam samples every PCollection's elements to estimate
  their encoded size (for its metrics and, on Dataflow, autoscaling); with no coder for the type
  it pickles each sampled table to measure it, which for 64k-row tables cost a K=1 job more
  time than its own Parquet reads (bench/notes/). A transform that emits tables declares
  `.with_output_types(pa.Table)` to get this coder.
- `open_parquet`: a Parquet file written table by table as row groups, with dictionary
  encoding only for the string columns. pyarrow's default tries a dictionary for every column
  and, for high-cardinality floats (scores, latent codes), builds one per row group only to
  fall back to plain encoding: on the scored table that is 2-3x the write time, for a larger
  file. Each open file encodes and compresses on a thread of its own, one table behind the
  bundle (`_OverlappedWriter`). The output sink (pipeline/outputs.py) writes with it.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

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
    # cached by the columns alone: metadata does not change the paths, and pyarrow before 20
    # cannot hash a schema that has metadata (found by make test-oldest, pyarrow 14)
    return _string_columns(schema.remove_metadata())


@functools.lru_cache(maxsize=64)
def _string_columns(schema: pa.Schema) -> list[str]:
    empty = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), empty)
    parquet = pq.ParquetFile(pa.BufferReader(empty.getvalue())).schema
    return [
        parquet.column(i).path
        for i in range(len(parquet))
        if parquet.column(i).physical_type == "BYTE_ARRAY"
    ]


class _OverlappedWriter:
    """One open shard: a `pq.ParquetWriter` and the file it writes, fed from a thread.

    pyarrow releases the GIL while it encodes and compresses a table, so the write of one table
    runs while the bundle reads, encodes and scores the next, on a core the single-threaded
    stretches of that work leave idle. At most one table is in flight (`write` waits for the
    previous one first), so memory grows by one table, and tables are written in the order
    given. A failed write is raised by the next `write` or by `close`, never dropped, and the
    file is closed then (Beam fails the bundle and discards the shard's temporary file).
    """

    def __init__(self, writer: pq.ParquetWriter, handle):
        self._writer, self._handle = writer, handle
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    def _write(self, table: pa.Table) -> None:
        try:
            self._writer.write_table(table)
        except BaseException as err:  # raised on the bundle's thread by _wait
            self._error = err

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            self._abandon()
            try:
                raise error
            finally:
                del error  # no cycle through this frame (see `_abandon`)

    def _abandon(self) -> None:
        """After a failed write or close the file is garbage: close what can be closed (the
        caller raises the original error). The error's traceback holds pyarrow's writer, whose
        destructor tries
        to finish the file; with no reference cycle it runs when the error is dropped, against
        a closed handle, rather than in some later garbage collection inside unrelated code
        (where, on Python 3.11, it broke `compile` with "AST constructor recursion depth
        mismatch")."""
        self._closed = True
        with contextlib.suppress(Exception):
            self._writer.close()
        self._writer.is_open = False  # pyarrow's __del__ would close (and raise) again
        with contextlib.suppress(Exception):
            self._handle.close()

    def write(self, table: pa.Table) -> None:
        if self._closed:
            raise ValueError("write to a closed Parquet shard")
        self._wait()
        self._thread = threading.Thread(
            target=self._write, args=(table,), name="vaewatch-parquet-write", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._wait()  # a failed last write raises here, the file already abandoned
        try:
            self._writer.close()
        except BaseException:
            self._abandon()
            raise
        self._closed = True
        self._handle.close()


def open_parquet(path: str, schema: pa.Schema) -> _OverlappedWriter:
    """A new Parquet file at `path` (any Beam file system), zstd, dictionaries for the string
    columns only, written from a thread of its own."""
    handle = FileSystems.create(
        path, mime_type="application/x-parquet", compression_type=CompressionTypes.UNCOMPRESSED
    )  # compressed per page instead
    try:
        writer = pq.ParquetWriter(
            handle, schema, compression=PARQUET_CODEC, use_dictionary=string_columns(schema)
        )
    except BaseException:
        handle.close()
        raise
    return _OverlappedWriter(writer, handle)
