"""The `vaewatch` command line: first what every command shares (exit codes and the
one-paragraph failure, the Beam pass-through of arguments after `--`, the JSON report, drift
lines), then the commands. Their options are defined in params.py, the log in logs.py."""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import os
import re
import sys
import tempfile
import threading
import traceback

import click

from vaewatch.jobs import logs, params
from vaewatch.model.errors import DependencyUnavailable, UserError
from vaewatch.model.version import package_version

# MLflow's HTTP client retries a failing request 7 times with exponential backoff by default
# (minutes). vaewatch checks that the server answers first, so later requests need fewer
# retries. MLflow also draws a progress bar on stderr for every artifact download (registering a
# model, loading one to score: one line of 33 carriage-returned redraws in a cron or Airflow
# log); vaewatch logs what it loads itself. And against a tracking server MLflow writes the
# run's and the experiment's web addresses to *stdout* when a run ends, where `vaewatch train`
# promises the model URI alone (URI=$(vaewatch -q train ...)); train logs the run's address on
# stderr instead. The user's own settings win.
MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # the job failed for a reason the user can fix; the message says which
    USAGE = 2  # click's own code for bad usage
    DRIFT = 3  # the job succeeded and committed, a day raised a data-drift alarm, --fail-on-drift
    # the job succeeded and committed, a day's anomaly rate was above --fail-on-anomaly-rate
    ANOMALY_RATE = 4
    CRASHED = 70  # sysexits' EX_SOFTWARE: a bug; the traceback went to a file (-v prints it)
    TEMPFAIL = 75  # sysexits' EX_TEMPFAIL: a dependency did not answer, nothing was committed


class Group(click.Group):
    """The vaewatch group: an unexpected exception (a bug, not a failure a user can fix) ends
    in one line on stderr naming it and the file its traceback went to, and exit 70; with -v
    the traceback is printed as well."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:  # noqa: BLE001 - turned into one line and exit 70, logged whole
            report = _save_traceback()
            if ctx.meta.get("verbose"):
                click.echo(traceback.format_exc(), err=True)
            what = (str(err).splitlines() or [""])[0]
            click.echo(
                f"vaewatch crashed ({type(err).__name__}: {what}); this is a bug, not a problem "
                f"with your input. The traceback is in {report}; run with -v to print it.",
                err=True,
            )
            ctx.exit(ExitCode.CRASHED)


def _save_traceback() -> str:
    handle, path = tempfile.mkstemp(prefix="vaewatch-crash-", suffix=".txt")
    with os.fdopen(handle, "w") as out:
        out.write(traceback.format_exc())
    return path


class JobFailed(click.ClickException):
    """An expected failure: printed as one paragraph, exit code 1, no traceback."""

    exit_code = ExitCode.FAILED


# a setting as a library message names it (vaewatch.model.errors.setting): `name` or `name=value`
SETTING = re.compile(r"`([a-z_]+)(?:=([^`]*))?`")


def as_options(message: str) -> str:
    """A library message with each setting it names (`exclude=amount`) written as the option
    that sets it here (--exclude amount). A name no command has stays as it was written."""
    options = _options_by_name()

    def option(match: re.Match) -> str:
        flag = options.get(match.group(1))
        if flag is None:
            return match.group(0)
        return flag if match.group(2) is None else f"{flag} {match.group(2)}"

    return SETTING.sub(option, message)


@functools.cache
def _options_by_name() -> dict[str, str]:
    """Each option's parameter name (exclude, model_uri) -> its long form (--exclude, --model),
    from every command of the group."""
    names: dict[str, str] = {}

    def walk(command: click.Command) -> None:
        for param in command.params:
            long = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
            if isinstance(param, click.Option) and long:
                names.setdefault(param.name, long[0])
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(main)
    return names


@contextlib.contextmanager
def user_errors_exit_1():
    """Turn a UserError (bad input, missing model, ...) into JobFailed: its message, exit 1;
    a dependency that did not answer into exit 75, which a scheduler may retry."""
    try:
        yield
    except DependencyUnavailable as err:
        failed = JobFailed(f"{as_options(str(err))} Retry later (exit {ExitCode.TEMPFAIL}).")
        failed.exit_code = ExitCode.TEMPFAIL
        raise failed from err
    except UserError as err:
        raise JobFailed(as_options(str(err))) from err


class BeamCommand(click.Command):
    """A command whose arguments after `--` are Beam pipeline options, passed through as they
    are; anything before `--` is the command's own, so an unknown option is a usage error
    (exit 2) instead of being handed to Beam and ignored."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        beam: list[str] = []
        if "--" in args:
            split = args.index("--")
            args, beam = args[:split], args[split + 1 :]
        rest = super().parse_args(ctx, args)
        ctx.meta["beam_args"] = tuple(beam)
        return rest


def emit_json(report: dict) -> None:
    click.echo(json.dumps(report, indent=1, sort_keys=True, allow_nan=False))


def run_summary(manifest, output: str) -> dict:
    """What a committed scoring run did, from its manifest (the drift section as written, and
    its two findings apart)."""
    from vaewatch.model.calibration.drift import findings

    found = findings(manifest.drift)
    return {
        "output": output,
        "model_uri": manifest.model.uri,
        "model_version": manifest.model.version,
        "run_id": manifest.run_id,
        "rows": manifest.rows.to_json(),
        "k": manifest.k,
        "seed": manifest.seed,
        "threshold": manifest.threshold,
        "started": manifest.started,
        "finished": manifest.finished,
        "drift": manifest.drift,
        "data_drift_alarm": found["data_drift_alarm"],
        "anomaly_rate": found["anomaly_rate"],
    }


def report_drift(
    runs: list[tuple[str, object]], fail: bool, fail_rate: float | None = None
) -> None:
    """Per (label, manifest), after everything was committed: a stderr line when its day raised
    a data-drift alarm, and a notice when its anomaly rate was above the share the threshold
    flags in calibration. With `fail`, exit 3 when a day raised a data-drift alarm; with
    `fail_rate`, exit 4 when a day's anomaly rate and the lower end of its interval are above
    it (data drift first: it is the graver finding)."""
    from vaewatch.model.calibration.drift import above, findings

    alarms, over = [], []
    for label, manifest in runs:
        found = findings(manifest.drift)
        if found["data_drift_alarm"]:
            alarms.append(label)
            click.echo(f"data drift on {label}: {'; '.join(found['reasons'])}", err=True)
        rate = found["anomaly_rate"]
        if rate is None:
            continue
        low, high = rate["interval"]
        line = (
            f"anomaly rate on {label}: {rate['rate']:.2%} flagged (95 % interval "
            f"{low:.2%}-{high:.2%}), budget {rate['budget']:.2%}"
        )
        if fail_rate is not None and above(rate, fail_rate):
            over.append(label)
            click.echo(f"{line}: above --fail-on-anomaly-rate {fail_rate:.2%}", err=True)
        elif rate["above_expected"]:
            notes(line)
    if alarms and fail:
        raise click.exceptions.Exit(ExitCode.DRIFT)
    if over:
        raise click.exceptions.Exit(ExitCode.ANOMALY_RATE)


def notes(line: str) -> None:
    """A job's lines for the operator (data, epochs, calibration, a day's status): stderr, and
    nothing under -q, which promises only warnings and errors there."""
    if not click.get_current_context().meta.get("quiet"):
        click.echo(line, err=True)


def _wants_bar(asked: bool | None) -> bool:
    """--progress/--no-progress as given; by default a bar when stderr is a terminal (not a
    scheduler's log) and -q was not given."""
    if asked is not None:
        return asked
    return sys.stderr.isatty() and not click.get_current_context().meta.get("quiet")


class RowsBar:
    """A progress bar of the rows a scoring run has scored, on stderr, one per run (a nightly
    backfill draws one per day): sized from the run's plan (its input rows, read from the
    files' footers at launch) and moved by the worker scoring in this process
    (`pipeline.progress.listening`). None is drawn when not wanted, or when the rows are scored
    in other processes (several workers, a remote runner), which report through the log. Log
    lines written while it is drawn on a terminal clear its line first, so they scroll above it
    and it is redrawn below them; it ends when the last row is in."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar = self._listening = None
        self._lock = threading.RLock()
        self._handlers: list[logging.Handler] = []

    def planned(self, plan) -> None:
        from vaewatch.pipeline import progress

        self.close()
        if not (self.enabled and plan.job.options.in_process):
            return
        name = plan.job.output.rstrip("/").rsplit("/", 1)[-1]
        self._bar = click.progressbar(
            length=plan.manifest.rows.rows_in, label=f"scoring {name}", file=sys.stderr,
            show_eta=True, show_pos=True,
        )  # fmt: skip
        self._bar.__enter__()
        if sys.stderr.isatty():
            self._handlers = [h for h in logging.getLogger().handlers if hasattr(h, "vaewatch")]
            for handler in self._handlers:
                handler.addFilter(self._clear_line)
        self._listening = progress.listening(self._advance)
        self._listening.__enter__()

    def _clear_line(self, _record: logging.LogRecord) -> bool:
        with self._lock:
            if self._bar is not None:
                sys.stderr.write("\r\x1b[2K")
        return True

    def _advance(self, rows: int) -> None:
        with self._lock:  # Beam's worker threads report; one draws at a time
            if self._bar is None:
                return
            self._bar.update(rows)
            if self._bar.pos >= self._bar.length:
                self.close()

    def close(self) -> None:
        with self._lock:
            if self._listening is not None:
                self._listening.__exit__(None, None, None)
                self._bar.__exit__(None, None, None)
                self._bar = self._listening = None
            for handler in self._handlers:
                handler.removeFilter(self._clear_line)
            self._handlers = []

    def __enter__(self) -> RowsBar:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def score_options(o: dict, ctx: click.Context):
    """The scoring options of `score` and `nightly` from their parsed options."""
    from vaewatch.model.scoring import ScoringOverrides
    from vaewatch.pipeline.plan import ScoreOptions

    return ScoreOptions(
        overrides=ScoringOverrides(o["k"], o["seed"], o["threshold_quantile"], o["flag_rule"]),
        batch_size=o["batch_size"],
        keep=o["keep"],
        runner=o["runner"],
        workers=o["workers"],
        shards=o["shards"],
        threads=o["threads"],
        precision=o["precision"],
        beam_args=ctx.meta["beam_args"],
    )


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, _param, value: _print_version(ctx) if value else None,
    help="Print vaewatch's version and those of torch, apache-beam, mlflow, pyarrow; exit.",
)
@click.option(
    "-v", "--verbose", count=True, help="More log: vaewatch's debug lines and the libraries' info."
)
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="stderr log lines as text, or as one JSON object per line (for log collectors).",
)
def main(verbose: int, quiet: bool, log_format: str) -> None:
    """vaewatch: score tabular Parquet records by how unlikely they are under a VAE.

    Exit codes: 0 success; 1 the job failed because of its input or configuration (the message
    says what to fix; retrying will not help); 2 usage error, an unknown option included (only
    arguments after -- go to Beam); 75 a service the job needs (tracking server, object store,
    Beam job service or worker pool) did not answer and nothing was committed: retry later; 3
    the run committed but a day raised a data-drift alarm and --fail-on-drift was given; 4 the
    run committed but a day's anomaly rate was above --fail-on-anomaly-rate; 70 vaewatch itself
    crashed (a bug: one line names the file with the traceback; -v prints it).
    """
    for name, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logs.configure(-1 if quiet else verbose, log_format, rewrite=as_options)
    # Beam's filesystems get their options where a command first touches an object store
    # (pipeline.storage.filesystems): query, top, summary and report on a local output, and
    # --help, start without loading Beam
    click.get_current_context().meta["verbose"] = verbose > 0
    click.get_current_context().meta["quiet"] = quiet


def run() -> None:
    """The `vaewatch` console script: tunes the process it owns (OpenMP's spinning must be set
    before torch loads; see vaewatch.model.process), then runs the command line."""
    from vaewatch.model import process

    process.tune()
    logs.install_log_filters()  # before Beam is imported: some of its modules warn as they load
    main()


def version_line() -> str:
    """vaewatch's version and those of the libraries a bug report needs, read from the installed
    packages' metadata (nothing is imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(
        f"{name} {installed(name)}" for name in ("torch", "apache-beam", "mlflow", "pyarrow")
    )
    return f"vaewatch {package_version()} ({libraries}; Python {platform.python_version()})"


def _print_version(ctx: click.Context) -> None:
    click.echo(version_line())
    ctx.exit(0)


@main.command()
@params.workdir
@params.rows_per_day
@params.days
@params.epochs
@params.seed
@params.demo_k
def demo(workdir, rows_per_day, days, epochs, seed, k) -> None:
    """Run the whole loop on generated data: partitions, training, IWAE scoring, ROC-AUC."""
    from vaewatch.jobs.demo import run

    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise JobFailed(
            f"cannot create the demo directory {str(workdir)!r}: {err.strerror}. "
            "Pass a writable --workdir (or set VAEWATCH_DEMO_WORKDIR)."
        ) from err
    with user_errors_exit_1():
        run(
            workdir,
            rows_per_day=rows_per_day,
            days=days,
            epochs=epochs,
            seed=seed,
            k=k,
            echo=click.echo,
        )


@main.command("train")
@params.data
@params.json_report
@params.model_name
@params.tracking_uri
@params.experiment
@params.alias
@params.training_options
def train_command(**options) -> None:
    """Train a VAE on Parquet, log the run to MLflow, register a model version, set an alias.

    Prints the model URI (models:/NAME/VERSION) on the last line of stdout.
    """
    from vaewatch.jobs.train import TrainJob, run
    from vaewatch.model import defaults, registry
    from vaewatch.model.artifact import ScoringDefaults
    from vaewatch.model.training.fit import FitConfig
    from vaewatch.model.training.loop import TrainConfig

    o = options
    with user_errors_exit_1():
        train = TrainConfig(
            epochs=o["epochs"],
            batch_size=o["batch_size"],
            learning_rate=o["learning_rate"],
            weight_decay=o["weight_decay"],
            objective=o["objective"],
            train_k=o["train_k"],
            kl_warmup_epochs=o["kl_warmup_epochs"],
            free_bits=o["free_bits"],
            profile=o["profile"],
            robust_trim=o["robust_trim"],
            trim_weight=o["trim_weight"],
            robust_drop=o["robust_drop"],
            trim_from_start=o["trim_from_start"],
            weight_prior=o["weight_prior"],
            refit=o["refit"],
            refit_fence=o["refit_fence"],
            validation_fraction=o["validation_fraction"],
            patience=o["patience"],
            min_steps_per_epoch=o["min_steps_per_epoch"],
            seed=o["seed"],
            device=o["device"],
            mixed_precision=o["mixed_precision"],
            threads=o["threads"],
            validation_k=o["k"] or defaults.K,
        )
        fit = FitConfig(
            id_column=o["id_column"],
            exclude=o["exclude"],
            features=o["features"],
            categorical=o["categorical"],
            continuous=o["continuous"],
            max_categories=o["max_categories"],
            min_category_count=o["min_category_count"],
            min_category_share=o["min_category_share"],
            missingness=o["missingness"],
            latent_dim=o["latent_dim"],
            hidden=o["hidden"],
            train=train,
            scoring=ScoringDefaults(k=o["k"] or defaults.K, seed=o["seed"]),
            k_budget=defaults.K_BUDGET if o["k"] is None else None,
            threshold_quantile=o["threshold_quantile"],
            flag_rule=o["flag_rule"],
            segment_column=o["segment_column"],
            max_validation_rows=o["max_validation_rows"],
            cache_bytes=o["cache_mib"] * 2**20,
        )
        job = TrainJob(
            data=o["data"],
            model_name=o["model_name"],
            tracking_uri=o["tracking_uri"] or registry.default_tracking_uri(),
            fit=fit,
            experiment=o["experiment"],
            alias=o["alias"],
            progress=(
                sys.stderr.isatty() and not click.get_current_context().meta["quiet"]
                if o["progress"] is None
                else o["progress"]
            ),
        )
        outcome = run(job, echo=notes)
    if options["json_report"]:
        fitted = outcome.fitted
        emit_json(
            {
                "command": "train",
                "model_uri": outcome.resolved.uri,
                "model_name": outcome.resolved.name,
                "model_version": outcome.resolved.version,
                "alias": job.alias,
                "run_id": outcome.resolved.run_id,
                "rows": fitted.prepared.counts.to_json(),
                "epochs": len(fitted.history),
                # null when every epoch ran inside the KL warm-up (none was chosen); the
                # registered weights are then the last epoch's, as kept_epoch says
                "best_epoch": fitted.best_epoch if fitted.best_epoch >= 0 else None,
                "kept_epoch": fitted.best_epoch % len(fitted.history),
                "threshold": fitted.artifact.calibration.threshold(),
                "data_fingerprint": fitted.prepared.fingerprint.digest,
            }
        )
        return
    click.echo(outcome.resolved.uri)


@main.command("score", cls=BeamCommand)
@params.input_path
@params.output
@params.model_uri
@params.tracking_uri
@params.scoring_options
@params.json_report
@click.pass_context
def score_command(ctx, **o) -> None:
    """Score Parquet with a registered model in a Beam pipeline; commit OUTPUT atomically.

    Writes OUTPUT/part-*.parquet (kept columns + scores), OUTPUT/_rejected/ (rows that could
    not be scored, with a reason), OUTPUT/_manifest.json and OUTPUT/_SUCCESS. Arguments after
    `--` are passed to Beam as pipeline options (e.g. -- --project p --region r).
    """
    from vaewatch.model import registry
    from vaewatch.pipeline.score import ScoreJob, run

    with user_errors_exit_1():
        job = ScoreJob(
            input=o["input_path"],
            output=o["output"],
            model=o["model_uri"],
            tracking_uri=o["tracking_uri"] or registry.default_tracking_uri(),
            options=score_options(o, ctx),
        )
        with RowsBar(_wants_bar(o["progress"])) as bar:
            result = run(job, on_planned=bar.planned)
    if o["json_report"]:
        emit_json({"command": "score", **run_summary(result.manifest, result.output)})
    else:
        rows = result.manifest.rows
        notes(
            f"scored {rows.scored:,} of {rows.rows_in:,} rows ({rows.rejected:,} rejected) "
            f"with {result.manifest.model.uri} -> {result.output}"
        )
        click.echo(result.output)
    report_drift([(result.output, result.manifest)], o["fail_on_drift"], o["fail_on_anomaly_rate"])


@main.command("nightly", cls=BeamCommand)
@params.date
@params.from_date
@params.to_date
@params.input_root
@params.output_root
@params.model_uri
@params.tracking_uri
@params.catch_up
@params.force
@params.scoring_options
@params.json_report
@click.pass_context
def nightly_command(ctx, **o) -> None:
    """Score one day's partition (default: yesterday, UTC), a --from/--to backfill, or with
    --catch-up every input partition up to yesterday.

    Reads INPUT_ROOT/dt=DATE/ and commits OUTPUT_ROOT/dt=DATE/ atomically; a re-run replaces
    the day, and a day already committed with the same model version and the same input files
    is skipped unless --force (changed inputs are re-scored). The alias is pinned once for the
    whole run.
    """
    from vaewatch.jobs.days import days_to_score
    from vaewatch.jobs.nightly import NightlyJob, run_nightly
    from vaewatch.model import registry

    with user_errors_exit_1():
        job = NightlyJob(
            input_root=o["input_root"],
            output_root=o["output_root"],
            model=o["model_uri"],
            tracking_uri=o["tracking_uri"] or registry.default_tracking_uri(),
            days=days_to_score(
                o["date"],
                o["from_date"],
                o["to_date"],
                catch_up=o["catch_up"],
                input_root=o["input_root"],
            ),  # fmt: skip
            force=o["force"],
            options=score_options(o, ctx),
        )
        with RowsBar(_wants_bar(o["progress"])) as bar:
            outcomes = run_nightly(job, echo=notes, on_planned=bar.planned)
    from vaewatch.pipeline.commit import read_manifest

    manifests = [(outcome, read_manifest(outcome.output)) for outcome in outcomes]
    if o["json_report"]:
        days = [
            {"day": str(out.day), "status": out.status, **run_summary(manifest, out.output)}
            for out, manifest in manifests
        ]
        emit_json({"command": "nightly", "model": job.model, "days": days})
    else:
        for outcome, _ in manifests:
            click.echo(outcome.output)
    scored = [(str(out.day), m) for out, m in manifests if out.status != "skipped"]
    report_drift(scored, o["fail_on_drift"], o["fail_on_anomaly_rate"])


@main.command("query")
@params.scored_output
@click.argument("sql")
@params.output_format
@params.result_out
def query_command(output, sql, output_format, result_out) -> None:
    """Run SQL over the committed output in OUTPUT: views `scores` and `rejected` (the rows not
    scored, with their `reason`), both with a `dt` column, and `runs` (one row per run).

    Example: vaewatch query scores "SELECT dt, count(*) FROM scores GROUP BY dt"
    """
    import duckdb

    from vaewatch.jobs.query import connect, write_result

    with user_errors_exit_1():
        con = connect(output)
        try:
            result = con.sql(sql)
        except duckdb.Error as err:
            raise UserError(f"DuckDB rejected the query: {err}") from err
        if result is None:
            raise UserError("the SQL returned no result set; use a SELECT over `scores`")
        write_result(result, output_format, result_out, echo=click.echo)


@main.command("top")
@params.scored_output
@params.top_date
@params.top_n
@params.output_format
@params.result_out
def top_command(output, date, limit, output_format, result_out) -> None:
    """The most anomalous committed records in OUTPUT, with the features behind them."""
    from vaewatch.jobs.days import parse_date
    from vaewatch.jobs.query import connect, top, write_result

    with user_errors_exit_1():
        day = parse_date(date) if date else None
        con = connect(output)  # held while the relation is read: duckdb before 2.0 closes it
        write_result(top(con, day, limit), output_format, result_out, click.echo)


@main.command("summary")
@params.scored_output
@params.output_format
@params.result_out
@params.by_segment
def summary_command(output, output_format, result_out, by_segment) -> None:
    """Per day: rows, anomalies, anomaly rate and its interval, data drift, score quantiles and
    model version."""
    from vaewatch.jobs.query import connect, summary, summary_by_segment, write_result

    with user_errors_exit_1():
        con = connect(output)  # held while the relation is read: duckdb before 2.0 closes it
        relation = summary_by_segment(con) if by_segment else summary(con)
        write_result(relation, output_format, result_out, click.echo)


@main.command("report")
@params.scored_output
@params.report_out
@params.top_n
def report_command(output, report_out, limit) -> None:
    """Write a self-contained HTML report (plots + the latest day's top anomalies)."""
    from vaewatch.jobs.report import write

    with user_errors_exit_1():
        path = write(output, report_out, top_n=limit)
    click.echo(str(path))


@main.group("models", invoke_without_command=True)
@params.tracking_uri
@click.pass_context
def models_group(ctx, tracking_uri) -> None:
    """List registered models: versions, aliases, data fingerprints and training metrics."""
    from vaewatch.jobs.models import list_versions
    from vaewatch.jobs.query import format_table
    from vaewatch.model import registry

    ctx.obj = tracking_uri or registry.default_tracking_uri()
    if ctx.invoked_subcommand is None:
        with user_errors_exit_1():
            columns, rows = list_versions(ctx.obj)
        click.echo(format_table(columns, rows) if rows else "no registered models")


@models_group.command("promote")
@click.argument("name")
@click.argument("version")
@params.alias
@params.json_report
@click.pass_obj
def promote_command(tracking_uri, name, version, alias, json_report) -> None:
    """Point ALIAS (default champion) at VERSION of the registered model NAME."""
    from vaewatch.jobs.models import promote

    with user_errors_exit_1():
        promote(tracking_uri, name, version, alias)
    if json_report:
        emit_json({"command": "models promote", "alias_uri": f"models:/{name}@{alias}",
                    "model_uri": f"models:/{name}/{version}"})  # fmt: skip
        return
    click.echo(f"models:/{name}@{alias} -> models:/{name}/{version}")


params.assign_envvars(main)

if __name__ == "__main__":
    sys.exit(main())
