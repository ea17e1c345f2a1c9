"""One sink for everything a scoring run writes: scored rows, rejected rows and the day's drift
statistics.

Beam's `beam.io.Write` is about ten transforms per sink (a one-element `Create` and a side input
to make its temporary folder, the bundle writer, a pairing, a `GroupByKey`, a pre-finalise and a
finalise), and the drift statistics were a `CombineGlobally` of seven more. Every transform
costs the launcher and the runner a little, which at K=1 was a visible part of a job
(bench/notes/). `WriteOutputs` runs the same protocol once for all the outputs:

1. **Write.** Each bundle writes the tables it receives into a temporary file of its own (a
   random name in one `beam-temp-*` folder beside the outputs), per output, and sums the drift
   statistics of its scored rows. Tables are held until `chunk_rows` rows of
   an output are there, so row groups stay large whatever the batch size. When the bundle
   finishes it emits one `Written` record: its file and its statistics.
2. **Finalise.** One step receives the records as side inputs. A runner commits a bundle's
   output only when the bundle succeeds, so a retried bundle's files are never listed, and the
   finalising step renames exactly the listed ones to `PREFIX-SSSSS-of-NNNNN.parquet`, writes
   empty files where an output has fewer than its minimum (one, so that every output has a
   schema to read; `shards` for the sharded one), merges the statistics into one JSON file
   and deletes the temporary folder with whatever failed bundles left there. A runner may run
   this step again: a file already renamed is skipped, and the rest is rewritten as it was.

With `shards=N` the sharded output's tables are first spread over N keys and grouped, so each
key's rows land in one file (what Beam's `num_shards` does); the other outputs stay per bundle.

Each output has its own writer DoFn, applied where its tables are made, so the runner fuses the
writes with the scoring: a `Flatten` of the outputs before one writer would make the runner
materialise every scored table between two stages (it did: 1.5 GiB peak on a 2 GiB input
against 0.8 GiB).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsList
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue

from vaewatch.model.calibration.drift import DayStats
from vaewatch.pipeline import faults
from vaewatch.pipeline.commit import TEMP_PREFIX
from vaewatch.pipeline.drift import DayStatsOf, write_stats
from vaewatch.pipeline.storage import make_dirs
from vaewatch.pipeline.tables import PARQUET_CODEC, open_parquet

SUFFIX = ".parquet"


@dataclass(frozen=True)
class Output:
    """Where one kind of table goes: final files `prefix-SSSSS-of-NNNNN.parquet`."""

    prefix: str
    schema: pa.Schema


@dataclass(frozen=True)
class Written:
    """What one bundle (or one shard key) wrote for output `tag`: its temporary file, and the
    drift statistics of the rows (None when the sink keeps none for that output)."""

    tag: str
    path: str
    stats: DayStats | None = None


class _Files:
    """The temporary file one bundle or key is writing for one output, the tables held for it,
    and the statistics of its rows (for the output the sink keeps statistics of)."""

    def __init__(self, sink: _Sink, tag: str):
        self._sink, self._tag = sink, tag
        self._schema = sink.outputs[tag].schema
        self._path: str | None = None
        self._writer = None
        self._held: list[pa.Table] = []
        self._rows = 0
        self._stats = sink.stats_of.empty() if tag == sink.stats_tag else None

    def add(self, table: pa.Table) -> None:
        if not table.schema.equals(self._schema, check_metadata=False):
            raise ValueError(
                f"a table for the {self._tag!r} output has columns {table.schema.names}, not "
                f"the output's {self._schema.names}"
            )
        if self._stats is not None:
            self._sink.stats_of.add(self._stats, table)
        self._held.append(table)
        self._rows += table.num_rows
        if self._rows >= self._sink.chunk_rows:
            self._write()

    def _write(self) -> None:
        tables, self._held, self._rows = self._held, [], 0
        if self._writer is None:
            name = f"{self._tag}-{uuid.uuid4().hex}{SUFFIX}"
            self._path = FileSystems.join(self._sink.temp_dir, name)
            self._writer = open_parquet(self._path, self._schema)
        self._writer.write(tables[0] if len(tables) == 1 else pa.concat_tables(tables))
        faults.point(f"write:{self._tag}")

    def close(self) -> Written | None:
        """The file finished; None when no table came (nothing was opened)."""
        if self._rows:
            self._write()
        if self._writer is None:
            return None
        self._writer.close()
        return Written(self._tag, self._path, self._stats)


@dataclass(frozen=True)
class _Sink:
    """The sink's settings, shared by its DoFns."""

    outputs: dict[str, Output]
    temp_dir: str
    chunk_rows: int
    stats_of: DayStatsOf | None
    stats_tag: str | None
    stats_path: str | None


def _global(value) -> WindowedValue:
    return WindowedValue(value, window.GlobalWindow().max_timestamp(), [window.GlobalWindow()])


class _WriteBundles(beam.DoFn):
    """One output's tables -> one `Written` per bundle, in the global window (the
    finaliser's)."""

    def __init__(self, sink: _Sink, tag: str):
        self._sink, self._tag = sink, tag
        self._files: _Files | None = None

    def setup(self) -> None:
        make_dirs(self._sink.temp_dir)

    def start_bundle(self) -> None:
        self._files = None

    def process(self, table: pa.Table) -> Iterator[Written]:
        if self._files is None:
            self._files = _Files(self._sink, self._tag)
        self._files.add(table)
        yield from ()  # the bundle's one `Written` comes from finish_bundle

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self._files is not None:
            files, self._files = self._files, None
            written = files.close()
            if written is not None:
                yield _global(written)


class _WriteGroups(beam.DoFn):
    """(shard key, tables) -> one `Written`: the key's rows in one file."""

    def __init__(self, sink: _Sink, tag: str):
        self._sink, self._tag = sink, tag

    def setup(self) -> None:
        make_dirs(self._sink.temp_dir)

    def process(self, keyed: tuple[int, Iterable[pa.Table]]) -> Iterator[Written]:
        files = _Files(self._sink, self._tag)
        for table in keyed[1]:
            files.add(table)
        written = files.close()
        if written is not None:
            yield written


class _SpreadOverShards(beam.DoFn):
    """Tables -> (shard, table), round robin from a random start per bundle (as Beam does)."""

    def __init__(self, shards: int):
        self._shards = shards
        self._next = 0

    def start_bundle(self) -> None:
        self._next = random.randrange(self._shards)

    def process(self, table: pa.Table) -> Iterator[tuple[int, pa.Table]]:
        self._next = (self._next + 1) % self._shards
        yield self._next, table


def _finalize(_, sink: _Sink, minimum: dict[str, int], *outputs: list[Written]):
    """Rename the temporary files the `Written` records list (side inputs: one list per
    writer), fill each output to its minimum with empty files, write the merged statistics,
    delete the temporary folder; emits (tag, final path)."""
    written = [w for records in outputs for w in records]
    for tag, output in sink.outputs.items():
        sources = sorted(w.path for w in written if w.tag == tag)
        count = max(len(sources), minimum.get(tag, 1))
        finals = [f"{output.prefix}-{i:05d}-of-{count:05d}{SUFFIX}" for i in range(count)]
        if finals:
            make_dirs(FileSystems.split(output.prefix)[0])
        _rename(sources, finals[: len(sources)])
        for path in finals[len(sources) :]:
            with FileSystems.create(path) as handle:
                pq.write_table(output.schema.empty_table(), handle, compression=PARQUET_CODEC)
        for path in finals:
            yield beam.pvalue.TaggedOutput(tag, path)
    if sink.stats_path is not None:
        stats = sink.stats_of.merge(w.stats for w in written if w.stats is not None)
        yield beam.pvalue.TaggedOutput("stats", write_stats(stats, sink.stats_path))
    try:  # what failed bundles left, then the folder (object stores have no folder to delete)
        pattern = FileSystems.join(sink.temp_dir, "*")
        left = [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]
        if left:
            FileSystems.delete(left)
        if FileSystems.exists(sink.temp_dir):
            FileSystems.delete([sink.temp_dir])
    except (BeamIOError, OSError):
        pass  # debris only; the committer removes any temporary folder left in staging


def _rename(sources: list[str], finals: list[str]) -> None:
    """Rename sources[i] -> finals[i]; a pair whose source is gone and whose destination is
    there was renamed by an earlier attempt of this step."""
    todo = [
        (source, final)
        for source, final in zip(sources, finals, strict=True)
        if FileSystems.exists(source) or not FileSystems.exists(final)
    ]  # a pair with neither fails in the rename, naming the lost file
    if todo:
        FileSystems.rename([s for s, _ in todo], [f for _, f in todo])


class WriteOutputs(beam.PTransform):
    """{tag: PCollection[pa.Table]} -> {tag: PCollection of final file paths, "stats": the
    statistics file's path} (see the module's docstring).

    `outputs` names each tag's prefix and schema; `shards` > 0 writes exactly that many files
    for `sharded`; `stats` = (DayStatsOf, path) sums the `stats_tag` output's rows into one JSON
    file at `path`.
    """

    def __init__(
        self,
        outputs: Mapping[str, Output],
        *,
        shards: int = 0,
        sharded: str | None = None,
        stats: tuple[DayStatsOf, str] | None = None,
        stats_tag: str | None = None,
        chunk_rows: int = 65_536,
    ):
        super().__init__()
        if shards and sharded not in outputs:
            raise ValueError(f"sharded={sharded!r} is not one of the outputs {list(outputs)}")
        if stats is not None and stats_tag not in outputs:
            raise ValueError(f"stats_tag={stats_tag!r} is not one of the outputs {list(outputs)}")
        first = next(iter(outputs.values())).prefix
        base, name = FileSystems.split(first)
        self._sink = _Sink(
            outputs=dict(outputs),
            temp_dir=FileSystems.join(base, f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex}"),
            chunk_rows=chunk_rows,
            stats_of=None if stats is None else stats[0],
            stats_tag=None if stats is None else stats_tag,
            stats_path=None if stats is None else stats[1],
        )
        self._shards, self._sharded = shards, sharded

    def expand(self, tables):  # {tag: PCollection[pa.Table]}; Beam types PCollections only
        sink = self._sink
        written = []
        for tag in sink.outputs:  # one writer per output, fused with whatever makes its tables
            name = tag.capitalize()
            if self._shards and tag == self._sharded:
                written.append(
                    tables[tag]
                    | f"Global{name}" >> beam.WindowInto(window.GlobalWindows())
                    | f"Spread{name}"
                    >> beam.ParDo(_SpreadOverShards(self._shards)).with_output_types(
                        tuple[int, pa.Table]
                    )
                    | f"Group{name}" >> beam.GroupByKey()
                    | f"Write{name}" >> beam.ParDo(_WriteGroups(sink, tag))
                )
            else:
                written.append(tables[tag] | f"Write{name}" >> beam.ParDo(_WriteBundles(sink, tag)))
        minimum = {self._sharded: self._shards} if self._shards else {}
        tags = [*sink.outputs, "stats"]
        finals = (
            written[0].pipeline
            | "Once" >> beam.Create([None], reshuffle=False)
            | "Finalize"
            >> beam.FlatMap(_finalize, sink, minimum, *map(AsList, written)).with_outputs(*tags)
        )
        return {tag: finals[tag] for tag in tags if tag != "stats" or sink.stats_path}
