"""The scoring pipeline's DoFns and composite transforms. Arrow tables in, Arrow tables out.

Nothing here holds module-level state or local-only handles: DoFns carry plain settings and
load the model in `setup`, once per worker process (shared across threads with Beam's
`Shared`), so the same pipeline runs on the in-process runner, multi-processing workers,
Dataflow, Spark or Flink.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.shared import Shared
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from model.features import SchemaMismatchError
from model.scoring import REASON_COLUMN
from pipeline import faults

REJECTED_TAG = "rejected"
SCHEMA_MISMATCH = "schema_mismatch"
WRITE_CHUNK_ROWS = 65_536  # rows per written table: large row groups, few Python calls


class _ModelHandle:
    """What `Shared` hands out: the process's scorer (a weak-referenceable holder)."""

    def __init__(self, scorer):
        self.scorer = scorer


@dataclass(frozen=True)
class ModelSettings:
    """Which model a worker loads and how it scores: plain values, so the DoFn pickles small
    and `Shared` can key the process-wide scorer on it."""

    location: str  # a local model folder, or a pinned models:/NAME/VERSION URI
    tracking_uri: str
    model_version: str  # the label written to the model_version column
    k: int | None = None  # None: the model's defaults
    samples: int | None = None
    seed: int | None = None
    threshold_quantile: float | None = None

    def load(self):
        from model import registry
        from model.artifact import ModelArtifact
        from model.scoring import Scorer

        if self.location.startswith("models:/"):
            artifact = registry.load(self.location, self.tracking_uri).artifact
        else:
            artifact = ModelArtifact.load(self.location)
        return Scorer(
            artifact,
            model_version=self.model_version,
            device="auto",
            k=self.k,
            samples=self.samples,
            seed=self.seed,
            threshold_quantile=self.threshold_quantile,
        )


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table` to `schema` (files may differ in integer width or nullability)."""
    table = table.select(schema.names)
    if table.schema.equals(schema, check_metadata=False):
        return table
    return table.cast(schema)


class _Buffered(beam.DoFn):
    """Accumulates input tables within a bundle until `rows` rows, then handles them."""

    def __init__(self, rows: int):
        self._rows = rows
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def start_bundle(self):
        self._pending, self._pending_rows = [], 0

    def _take(self, table: pa.Table, final: bool) -> Iterator[pa.Table]:
        """Whole batches of `rows` rows (and the remainder when `final`). Tables of another
        schema (a file with other column types) are never merged: the pending rows go first."""
        if (
            table is not None
            and self._pending
            and not table.schema.equals(self._pending[0].schema, check_metadata=False)
        ):
            yield from self._take(None, final=True)
        if table is not None and table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
        if self._pending_rows == 0 or (self._pending_rows < self._rows and not final):
            return
        combined = pa.concat_tables(self._pending)
        cut = combined.num_rows if final else (combined.num_rows // self._rows) * self._rows
        for start in range(0, cut, self._rows):
            yield combined.slice(start, min(self._rows, cut - start))
        rest = combined.slice(cut)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows


class ScoreBatches(_Buffered):
    """Scores Arrow tables in batches of `batch_size` rows.

    Main output: the kept columns + the score columns (one table per batch). Tagged output
    `rejected`: the rows that cannot be scored, with their input columns and a `reason`.
    """

    def __init__(
        self,
        *,
        model: ModelSettings,
        batch_size: int,
        input_schema: pa.Schema,
        keep: Sequence[str],
        scored_schema: pa.Schema,
        rejected_schema: pa.Schema,
        torch_threads: int | None = None,
    ):
        super().__init__(batch_size)
        self._model = model
        self._input_schema = input_schema
        self._keep = list(keep)
        self._scored_schema = scored_schema
        self._rejected_schema = rejected_schema
        self._torch_threads = torch_threads
        self._shared = Shared()
        self._handle = None

    def setup(self):
        import torch

        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)
        self._handle = self._shared.acquire(
            lambda: _ModelHandle(self._model.load()), tag=repr(self._model)
        )

    def process(self, table: pa.Table):
        faults.point("read:batch")
        for batch in self._take(table, final=False):
            yield from self._score(batch)

    def finish_bundle(self):
        for batch in self._take(None, final=True):
            for out in self._score(batch):
                value = out.value if isinstance(out, beam.pvalue.TaggedOutput) else out
                windowed = WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(REJECTED_TAG, windowed)
                else:
                    yield windowed

    def _score(self, table: pa.Table):
        """Scores `table` in its own column types (the encoder reads any numeric width); only
        the kept and rejected columns are cast to the output schema."""
        try:
            result = self._handle.scorer.score(table)
            faults.point("score:batch")
        except (SchemaMismatchError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            # a file whose columns cannot be read as the model's types: all its rows rejected
            reasons = pa.array([f"{SCHEMA_MISMATCH}: {err}"] * table.num_rows, pa.string())
            yield beam.pvalue.TaggedOutput(REJECTED_TAG, self._rejected(table, reasons))
            return
        if result.scores.num_rows:
            kept = table.select(self._keep).take(pa.array(result.scored_rows))
            keep_schema = pa.schema([self._scored_schema.field(c) for c in self._keep])
            try:
                kept = _conform(kept, keep_schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                # e.g. an id that overflows the output's id type: these rows cannot be written
                rows = table.take(pa.array(result.scored_rows))
                reasons = pa.array([f"keep_column_not_castable: {err}"] * rows.num_rows)
                yield beam.pvalue.TaggedOutput(REJECTED_TAG, self._rejected(rows, reasons))
            else:
                columns = kept.columns + result.scores.columns
                yield pa.Table.from_arrays(columns, schema=self._scored_schema)
        if len(result.rejected_rows):
            rows = table.take(pa.array(result.rejected_rows))
            yield beam.pvalue.TaggedOutput(REJECTED_TAG, self._rejected(rows, result.reasons))

    def _rejected(self, rows: pa.Table, reasons: pa.Array) -> pa.Table:
        try:
            rows = _conform(rows, self._input_schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            rows = pa.Table.from_arrays(
                [pa.nulls(rows.num_rows, f.type) for f in self._input_schema],
                schema=self._input_schema,
            )  # the values do not fit the declared types; the reason says why
        return pa.Table.from_arrays([*rows.columns, reasons], schema=self._rejected_schema)


class Rechunk(_Buffered):
    """Re-chunks a stream of small tables into tables of at least `rows` rows (per bundle),
    so the Parquet writer makes large row groups. `crash_point` names the fault point reached
    after each chunk (the fused writer has written it into its temporary file by then)."""

    def __init__(self, rows: int, crash_point: str = ""):
        super().__init__(rows)
        self._crash_point = crash_point

    def process(self, table: pa.Table):
        for chunk in self._take(table, final=False):
            yield chunk
            faults.point(self._crash_point)

    def finish_bundle(self):
        for chunk in self._take(None, final=True):
            yield WindowedValue(chunk, MIN_TIMESTAMP, [GlobalWindow()])
            faults.point(self._crash_point)


def rejected_schema(input_schema: pa.Schema) -> pa.Schema:
    return pa.schema([*input_schema, pa.field(REASON_COLUMN, pa.string())])
