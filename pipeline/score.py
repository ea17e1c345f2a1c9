"""The scoring pipeline: read -> score -> write scored / write rejected -> commit.

```
ListInputs (Create: the files resolved at launch)
  -> ReadParquet (ReadAllFromParquetBatched, projected to features + kept columns)
  -> ScoreVAE (ScoreBatches: batches of --batch-size, model loaded once per worker)
       -> RechunkScored   -> WriteScored   (WriteToParquetBatched, zstd) --\\
       -> RechunkRejected -> WriteRejected (WriteToParquetBatched, zstd) ---> CommitRun
```

Everything a worker needs travels in the transforms (paths, the pinned model, settings); the
launcher resolves the input files, the model alias and the schema once, before any work.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadAllFromParquetBatched, WriteToParquetBatched
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from model import registry
from model.data import InputFile, resolve_files
from model.errors import UserError
from model.features import SchemaMismatchError
from model.scoring import ScoringSettings, score_schema
from model.version import package_version
from pipeline import faults
from pipeline.commit import (
    PART_PREFIX,
    REJECTED_DIR,
    Committed,
    OutputError,
    committer_for,
    new_run_id,
    output_lock,
    read_manifest,
)
from pipeline.loopback import loopback_only
from pipeline.transforms import (
    REJECTED_TAG,
    WRITE_CHUNK_ROWS,
    ModelSettings,
    Rechunk,
    ScoreBatches,
    rejected_schema,
)

LOCAL_RUNNER = "local"  # Beam's in-process FnApiRunner: never fetches anything from the network
PARQUET_CODEC = "zstd"  # Beam's default is no compression


@dataclass
class ScoreJob:
    input: str | Sequence[str]
    output: str
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, or a local model folder
    tracking_uri: str
    k: int | None = None  # None: the model's defaults
    samples: int | None = None
    seed: int | None = None
    batch_size: int = 65_536
    keep: Sequence[str] | None = None  # None: the model's id column, when the input has it
    threshold_quantile: float | None = None
    runner: str = LOCAL_RUNNER
    workers: int = 1  # local runner: >1 runs that many worker processes
    shards: int = 0  # output files; 0 lets the runner decide
    beam_args: Sequence[str] = field(default_factory=list)


@dataclass
class ScoreResult:
    manifest: dict
    committed: Committed


def _local_threads(workers: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


def _check_inputs(
    files: list[InputFile], filesystem, spec, keep: Sequence[str] | None, id_column: str | None
) -> tuple[pa.Schema, list[str]]:
    """Every file's schema against the model, before any work. Returns the read schema and the
    kept columns (`keep`, or else the id column when the first file has it)."""
    schemas = []
    for f in files:
        try:
            schemas.append(pq.read_schema(f.path, filesystem=filesystem))
        except (pa.ArrowInvalid, OSError) as err:
            raise UserError(f"input file {f.path!r} is not readable Parquet: {err}") from err
    first = schemas[0]
    if keep is None:
        keep = [id_column] if id_column and id_column in first.names else []
    keep = list(keep)
    for f, schema in zip(files, schemas, strict=True):
        try:
            spec.check_schema(schema)
        except SchemaMismatchError as err:
            raise SchemaMismatchError(f"in input file {f.path!r}: {err}") from err
        missing = [c for c in keep if c not in schema.names]
        if missing:
            raise SchemaMismatchError(
                f"--keep column(s) {missing} are not in input file {f.path!r}; its columns are "
                f"{schema.names}"
            )
    columns = list(dict.fromkeys([*spec.names(), *keep]))
    return pa.schema([first.field(c) for c in columns]), keep


def _first_unreadable(
    files: list[InputFile], filesystem, columns: list[str]
) -> tuple[str, str] | None:
    """After a failed read: the first input file whose data pages do not decode, and why."""
    for f in files:
        try:
            reader = pq.ParquetFile(f.path, filesystem=filesystem)
            for _ in reader.iter_batches(batch_size=65_536, columns=columns):
                pass
        except (pa.ArrowException, OSError) as err:
            return f.path, str(err).splitlines()[0]
    return None


def _rows_in(files: list[InputFile], filesystem) -> int:
    return sum(pq.ParquetFile(f.path, filesystem=filesystem).metadata.num_rows for f in files)


class CommitRun(beam.PTransform):
    """Waits for both writes to finish, then publishes the staged run once (see commit.py)."""

    def __init__(self, committer, manifest: dict):
        super().__init__()
        self._committer = committer
        self._manifest = manifest

    def expand(self, written):
        committer, manifest = self._committer, self._manifest

        def commit(_written_files):
            manifest["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
            yield committer.publish(manifest)

        return (
            written
            | "FlattenWritten" >> beam.Flatten()
            | "CollectWritten" >> beam.combiners.ToList()
            | "Publish" >> beam.FlatMap(commit)
        )


def _options(job: ScoreJob) -> tuple[PipelineOptions, object]:
    """Pipeline options and the runner object (None: let Beam pick from --runner)."""
    options = PipelineOptions(list(job.beam_args))
    if job.runner == LOCAL_RUNNER:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        direct = options.view_as(DirectOptions)
        direct.direct_num_workers = job.workers
        direct.direct_running_mode = "multi_processing" if job.workers > 1 else "in_memory"
        return options, FnApiRunner()
    options.view_as(StandardOptions).runner = job.runner
    return options, None


def build(pipeline: beam.Pipeline, job: ScoreJob, plan: dict) -> None:
    """Attach the scoring transforms to `pipeline` (separate from `run` so tests can drive it)."""
    staging = plan["committer"].staging
    paths = [f.path for f in plan["files"]]
    tables = (
        pipeline
        | "ListInputs" >> beam.Create(paths)
        | "ReadParquet" >> ReadAllFromParquetBatched(columns=plan["input_schema"].names)
    )
    outputs = tables | "ScoreVAE" >> beam.ParDo(
        ScoreBatches(
            model=ModelSettings(
                location=plan["model_location"],
                tracking_uri=job.tracking_uri,
                model_version=plan["resolved"].label,
                k=job.k,
                samples=job.samples,
                seed=job.seed,
                threshold_quantile=job.threshold_quantile,
            ),
            batch_size=job.batch_size,
            input_schema=plan["input_schema"],
            keep=plan["keep"],
            scored_schema=plan["scored_schema"],
            rejected_schema=plan["rejected_schema"],
            torch_threads=plan["torch_threads"],
        )
    ).with_outputs(REJECTED_TAG, main="scored")

    def write(pcoll, name, prefix, schema, shards):
        return (
            pcoll
            | f"Rechunk{name}"
            >> beam.ParDo(Rechunk(WRITE_CHUNK_ROWS, crash_point=f"write:{name.lower()}"))
            | f"Write{name}"
            >> WriteToParquetBatched(
                prefix,
                schema=schema,
                codec=PARQUET_CODEC,
                file_name_suffix=".parquet",
                num_shards=shards,
                shard_name_template="-SSSSS-of-NNNNN",
            )
        )

    written_scored = write(
        outputs.scored,
        "Scored",
        FileSystems.join(staging, PART_PREFIX),
        plan["scored_schema"],
        job.shards,
    )
    written_rejected = write(
        outputs[REJECTED_TAG],
        "Rejected",
        FileSystems.join(staging, REJECTED_DIR, PART_PREFIX),
        plan["rejected_schema"],
        0,  # usually few rows: let the runner decide
    )
    _ = (written_scored, written_rejected) | "CommitRun" >> CommitRun(
        plan["committer"], plan["manifest"]
    )


def plan(job: ScoreJob) -> dict:
    """Everything decided once at launch: files, model version, schemas, staging, manifest."""
    filesystem, files = resolve_files(job.input)
    download = tempfile.mkdtemp(prefix="vaewatch-model-")
    try:
        loaded = registry.load(job.model, job.tracking_uri, destination=download)
    except Exception:
        shutil.rmtree(download, ignore_errors=True)
        raise
    artifact, resolved = loaded.artifact, loaded.resolved
    input_schema, keep = _check_inputs(
        files, filesystem, artifact.spec, job.keep, artifact.id_column
    )
    run_id = new_run_id()
    settings = ScoringSettings.resolve(
        artifact, job.k, job.samples, job.seed, job.threshold_quantile
    )
    k, samples, seed = settings.k, settings.samples, settings.seed
    quantile, threshold = settings.threshold_quantile, settings.threshold
    started = dt.datetime.now(dt.timezone.utc).isoformat()
    metadata = {
        "vaewatch.model_uri": resolved.uri,
        "vaewatch.model_requested": resolved.requested,
        "vaewatch.model_version": resolved.label,
        "vaewatch.k": str(k),
        "vaewatch.samples": str(samples),
        "vaewatch.seed": str(seed),
        "vaewatch.threshold_quantile": str(quantile),
        "vaewatch.threshold": repr(threshold),
        "vaewatch.version": package_version(),
        "vaewatch.run_id": run_id,
    }
    scores = score_schema(artifact.vae_config.latent_dim)
    scored_schema = pa.schema([*[input_schema.field(c) for c in keep], *scores]).with_metadata(
        metadata
    )
    committer = committer_for(job.output, run_id)
    manifest = {
        "run_id": run_id,
        "model": {
            "requested": resolved.requested,
            "uri": resolved.uri,
            "name": resolved.name,
            "version": resolved.version,
            "run_id": resolved.run_id,
        },
        "inputs": [{"path": f.path, "size": f.size, "modified": f.modified} for f in files],
        "rows": {"in": _rows_in(files, filesystem)},
        "k": k,
        "samples": samples,
        "seed": seed,
        "threshold_quantile": quantile,
        "threshold": threshold,
        "batch_size": job.batch_size,
        "runner": job.runner,
        "workers": job.workers,
        "keep": keep,
        "started": started,
        "vaewatch_version": package_version(),
    }
    local = job.runner == LOCAL_RUNNER
    return {
        "download": download,
        "files": files,
        "filesystem": filesystem,
        "resolved": resolved,
        # local runs read the folder downloaded here; remote workers fetch the pinned version
        "model_location": str(loaded.path) if local or resolved.local_path else resolved.uri,
        "keep": keep,
        "input_schema": input_schema,
        "scored_schema": scored_schema,
        "rejected_schema": rejected_schema(input_schema).with_metadata(metadata),
        "committer": committer,
        "manifest": manifest,
        "torch_threads": _local_threads(job.workers) if local else None,
    }


def run(job: ScoreJob, pipeline: beam.Pipeline | None = None) -> ScoreResult:
    """Plan, run and commit. `pipeline` (e.g. a TestPipeline) replaces the configured one."""
    if job.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {job.batch_size}")
    settings = plan(job)
    faults.point("launch:planned")
    try:
        with output_lock(job.output):
            return _run_planned(job, settings, pipeline)
    finally:
        shutil.rmtree(settings["download"], ignore_errors=True)


_STORAGE_FIXES = {
    "no space left on device": "Free space there or choose another --output, then re-run.",
    "the file system is read-only": "Choose a writable --output, then re-run.",
    "permission denied": "Give this user write access to the output's folder, or choose "
    "another --output, then re-run.",
    "disk quota exceeded": "Raise the quota or choose another --output, then re-run.",
}
_STORAGE_ERRNOS = {
    "[Errno 28]": "no space left on device",
    "[Errno 30]": "the file system is read-only",
    "[Errno 13]": "permission denied",
    "[Errno 122]": "disk quota exceeded",
}


def _storage_problem(message: str) -> str | None:
    """Beam re-raises a worker's OSError as text; find the storage errno in it."""
    for marker, problem in _STORAGE_ERRNOS.items():
        if marker in message:
            return problem
    return None


def _run_planned(job: ScoreJob, settings: dict, pipeline: beam.Pipeline | None) -> ScoreResult:
    committer = settings["committer"]
    committer.prepare()
    faults.point("launch:staged")
    if pipeline is None:
        options, runner = _options(job)
        pipeline = beam.Pipeline(runner=runner, options=options)
    build(pipeline, job, settings)
    local = job.runner == LOCAL_RUNNER
    try:
        with loopback_only() if local else contextlib.nullcontext():
            result = pipeline.run()
            result.wait_until_finish()
    except Exception as err:
        committer.abort()
        problem = _storage_problem(str(err))
        if problem and "ReadParquet" not in str(err):
            raise OutputError(
                f"writing the output {job.output!r} failed: {problem}. Nothing was committed "
                "(the staged files were removed; an earlier output there is untouched). "
                f"{_STORAGE_FIXES[problem]}"
            ) from err
        if "ReadParquet" in str(err):  # Beam names the failing step; find the file it read
            unreadable = _first_unreadable(
                settings["files"], settings["filesystem"], settings["input_schema"].names
            )
            if unreadable:
                raise UserError(
                    f"input file {unreadable[0]!r} cannot be read past its footer "
                    f"({unreadable[1]}); it is corrupt or was truncated while being written. "
                    "Nothing was committed; replace or remove the file and re-run."
                ) from err
        raise
    manifest = read_manifest(committer.output) or settings["manifest"]
    committed = Committed(
        output=committer.output,
        files=manifest.get("files", []),
        rejected_files=manifest.get("rejected_files", []),
        rows_scored=manifest["rows"].get("scored", 0),
        rows_rejected=manifest["rows"].get("rejected", 0),
    )
    return ScoreResult(manifest=manifest, committed=committed)
