"""The scoring pipeline: read -> score -> write scored / write rejected; then the commit.

```
ListInputs (Create: the files resolved at launch)
  -> ScoreParquet
       ReadParquet (ReadParquetTables: row-group splits, projected to features + kept columns)
       -> ScoreRecords (Rebatch to --batch-size rows, ScoreBatches: model loaded once per worker)
            -> scored, rejected -> WriteOutputs (one sink: zstd Parquet per bundle, the
                                                 drift statistics, one finalising step)
```

The pipeline only stages files. The commit (row counts checked, manifest, `_SUCCESS`, the
atomic exchange) runs in the launcher once the runner reports success, so a bundle Beam retries
on a worker can never publish twice; `publish` is idempotent besides.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from vaewatch.model.calibration.drift import Reference
from vaewatch.model.contract import Manifest, rejected_schema
from vaewatch.model.data.inputs import inside
from vaewatch.model.errors import UserError, setting
from vaewatch.pipeline import faults, progress, services, storage
from vaewatch.pipeline.commit import PART_PREFIX, REJECTED_DIR, OutputError, output_lock
from vaewatch.pipeline.drift import STATS_FILE, DayStatsOf, read_stats
from vaewatch.pipeline.loopback import loopback_only
from vaewatch.pipeline.outputs import Output, WriteOutputs
from vaewatch.pipeline.plan import LOCAL_RUNNER, ScoreJob, ScoreOptions, ScorePlan, make_plan
from vaewatch.pipeline.transforms import (
    METRICS_NAMESPACE,
    REJECTED_TAG,
    SCORED_TAG,
    WRITE_CHUNK_ROWS,
    CorruptInputError,
    ModelSettings,
    ReadParquetTables,
    ScoreRecords,
    row_group_splits,
)

__all__ = ["ScoreJob", "ScoreOptions", "ScoreParquet", "ScoreResult", "build", "run"]


class ScoreParquet(beam.PTransform):
    """PCollection[str] of Parquet paths (or row-group splits) -> scored and rejected Parquet
    files.

    Returns {"scored": PCollection of written scored files, "rejected": ... of rejected files,
    and with `drift`, "stats": the statistics file}.
    The files are plain Beam sink output under the two prefixes; `vaewatch score` stages them
    and commits them atomically afterwards, a Beam user may do as they wish.
    """

    def __init__(
        self,
        model: ModelSettings,
        *,
        input_schema: pa.Schema,
        scored_schema: pa.Schema,
        scored_prefix: str,
        rejected_prefix: str,
        keep: Sequence[str] = (),
        batch_size: int,
        shards: int = 0,
        torch_threads: int | None = None,
        progress_seconds: float = progress.DEFAULT_INTERVAL,
        drift: tuple[Reference, str] | None = None,
        redistribute: bool = True,
    ):
        super().__init__()
        self._read = ReadParquetTables(
            input_schema.names, provenance=True, redistribute=redistribute
        )
        self._score = ScoreRecords(
            model,
            input_schema=input_schema,
            scored_schema=scored_schema,
            keep=keep,
            batch_size=batch_size,
            torch_threads=torch_threads,
            progress_seconds=progress_seconds,
        )
        rejected = rejected_schema(input_schema).with_metadata(scored_schema.metadata)
        self._write = WriteOutputs(
            {
                SCORED_TAG: Output(scored_prefix, scored_schema),
                REJECTED_TAG: Output(rejected_prefix, rejected),
            },
            shards=shards,
            sharded=SCORED_TAG,  # rejected rows are few: one file per bundle that has any
            stats=None if drift is None else (DayStatsOf(drift[0]), drift[1]),
            stats_tag=SCORED_TAG,
            chunk_rows=WRITE_CHUNK_ROWS,
        )

    def expand(self, paths):
        outputs = paths | "ReadParquet" >> self._read | "ScoreRecords" >> self._score
        return {
            SCORED_TAG: outputs[SCORED_TAG],
            REJECTED_TAG: outputs[REJECTED_TAG],
        } | "WriteOutputs" >> self._write


@dataclass(frozen=True)
class ScoreResult:
    manifest: Manifest  # the committed manifest: counts, files, model, settings
    output: str  # the committed output location
    counters: dict[str, int]  # the run's Beam counters (namespace vaewatch): rows_in, ...


def build(pipeline: beam.Pipeline, plan: ScorePlan, *, single_worker: bool = False):
    """Attach the scoring transforms to `pipeline` (tests drive it with a TestPipeline).
    `single_worker`: the runner has one worker, so the input splits are not redistributed."""
    staging = plan.committer.staging
    return (
        pipeline
        | "ListInputs"
        >> beam.Create(
            [
                split
                for f, groups in zip(plan.files, plan.row_groups, strict=True)
                for split in row_group_splits(f.path, groups)
            ],
            reshuffle=False,  # ReadParquet redistributes the splits itself
        )
        | "ScoreParquet"
        >> ScoreParquet(
            plan.model,
            input_schema=plan.input_schema,
            scored_schema=plan.scored_schema,
            scored_prefix=FileSystems.join(staging, PART_PREFIX),
            rejected_prefix=FileSystems.join(staging, REJECTED_DIR, PART_PREFIX),
            keep=plan.keep,
            batch_size=plan.job.options.batch_size,
            shards=plan.job.options.shards,
            torch_threads=plan.torch_threads,
            progress_seconds=plan.job.options.progress_seconds,
            drift=(plan.drift, FileSystems.join(staging, STATS_FILE)),
            redistribute=not single_worker,
        )
    )


def pipeline_options(job: ScoreJob) -> tuple[PipelineOptions, object]:
    """Beam options from the arguments after `--`, and the runner object (None: let Beam pick
    the runner named by --runner)."""
    options = PipelineOptions(list(job.options.beam_args))
    if job.options.runner != LOCAL_RUNNER:
        options.view_as(StandardOptions).runner = job.options.runner
        return options, None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    direct = options.view_as(DirectOptions)
    direct.direct_num_workers = job.options.workers
    direct.direct_running_mode = "multi_processing" if job.options.workers > 1 else "in_memory"
    return options, FnApiRunner()


def run(
    job: ScoreJob,
    pipeline: beam.Pipeline | None = None,
    *,
    lock_held: bool = False,
    on_planned: Callable[[ScorePlan], None] | None = None,
) -> ScoreResult:
    """Plan, run and commit. `pipeline` (e.g. a TestPipeline) replaces the configured one;
    `lock_held`: the caller holds `output_lock(job.output)` already (`vaewatch nightly`, which
    checks the day's manifest under the same lock); `on_planned`: called with the plan before
    any row is read (the CLI sizes its progress bar from it)."""
    services.check(job.options.beam_args)
    storage.probe(job.output, setting("output"))
    plan = make_plan(job)
    faults.point("launch:planned")
    if on_planned is not None:
        on_planned(plan)
    storage.configure(job.options.beam_args)
    try:
        with contextlib.nullcontext() if lock_held else output_lock(job.output):
            plan.committer.prepare()
            faults.point("launch:staged")
            # Beam's in-process runner with one worker: nowhere to redistribute the input to
            single = pipeline is None and job.options.in_process
            if pipeline is None:
                options, runner = pipeline_options(job)
                pipeline = beam.Pipeline(runner=runner, options=options)
            build(pipeline, plan, single_worker=single)
            try:
                with loopback_only() if job.options.local else contextlib.nullcontext():
                    result = pipeline.run()
                    result.wait_until_finish()
            except Exception as err:
                plan.committer.abort()
                explained = explain_failure(err, plan)
                if explained is None:
                    raise
                raise explained from err
            committed = plan.committer.publish(_with_drift(plan))
    finally:
        shutil.rmtree(plan.download, ignore_errors=True)
    return ScoreResult(manifest=committed, output=plan.committer.output, counters=_counters(result))


def _with_drift(plan: ScorePlan) -> Manifest:
    """The manifest with the day's drift assessment; the statistics file leaves staging."""
    path = FileSystems.join(plan.committer.staging, STATS_FILE)
    stats = read_stats(path)
    if stats is None:
        return plan.manifest
    FileSystems.delete([path])
    return replace(plan.manifest, drift=plan.drift.assess(stats))


def _counters(result) -> dict[str, int]:
    """The vaewatch counters of a finished pipeline (committed values where the runner has
    them, else attempted), as every runner's UI shows them."""
    query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    totals: dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (value or 0)
    return totals


# ------------------------------------------------------------------------------ failures
_OTHER_OUTPUT = f"choose another {setting('output')}"
STORAGE_PROBLEMS = {
    errno.ENOSPC: ("no space left on device", f"Free space there or {_OTHER_OUTPUT}"),
    errno.EROFS: ("the file system is read-only", f"Choose a writable {setting('output')}"),
    errno.EACCES: (
        "permission denied",
        f"Give this user write access to the output's folder, or {_OTHER_OUTPUT}",
    ),
    errno.EDQUOT: ("disk quota exceeded", f"Raise the quota or {_OTHER_OUTPUT}"),
}


def _chain(err: BaseException):
    """The exception, its causes and contexts (Beam re-raises a worker's error with the
    original as its context)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def explain_failure(err: BaseException, plan: ScorePlan) -> UserError | None:
    """A failed run, told by exception types: a UserError raised on a worker (a corrupt input
    file), a storage OSError (full, read-only, forbidden output). When the runner carried the
    error across a process boundary as text, the launcher re-checks: it reads the inputs, then
    writes a probe file where the output is staged. None: not a failure a user can fix."""
    for cause in _chain(err):
        if isinstance(cause, UserError):
            return cause
    for cause in _chain(err):
        if isinstance(cause, OSError) and cause.errno in STORAGE_PROBLEMS:
            return _storage_error(plan, cause.errno)
    unreadable = _first_unreadable(plan)
    if unreadable is not None:
        return unreadable
    code = _probe_output(plan)
    return _storage_error(plan, code) if code is not None else None


def _storage_error(plan: ScorePlan, code: int) -> OutputError:
    problem, fix = STORAGE_PROBLEMS[code]
    return OutputError(
        f"writing the output {plan.job.output!r} failed: {problem}. Nothing was committed "
        "(the staged files were removed; an earlier output there is untouched). "
        f"{fix}, then re-run."
    )


def _first_unreadable(plan: ScorePlan) -> UserError | None:
    """The first input file whose data pages do not decode, read here with pyarrow."""
    for f in plan.files:
        try:
            reader = pq.ParquetFile(inside(f.path), filesystem=plan.filesystem)
            for _ in reader.iter_batches(batch_size=65_536, columns=plan.input_schema.names):
                pass
        except (pa.ArrowException, OSError) as err:
            return CorruptInputError.of(f.path, err)
    return None


def _probe_output(plan: ScorePlan) -> int | None:
    """The errno of writing a small file where the run stages its output, or None."""
    probe = plan.committer.staging + "-probe"
    try:
        with FileSystems.create(probe) as handle:
            handle.write(b"\0" * 65_536)
    except OSError as err:
        return err.errno if err.errno in STORAGE_PROBLEMS else None
    finally:
        with contextlib.suppress(OSError):
            FileSystems.delete([probe])
    return None
