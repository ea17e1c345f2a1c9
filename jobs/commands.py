"""What every vaewatch command shares: exit codes and the one-paragraph failure, the Beam
pass-through of arguments after `--`, the JSON report, and log filters for Beam's noise."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import tempfile
import traceback

import click

from vaewatch.model.errors import DependencyUnavailable, UserError


class _QuietBeamImports(logging.Filter):
    """Beam's GCP modules warn at import time when the GCP client libraries are absent; that
    is expected here and says nothing about the job, so it is kept off the user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


class _OneLineBeamErrors(logging.Filter):
    """Beam logs a failing step's traceback before re-raising it; vaewatch turns the failures
    a user can cause (a corrupt file, a full disk) into one clear message, so the log keeps
    Beam's one-line summary and drops the stack. VAEWATCH_DEBUG=1 keeps it; an unexpected
    error still ends in its own traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not os.environ.get("VAEWATCH_DEBUG"):
            record.exc_info, record.exc_text = None, None
        return True


def install_log_filters() -> None:
    """The CLI's filters for Beam's noise (above); installed by the process that owns the log
    (the `vaewatch` command), never by importing vaewatch. Idempotent."""
    root = logging.getLogger()
    if not any(isinstance(f, _QuietBeamImports) for f in root.filters):
        root.addFilter(_QuietBeamImports())
    for name in ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker"):
        named = logging.getLogger(name)
        if not any(isinstance(f, _OneLineBeamErrors) for f in named.filters):
            named.addFilter(_OneLineBeamErrors())


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
    DRIFT = 3  # the job succeeded and committed, a day raised a drift alarm, --fail-on-drift
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


@contextlib.contextmanager
def user_errors_exit_1():
    """Turn a UserError (bad input, missing model, ...) into JobFailed: its message, exit 1;
    a dependency that did not answer into exit 75, which a scheduler may retry."""
    try:
        yield
    except DependencyUnavailable as err:
        failed = JobFailed(f"{err} Retry later (exit {ExitCode.TEMPFAIL}).")
        failed.exit_code = ExitCode.TEMPFAIL
        raise failed from err
    except UserError as err:
        raise JobFailed(str(err)) from err


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
    """What a committed scoring run did, from its manifest."""
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
    }


def report_drift(runs: list[tuple[str, object]], fail: bool) -> None:
    """A stderr line per (label, manifest) whose day raised a drift alarm; with `fail`, exit 3
    when any did (after everything was committed)."""
    alarms = [(label, m) for label, m in runs if m.drift.get("alarm")]
    for label, manifest in alarms:
        reasons = "; ".join(manifest.drift.get("reasons", []))
        click.echo(f"drift alarm on {label}: {reasons}", err=True)
    if alarms and fail:
        raise click.exceptions.Exit(ExitCode.DRIFT)


def notes(line: str) -> None:
    """A job's lines for the operator (data, epochs, calibration, a day's status): stderr, and
    nothing under -q, which promises only warnings and errors there."""
    if not click.get_current_context().meta.get("quiet"):
        click.echo(line, err=True)


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
