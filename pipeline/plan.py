"""What a scoring run decides once, at launch, before any work: `ScoreJob` -> `ScorePlan`.

The launcher resolves the input files (reading each footer once: schema and row count), pins
the model alias to one version, checks every file's schema against the model, and fixes the
output schemas, the staging location and the manifest. Workers get only plain values from it.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from vaewatch.model import defaults, registry
from vaewatch.model.calibration.drift import Reference
from vaewatch.model.contract import (
    Manifest,
    ManifestInput,
    ManifestModel,
    RowCounts,
    score_schema,
)
from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.data.inputs import InputFile, input_containing, read_footers, resolve_files
from vaewatch.model.errors import UserError, setting
from vaewatch.model.scoring import ScoringOverrides
from vaewatch.model.threads import threads_for
from vaewatch.model.version import package_version
from vaewatch.pipeline.commit import LocalCommitter, ObjectStoreCommitter, committer_for, new_run_id
from vaewatch.pipeline.progress import DEFAULT_INTERVAL
from vaewatch.pipeline.transforms import ModelSettings, check_schema

LOCAL_RUNNER = "local"  # Beam's in-process FnApiRunner: never fetches anything from the network


@dataclass(frozen=True)
class ScoreOptions:
    """How to score, shared by `score` and `nightly`."""

    overrides: ScoringOverrides = ScoringOverrides()  # K, seed, quantile; None: the model's
    precision: str = defaults.PRECISION  # auto | fp32 | bf16 (model/device.py)
    batch_size: int = defaults.SCORE_BATCH_SIZE
    keep: Sequence[str] | None = None  # None: the model's id column, when the input has it
    runner: str = LOCAL_RUNNER
    workers: int = 1  # local runner: >1 runs that many worker processes
    shards: int = 0  # output files; 0 lets the runner decide
    threads: int | None = None  # torch threads per worker process; None: its cores / workers
    progress_seconds: float = DEFAULT_INTERVAL  # a progress line per worker at most this often
    beam_args: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"{setting('batch_size')} must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise UserError(f"{setting('workers')} must be >= 1, got {self.workers}")

    @property
    def local(self) -> bool:
        return self.runner == LOCAL_RUNNER

    @property
    def in_process(self) -> bool:
        """Whether the one worker scores in the launching process (the local runner with one
        worker), where `progress.listening` sees its rows."""
        return self.local and self.workers == 1


@dataclass(frozen=True)
class ScoreJob:
    input: str | Sequence[str]
    output: str
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, or a local model folder
    tracking_uri: str
    options: ScoreOptions = field(default_factory=ScoreOptions)


@dataclass(frozen=True)
class ScorePlan:
    job: ScoreJob
    download: str  # a temporary folder holding the downloaded model (removed after the run)
    files: tuple[InputFile, ...]
    row_groups: tuple[int, ...]  # per file, from the footer read at launch
    filesystem: object  # the inputs' pyarrow filesystem
    model: ModelSettings  # what every worker loads
    keep: tuple[str, ...]
    input_schema: pa.Schema  # the columns read: features + kept
    scored_schema: pa.Schema  # kept + score columns, with the run's Parquet metadata
    committer: LocalCommitter | ObjectStoreCommitter
    manifest: Manifest  # rows in known, counts and files filled in at commit
    torch_threads: int | None  # None: each worker uses the cores it may use
    drift: Reference  # the calibration the day's scores are compared with


def check_inputs(
    files: Sequence[InputFile],
    schemas: Sequence[pa.Schema],
    spec: FeatureSpec,
    keep: Sequence[str] | None,
    id_column: str | None,
) -> tuple[pa.Schema, list[str]]:
    """Every file's schema against the model, before any work. Returns the read schema and the
    kept columns (`keep`, or else the id column when the first file has it)."""
    first = schemas[0]
    if keep is None:
        keep = [id_column] if id_column and id_column in first.names else []
    keep = list(keep)
    for f, schema in zip(files, schemas, strict=True):
        check_schema(schema, spec, keep, f"input file {f.path!r}")
    columns = list(dict.fromkeys([*spec.names(), *keep]))
    return pa.schema([first.field(c) for c in columns]), keep


def make_plan(job: ScoreJob) -> ScorePlan:
    """Everything decided once at launch: files, model version, schemas, staging, manifest."""
    options = job.options
    containing = input_containing(job.input, job.output)
    if containing is not None:
        raise UserError(
            f"output {job.output!r} is inside the input {containing!r}: the next run over that "
            "input would read this run's scores as records. Write the output outside the input "
            "(or under a folder whose name starts with '_' or '.', which inputs skip)"
        )
    filesystem, files = resolve_files(job.input)
    footers = read_footers(files, filesystem)
    download = tempfile.mkdtemp(prefix="vaewatch-model-")
    try:
        loaded = registry.load(job.model, job.tracking_uri, destination=download)
        artifact, resolved = loaded.artifact, loaded.resolved
        input_schema, keep = check_inputs(
            files, [f.schema.to_arrow_schema() for f in footers], artifact.spec, options.keep,
            artifact.id_column,
        )  # fmt: skip
        settings = options.overrides.resolve(artifact)
    except Exception:
        shutil.rmtree(download, ignore_errors=True)
        raise
    run_id = new_run_id()
    manifest = Manifest(
        run_id=run_id,
        model=ManifestModel(
            requested=resolved.requested,
            uri=resolved.uri,
            name=resolved.name,
            version=resolved.version,
            run_id=resolved.run_id,
        ),
        inputs=tuple(ManifestInput(f.path, f.size, f.modified) for f in files),
        rows=RowCounts(rows_in=sum(f.num_rows for f in footers)),
        k=settings.k,
        seed=settings.seed,
        threshold_quantile=settings.threshold_quantile,
        threshold=settings.threshold(artifact),
        flag_rule=settings.flag_rule,
        batch_size=options.batch_size,
        runner=options.runner,
        precision=options.precision,
        workers=options.workers,
        keep=tuple(keep),
        started=dt.datetime.now(dt.timezone.utc).isoformat(),
        vaewatch_version=package_version(),
    )
    scores = score_schema(artifact.vae_config.latent_dim)
    scored_schema = pa.schema([*[input_schema.field(c) for c in keep], *scores])
    model = ModelSettings(
        # local runs read the folder downloaded here; remote workers fetch the pinned version
        location=str(loaded.path) if options.local or resolved.local_path else resolved.uri,
        tracking_uri=job.tracking_uri,
        model_version=resolved.label,
        overrides=options.overrides,
        precision=options.precision,
    )
    return ScorePlan(
        job=job,
        download=download,
        files=tuple(files),
        row_groups=tuple(f.num_row_groups for f in footers),
        filesystem=filesystem,
        model=model,
        keep=tuple(keep),
        input_schema=input_schema,
        scored_schema=scored_schema.with_metadata(manifest.parquet_metadata()),
        committer=committer_for(job.output, run_id),
        manifest=manifest,
        torch_threads=options.threads or (threads_for(options.workers) if options.local else None),
        drift=Reference.of(
            artifact.calibration,
            artifact.spec.names(),
            threshold_quantile=settings.threshold_quantile,
            k=settings.k,
            model_k=artifact.scoring.k,
            flag_rule=settings.flag_rule,
            segments=artifact.calibrations(),
        ),
    )
