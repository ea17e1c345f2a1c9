"""The scoring pipeline's transforms: Parquet files -> Arrow tables -> scored / rejected tables.

Composite transforms a Beam user can apply in their own pipeline:

- `ReadParquetTables`: file paths -> Arrow tables (one per row-group batch), projected to the
  columns asked for; a file that does not decode fails with `CorruptInputError` naming it;
- `Rebatch` (pipeline/batching.py): Arrow tables -> tables of at most `rows` rows, never
  across a window or a bundle, never merging two schemas;
- `ScoreRecords`: Arrow tables -> a tuple of tagged outputs, `scored` (kept columns + score
  columns) and `rejected` (input columns + `reason`), the model loaded once per worker process.

Nothing here holds module-level state or local-only handles: DoFns carry plain settings and load
the model in `setup` (shared across threads with Beam's `Shared`), so the same transforms run on
the in-process runner, multi-processing workers, Dataflow, Spark or Flink.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared

from vaewatch.model import defaults, process, threads
from vaewatch.model._moved import deprecated_defaults
from vaewatch.model.contract import RejectReason, rejected_schema, score_schema
from vaewatch.model.data.features import SchemaMismatchError
from vaewatch.model.errors import UserError
from vaewatch.model.estimation.attribution import EXPLAINED_SHARE
from vaewatch.model.scoring import ScoringOverrides
from vaewatch.pipeline import faults, progress
from vaewatch.pipeline.batching import Rebatch

SCORED_TAG = "scored"
REJECTED_TAG = "rejected"
WRITE_CHUNK_ROWS = 65_536  # rows per written table: large row groups, few Python calls
READ_BATCH_ROWS = 65_536  # rows per table read from a file
ROW_GROUPS_PER_SPLIT = 4  # a large file is read by several workers, a few row groups each
METRICS_NAMESPACE = "vaewatch"
SOURCE_COLUMN = progress.SOURCE_COLUMN
_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


class CorruptInputError(UserError):
    """An input file whose data pages do not decode (its footer was fine at launch)."""

    @classmethod
    def of(cls, path: str, err: Exception) -> CorruptInputError:
        return cls(
            f"input file {path!r} cannot be read past its footer ({str(err).splitlines()[0]}); "
            "it is corrupt or was truncated while being written. Nothing was committed; replace "
            "or remove the file and re-run."
        )


@dataclass(frozen=True)
class ModelSettings:
    """Which model a worker loads and how it scores: plain values, so the DoFn pickles small
    and `Shared` can key the process-wide scorer on it."""

    location: str  # a local model folder, or a pinned models:/NAME/VERSION URI
    tracking_uri: str = ""  # needed for models:/ URIs
    model_version: str = ""  # the label written to the model_version column ("": the model's)
    overrides: ScoringOverrides = ScoringOverrides()  # K, seed, quantile; None: the model's
    precision: str = defaults.PRECISION  # auto | fp32 | bf16: the MLPs' matmuls

    def load_artifact(self):
        from vaewatch.model import registry
        from vaewatch.model.artifact import ModelArtifact

        if self.location.startswith("models:/"):
            return registry.load(self.location, self.tracking_uri).artifact
        return ModelArtifact.load(self.location)

    def load(self):
        from vaewatch.model.scoring import Scorer

        artifact = self.load_artifact()
        return Scorer(
            artifact,
            model_version=self.model_version or artifact.metadata.get("model_label", "vaewatch"),
            device="auto",
            precision=self.precision,
            overrides=self.overrides,
        )


class _ModelHandle:
    """What `Shared` hands out: the process's scorer (a weak-referenceable holder)."""

    def __init__(self, scorer):
        self.scorer = scorer


def check_schema(schema: pa.Schema, spec, keep: Sequence[str], where: str) -> None:
    """`schema` holds every feature of the model (`spec`) in a type it reads, and the `keep`
    columns; else a SchemaMismatchError naming `where`, the columns and the fix."""
    try:
        spec.check_schema(schema)
    except SchemaMismatchError as err:
        raise SchemaMismatchError(f"in {where}: {err}") from err
    missing = [c for c in keep if c not in schema.names]
    if missing:
        raise SchemaMismatchError(
            f"keep column(s) {missing} are not in {where}; its columns are {schema.names}"
        )


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table` to `schema` (files may differ in integer width or nullability)."""
    table = table.select(schema.names)
    if table.schema.equals(schema, check_metadata=False):
        return table
    return table.cast(schema)


# ------------------------------------------------------------------------------ reading
class _ReadRowGroups(beam.DoFn):
    """(path, [row group indices]), or a path to read whole, -> Arrow tables of at most
    READ_BATCH_ROWS rows; with `provenance`, each table carries SOURCE_COLUMN naming its split
    and the split's rows."""

    def __init__(self, columns: Sequence[str], provenance: bool = False):
        self._columns = list(columns)
        self._provenance = provenance

    def process(self, element: str | tuple[str, list[int]]) -> Iterator[pa.Table]:
        for split in _splits(element):
            yield from self._read(split)

    def _read(self, split: tuple[str, list[int]]):
        path, row_groups = split
        groups = f"row groups {row_groups[0]}-{row_groups[-1]}" if row_groups else "no row groups"
        rows, started = 0, time.time()
        try:
            with FileSystems.open(path) as handle:
                reader = pq.ParquetFile(handle)
                expected = sum(reader.metadata.row_group(g).num_rows for g in row_groups)
                source = progress.source_label(f"{path} ({groups})", expected, started)
                for batch in reader.iter_batches(
                    READ_BATCH_ROWS, row_groups=row_groups, columns=self._columns
                ):
                    if batch.num_rows:
                        rows += batch.num_rows
                        table = pa.Table.from_batches([batch])
                        if self._provenance:
                            table = table.append_column(
                                SOURCE_COLUMN, progress.source_column(source, batch.num_rows)
                            )
                        yield table
        except (pa.ArrowException, OSError) as err:
            raise CorruptInputError.of(path, err) from err
        progress.LOG.info("read %s (%s): %s rows", path, groups, f"{rows:,}")


def row_group_splits(path: str, row_groups: int | None = None) -> list[tuple[str, list[int]]]:
    """(path, [row group indices]) reads of a few row groups each; the footer is read here
    unless the caller already knows the number of row groups."""
    if row_groups is None:
        with FileSystems.open(path) as handle:
            row_groups = pq.ParquetFile(handle).metadata.num_row_groups
    return [
        (path, list(range(start, min(start + ROW_GROUPS_PER_SPLIT, row_groups))))
        for start in range(0, max(row_groups, 1), ROW_GROUPS_PER_SPLIT)
    ]


def _splits(element: str | tuple[str, list[int]]) -> list[tuple[str, list[int]]]:
    return row_group_splits(element) if isinstance(element, str) else [element]


class ReadParquetTables(beam.PTransform):
    """PCollection[str] of Parquet paths -> PCollection[pa.Table] projected to `columns`.
    Files are split by row groups and redistributed, so a large file is read in parallel.
    Elements may also be ready-made splits (`row_group_splits`), when the launcher has read
    the footers already.

    `redistribute=False` reads each element where it is, in turn: for a runner with a single
    worker, where a redistribution (Beam's `Reshuffle`: six transforms and a `GroupByKey`)
    has nowhere to send the splits and only adds to the job's fixed cost."""

    def __init__(self, columns: Sequence[str], provenance: bool = False, redistribute=True):
        super().__init__()
        self._columns = list(columns)
        self._provenance = provenance  # add SOURCE_COLUMN (ScoreRecords reports per split)
        self._redistribute = redistribute

    def expand(self, paths):
        if self._redistribute:
            paths = (
                paths
                | "SplitRowGroups" >> beam.FlatMap(_splits)
                | "Redistribute" >> beam.Reshuffle()
            )
        return paths | "ReadRowGroups" >> beam.ParDo(
            _ReadRowGroups(self._columns, self._provenance)
        ).with_output_types(pa.Table)


# ------------------------------------------------------------------------------ scoring
class ScoreBatches(beam.DoFn):
    """Scores each Arrow table it receives. Main output: the kept columns + the score columns;
    tagged output `rejected`: the rows that cannot be scored, input columns + `reason`."""

    def __init__(
        self,
        *,
        model: ModelSettings,
        input_schema: pa.Schema,
        keep: Sequence[str],
        scored_schema: pa.Schema,
        torch_threads: int | None = None,
        progress_seconds: float = progress.DEFAULT_INTERVAL,
    ):
        self._model = model
        self._progress_seconds = progress_seconds
        self._progress = None
        self._input_schema = input_schema
        self._keep = list(keep)
        self._scored_schema = scored_schema
        self._rejected_schema = rejected_schema(input_schema).with_metadata(scored_schema.metadata)
        self._torch_threads = torch_threads
        self._shared = Shared()
        self._handle = None
        self._rows_in = Metrics.counter(METRICS_NAMESPACE, "rows_in")
        self._rows_scored = Metrics.counter(METRICS_NAMESPACE, "rows_scored")
        self._rejected_at: list[np.ndarray] = []  # positions rejected in the current batch
        self._warned_unexplained = False

    def setup(self):
        process.keep_large_blocks()
        threads.apply(self._torch_threads or threads.threads_for(1))
        self._progress = progress.Progress(self._progress_seconds)
        self._handle = self._shared.acquire(
            lambda: _ModelHandle(self._model.load()), tag=repr(self._model)
        )

    def teardown(self):
        if self._progress is not None and self._progress.rows_in:
            self._progress.report(final=True)

    def process(self, table: pa.Table) -> Iterator[pa.Table]:
        # the rejected rows leave as TaggedOutput(REJECTED_TAG, table), typed by ScoreRecords
        faults.point("read:batch")
        sources = None
        if SOURCE_COLUMN in table.column_names:
            sources = table[SOURCE_COLUMN]
            table = table.drop_columns([SOURCE_COLUMN])
        self._rows_in.inc(table.num_rows)
        self._rejected_at = []
        outputs = list(self._process(table))
        scored = sum(o.num_rows for o in outputs if isinstance(o, pa.Table))
        self._progress.add(table.num_rows, scored, table.num_rows - scored)
        if sources is not None:
            self._progress.add_sources(sources, np.concatenate([[], *self._rejected_at]))
        yield from outputs

    def _process(self, table: pa.Table):
        try:
            result = self._handle.scorer.score(table)
            faults.point("score:batch")
        except (SchemaMismatchError, *_CAST_ERRORS) as err:
            # a file whose columns cannot be read as the model's types: all its rows rejected
            self._rejected_at.append(np.arange(table.num_rows))
            yield self._rejected(table, RejectReason.SCHEMA_MISMATCH, err)
            return
        if result.unexplained:
            self._unexplained(result.unexplained)
        if result.scores.num_rows:
            yield from self._scored(table, result)
        if len(result.rejected_rows):
            self._rejected_at.append(result.rejected_rows)
            rows = table.take(pa.array(result.rejected_rows))
            for reason, count in zip(*_counts(result.reasons), strict=True):
                Metrics.counter(METRICS_NAMESPACE, f"rows_rejected_{reason}").inc(count)
            yield beam.pvalue.TaggedOutput(REJECTED_TAG, self._with_reasons(rows, result.reasons))

    def _unexplained(self, count: int) -> None:
        """Counts (and, once per worker, says) the flagged records left with the posterior's
        top_features by the leave-one-out budget: many flagged in one batch, a drifted day."""
        Metrics.counter(METRICS_NAMESPACE, "flagged_rows_posterior_attribution").inc(count)
        if not self._warned_unexplained:
            self._warned_unexplained = True
            logging.getLogger(__name__).warning(
                "more than %.0f%% of a batch's records are flagged: %d of them keep the "
                "top_features read under their posterior (-log p(x_j|z)) rather than given the "
                "rest of the record, which would cost a pass per feature each; the day has "
                "likely drifted (see its manifest's drift)",
                100 * EXPLAINED_SHARE, count,
            )  # fmt: skip

    def _scored(self, table: pa.Table, result):
        """The kept columns cast to the output's types beside the scores. A row whose kept
        value the output type cannot hold (an id that overflows it) is rejected, alone."""
        kept = table.select(self._keep).take(pa.array(result.scored_rows))
        keep_schema = pa.schema([self._scored_schema.field(c) for c in self._keep])
        scores = result.scores
        try:
            kept = conform(kept, keep_schema)
        except _CAST_ERRORS as err:
            fits = _castable_rows(kept, keep_schema)
            misfits = result.scored_rows[~fits]
            self._rejected_at.append(misfits)
            yield self._rejected(
                table.take(pa.array(misfits)), RejectReason.KEEP_COLUMN_NOT_CASTABLE, err
            )
            mask = pa.array(fits)
            kept, scores = conform(kept.filter(mask), keep_schema), scores.filter(mask)
        # counted on the scores: with nothing to keep (a model trained without --id-column),
        # `kept` has no columns, and Arrow gives a column-less table 0 rows after a take
        if scores.num_rows:
            self._rows_scored.inc(scores.num_rows)
            yield pa.Table.from_arrays(kept.columns + scores.columns, schema=self._scored_schema)

    def _rejected(self, rows: pa.Table, reason: RejectReason, err: Exception):
        Metrics.counter(METRICS_NAMESPACE, f"rows_rejected_{reason.value}").inc(rows.num_rows)
        reasons = pa.array([reason.with_detail(err)] * rows.num_rows, pa.string())
        return beam.pvalue.TaggedOutput(REJECTED_TAG, self._with_reasons(rows, reasons))

    def _with_reasons(self, rows: pa.Table, reasons: pa.Array) -> pa.Table:
        try:
            rows = conform(rows, self._input_schema)
        except _CAST_ERRORS:
            rows = pa.Table.from_arrays(
                [pa.nulls(rows.num_rows, f.type) for f in self._input_schema],
                schema=self._input_schema,
            )  # the values do not fit the declared types; the reason says why
        return pa.Table.from_arrays([*rows.columns, reasons], schema=self._rejected_schema)


def _castable_rows(table: pa.Table, schema: pa.Schema) -> np.ndarray:
    """(n,) bool: rows whose every value survives a cast to `schema` and back unchanged.
    Where even an unchecked cast is impossible, no row is castable."""
    fits = np.ones(table.num_rows, dtype=bool)
    for field in schema:
        column = table[field.name]
        try:
            there = pc.cast(column, field.type, safe=False)
            back = pc.cast(there, column.type, safe=False)
        except _CAST_ERRORS:
            return np.zeros(table.num_rows, dtype=bool)
        same = pc.fill_null(pc.equal(back, column), True)  # nulls cast to nulls
        fits &= same.to_numpy(zero_copy_only=False)
    return fits


def _counts(reasons: pa.Array) -> tuple[list[str], list[int]]:
    counted = reasons.value_counts()
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


class ScoreRecords(beam.PTransform):
    """PCollection[pa.Table] -> tagged outputs `scored` and `rejected` (a DoOutputsTuple).

    `scored_schema` is the kept input columns followed by `model.contract.score_schema(d)`
    (with any Parquet metadata to write); `input_schema` the columns the rejected side keeps.
    """

    def __init__(
        self,
        model: ModelSettings,
        *,
        input_schema: pa.Schema,
        scored_schema: pa.Schema,
        keep: Sequence[str] = (),
        batch_size: int = defaults.SCORE_BATCH_SIZE,
        torch_threads: int | None = None,
        progress_seconds: float = progress.DEFAULT_INTERVAL,
    ):
        super().__init__()
        self._score = ScoreBatches(
            model=model,
            input_schema=input_schema,
            keep=keep,
            scored_schema=scored_schema,
            torch_threads=torch_threads,
            progress_seconds=progress_seconds,
        )
        self._batch_size = batch_size

    @property
    def scored_schema(self) -> pa.Schema:
        """The schema of every table on the `scored` output (for a Parquet writer)."""
        return self._score._scored_schema

    @property
    def rejected_schema(self) -> pa.Schema:
        """The schema of every table on the `rejected` output: the input columns, `reason`."""
        return self._score._rejected_schema

    @classmethod
    def for_model(
        cls,
        model_uri: str,
        tracking_uri: str = "",
        *,
        input_schema: pa.Schema,
        keep: Sequence[str] = (),
        overrides: ScoringOverrides | None = None,
        precision: str = defaults.PRECISION,
        **kwargs,
    ) -> ScoreRecords:
        """ScoreRecords for a registered model (models:/NAME@ALIAS, models:/NAME/VERSION) or a
        model folder, resolved once, when the pipeline is built:

        - the version is pinned, so an alias that moves later does not change a running job;
        - `input_schema`, the schema of your tables, is checked against the model's features
          (a missing or mistyped feature fails here, not on the workers);
        - the scored schema is derived: the `keep` columns as they are in `input_schema`, then
          the score columns for the model's latent size. The rejected side keeps every column
          of `input_schema`, then `reason`.

        `overrides` (K, seed, threshold quantile, flag rule) and `precision` go to the model's
        settings; the other keyword arguments (`batch_size`, `torch_threads`, ...) to
        ScoreRecords."""
        from vaewatch.model import registry

        loaded = registry.load(model_uri, tracking_uri)
        check_schema(input_schema, loaded.artifact.spec, keep, f"input_schema (for {model_uri})")
        scores = score_schema(loaded.artifact.vae_config.latent_dim)
        settings = ModelSettings(
            location=loaded.resolved.uri,
            tracking_uri=tracking_uri,
            model_version=loaded.resolved.label,
            overrides=overrides or ScoringOverrides(),
            precision=precision,
        )
        return cls(
            settings,
            input_schema=input_schema,
            scored_schema=pa.schema([*[input_schema.field(c) for c in keep], *scores]),
            keep=keep,
            **kwargs,
        )

    def expand(self, tables):
        return (
            tables
            | "BatchRows" >> Rebatch(self._batch_size)
            | "ScoreVAE"
            >> beam.ParDo(self._score)
            .with_output_types(pa.Table, **{REJECTED_TAG: pa.Table})
            .with_outputs(REJECTED_TAG, main=SCORED_TAG)
        )


# Names before 0.2.0 for defaults that live in vaewatch.model.defaults (until 0.3.0).
__getattr__ = deprecated_defaults(__name__, {"DEFAULT_BATCH_SIZE": "SCORE_BATCH_SIZE"})
