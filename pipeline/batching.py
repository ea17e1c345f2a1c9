"""`Rebatch`: Arrow tables -> tables of at most `rows` rows, as one DoFn.

The tables are held per window within a bundle and cut into full `rows`-row tables as they
arrive; what is left when the bundle ends goes out as one smaller table. A table whose schema
differs from the held ones (a file with other column types) is never merged with them: the held
rows go out first, so its rows are scored, or rejected, in its own types.

One DoFn rather than Beam's `BatchElements` between a split and a concatenation: every DoFn in
a graph costs the launcher a signature inspection of each of its methods, several times per
job, which at small K is a visible part of a `vaewatch score` (bench/notes/).
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa
from apache_beam.utils.windowed_value import WindowedValue

from vaewatch.pipeline.tables import ArrowTableCoder  # noqa: F401  (registered for pa.Table)


class _Held:
    """The tables of one window waiting to be emitted, and their row count."""

    def __init__(self) -> None:
        self.tables: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.tables.append(table)
        self.rows += table.num_rows

    def same_schema(self, table: pa.Table) -> bool:
        return not self.tables or table.schema.equals(self.tables[0].schema, check_metadata=False)

    def take(self, rows: int | None = None) -> pa.Table:
        """The first `rows` held rows (all of them: None) as one table; the rest stay held."""
        whole = pa.concat_tables(self.tables)
        rows = whole.num_rows if rows is None else rows
        rest = whole.slice(rows)
        self.tables, self.rows = ([rest] if rest.num_rows else []), rest.num_rows
        return whole.slice(0, rows)


class _RebatchFn(beam.DoFn):
    def __init__(self, rows: int):
        self._rows = rows
        self._held: dict = {}

    def start_bundle(self) -> None:
        self._held = {}

    def process(self, table: pa.Table, window=beam.DoFn.WindowParam) -> Iterator[pa.Table]:
        held = self._held.setdefault(window, _Held())
        if not held.same_schema(table):
            yield held.take()
        held.add(table)
        while held.rows >= self._rows:
            yield held.take(self._rows)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for window, held in self._held.items():
            if held.rows:
                yield WindowedValue(held.take(), window.max_timestamp(), (window,))
        self._held = {}


class Rebatch(beam.PTransform):
    """Arrow tables -> tables of at most `rows` rows, for large model calls and row groups."""

    def __init__(self, rows: int):
        super().__init__()
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self._rows = rows

    def expand(self, tables):
        return tables | "Rebatch" >> beam.ParDo(_RebatchFn(self._rows)).with_output_types(pa.Table)
