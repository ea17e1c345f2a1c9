"""Every CLI option, defined once, with help text. Environment variables are given per command
by `assign_envvars`: VAEWATCH_<COMMAND>_<NAME> (VAEWATCH_SCORE_BATCH_SIZE), so no variable sets
options of two commands; the few options that mean the same everywhere keep VAEWATCH_<NAME>."""

from __future__ import annotations

from pathlib import Path

import click

from vaewatch.model import defaults
from vaewatch.model.choices import FlagRule, Precision
from vaewatch.model.errors import UserError
from vaewatch.pipeline import storage

ENV_PREFIX = "VAEWATCH_"


SHARED = ("tracking_uri", "model_uri")  # one meaning in every command: VAEWATCH_<NAME>


def option(*decls: str, **kwargs):
    """click.option that shows its default and environment variable in --help."""
    kwargs.setdefault("show_envvar", True)
    kwargs.setdefault("show_default", True)
    return click.option(*decls, **kwargs)


def stored(ctx: click.Context, param: click.Parameter, value):
    """Callback of every option that names data: a scheme whose client libraries are missing
    fails here, exit 1, naming the extra to install."""
    if value:
        name = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
        try:
            storage.require(value, name)
        except UserError as err:
            raise click.ClickException(str(err)) from err
    return value


def envvar_name(option: click.Option, command_path: tuple[str, ...]) -> str:
    """--batch-size of `score` -> VAEWATCH_SCORE_BATCH_SIZE; a shared option -> VAEWATCH_<NAME>."""
    flag = next(o for o in option.opts if o.startswith("--")).split("/")[0][2:]
    scope = () if option.name in SHARED else command_path
    return ENV_PREFIX + "_".join([*scope, flag]).replace("-", "_").upper()


def assign_envvars(group: click.Group, path: tuple[str, ...] = ()) -> None:
    """Give every option of every command below `group` its environment variable (a tool's
    own variable, like MLFLOW_TRACKING_URI, stays as the fallback after vaewatch's)."""
    for name, command in group.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                own = envvar_name(param, (*path, name))
                extra = [] if param.envvar is None else [param.envvar] if isinstance(
                    param.envvar, str) else list(param.envvar)  # fmt: skip
                param.envvar = [own, *[e for e in extra if not e.startswith(ENV_PREFIX)]]
        if isinstance(command, click.Group):
            assign_envvars(command, (*path, name))


workdir = option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("vaewatch-demo"),
    help="Directory for the demo's generated data and outputs (created if missing).",
)
rows_per_day = option(
    "--rows-per-day",
    type=click.IntRange(min=500),
    default=defaults.DEMO_ROWS_PER_DAY,
    help="Synthetic rows generated per daily partition.",
)
days = option(
    "--days",
    type=click.IntRange(min=2),
    default=defaults.DEMO_DAYS,
    help="Daily partitions to generate: the first trains the model, the rest are scored.",
)
seed = option(
    "--seed", type=int, default=defaults.SEED, help="Seed for data, training and scoring noise."
)
epochs = option(
    "--epochs",
    type=click.IntRange(min=1),
    default=defaults.DEMO_EPOCHS,
    help="Maximum training epochs.",
)
train_epochs = option(
    "--epochs", type=click.IntRange(min=1), default=defaults.EPOCHS, help="Maximum training epochs."
)
k = option(
    "--k",
    type=click.IntRange(min=1),
    default=None,
    help="IWAE importance samples per record (default: the model's).",
)
demo_k = option(
    "--k",
    type=click.IntRange(min=1),
    default=defaults.K,
    help="IWAE importance samples per record, at calibration and at scoring.",
)


class CommaList(click.ParamType):
    """'a,b , c' -> ('a', 'b', 'c'); the same in an env var."""

    name = "COL,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple | list):
            return tuple(value)
        return tuple(item.strip() for item in str(value).split(",") if item.strip())


class IntList(CommaList):
    name = "N,..."

    def convert(self, value, param, ctx):
        items = super().convert(value, param, ctx)
        try:
            sizes = tuple(int(item) for item in items)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if not sizes or min(sizes) < 1:
            self.fail(f"{value!r}: give at least one width, each >= 1", param, ctx)
        return sizes


# ------------------------------------------------------------------ MLflow
tracking_uri = option(
    "--tracking-uri",
    envvar=["MLFLOW_TRACKING_URI"],  # after VAEWATCH_TRACKING_URI (assign_envvars)
    default=None,
    show_default="a SQLite file mlflow.db in the working directory",
    help="MLflow tracking and registry URI (http://host:5000, sqlite:///path.db, ...).",
)
experiment = option(
    "--experiment",
    default=defaults.EXPERIMENT,
    help="MLflow experiment the training run is logged under.",
)
model_name = option(
    "--model-name", required=True, help="Registered model name; each training adds a version."
)
alias = option("--alias", default=defaults.ALIAS, help="Registry alias pointed at the new version.")

# ------------------------------------------------------------------ scoring
threshold_quantile = option(
    "--threshold-quantile",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Share of validation rows is_anomaly leaves unflagged, 1 - the share it flags "
    "(default: the model's).",
)
score_flag_rule = option(
    "--flag-rule",
    type=click.Choice(FlagRule.values()),
    default=None,
    help="is_anomaly's rule: 'any' (the total score or one feature in its tail) or 'total' "
    "(anomaly_score alone) (default: the model's).",
)

input_path = option(
    "--input",
    "input_path",
    required=True,
    callback=stored,
    help="Parquet to score: a file, a directory (every *.parquet below it) or a glob; local "
    "paths or any URI pyarrow reads.",
)
output = option(
    "--output",
    required=True,
    callback=stored,
    help="Output directory (local, gs://, s3://). A run replaces it as a whole, atomically.",
)
model_uri = option(
    "--model",
    "model_uri",
    required=True,
    help="models:/NAME@ALIAS, models:/NAME/VERSION or a local model folder. An alias is "
    "resolved to one version at launch and recorded in the output.",
)
keep = option(
    "--keep",
    type=CommaList(),
    default=None,
    show_default="the model's id column",
    help="Input columns copied to the scored output (comma-separated).",
)
score_seed = option(
    "--seed",
    type=int,
    default=None,
    show_default="the model's",
    help="Seed of the scoring noise (common random numbers).",
)
score_batch_size = option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=defaults.SCORE_BATCH_SIZE,
    help="Rows scored per model call (scores do not depend on it).",
)
runner = option(
    "--runner",
    default="local",
    help="Beam runner: local (in-process, the default), DataflowRunner, FlinkRunner, "
    "SparkRunner, PortableRunner, ... Further Beam options go after `--`.",
)
workers = option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    help="Local runner only: worker processes (multi-processing) instead of in-process.",
)
shards = option(
    "--shards",
    type=click.IntRange(min=0),
    default=0,
    help="Number of scored output files (0: the runner decides).",
)

# ------------------------------------------------------------------ nightly and reading
date = option(
    "--date",
    default=None,
    show_default="yesterday (UTC)",
    help="The day to score, YYYY-MM-DD: reads INPUT_ROOT/dt=DATE/, writes OUTPUT_ROOT/dt=DATE/.",
)
from_date = option(
    "--from",
    "from_date",
    default=None,
    help="Backfill: first day (YYYY-MM-DD), with --to; one committed partition per day.",
)
to_date = option("--to", "to_date", default=None, help="Backfill: last day (YYYY-MM-DD).")
input_root = option(
    "--input-root",
    required=True,
    callback=stored,
    help="Folder holding the dt=YYYY-MM-DD/ input partitions.",
)
output_root = option(
    "--output-root",
    required=True,
    callback=stored,
    help="Folder receiving the dt=YYYY-MM-DD/ scored partitions.",
)
scored_output = click.argument("output", callback=stored)
catch_up = option(
    "--catch-up/--no-catch-up",
    default=False,
    help="Score every input partition up to yesterday (UTC) that has no committed output, or a "
    "stale one, oldest first; --from bounds it (default: the earliest input partition).",
)
force = option(
    "--force/--no-force",
    default=False,
    help="Re-score days already committed with the same model version.",
)
output_format = option(
    "--format",
    "output_format",
    type=click.Choice(["table", "csv", "json", "jsonl", "parquet"]),
    default="table",
    help="Result format: json is one JSON array (NaN as null), jsonl one object per line; "
    "parquet needs --out.",
)
result_out = option(
    "--out", "result_out", default=None, help="Write the result to this file instead of stdout."
)
top_n = option("--limit", "-n", "limit", type=click.IntRange(min=1), default=20, help="Rows shown.")
top_date = option(
    "--date", default=None, help="Only this day (YYYY-MM-DD); default all committed days."
)
report_out = option(
    "--out",
    "report_out",
    default="vaewatch-report.html",
    help="Where to write the HTML report (one self-contained file).",
)


threads = option(
    "--threads",
    type=click.IntRange(min=1),
    default=defaults.THREADS,
    show_default="the cores this process may use (affinity and cgroup quota), shared by --workers",
    help="Torch threads per process. Give 1 on runners that start one worker process per core "
    "(Dataflow, Spark).",
)


precision = option(
    "--precision",
    type=click.Choice(Precision.values()),
    default=defaults.PRECISION,
    help="The network's matmuls: bf16 (log-densities stay float32/64), fp32, or auto: bf16 "
    "where the CPU or GPU has it natively.",
)


json_report = option(
    "--json/--no-json",
    "json_report",
    default=False,
    help="Print one JSON object describing what the run did on stdout (for schedulers, XCom).",
)


fail_on_drift = option(
    "--fail-on-drift/--no-fail-on-drift",
    default=False,
    help="Exit 3 after committing when a scored day raises a drift alarm against the model's "
    "calibration (the alarm is written into the manifest and logged either way).",
)


def scoring_options(command):
    """The options `score` and `nightly` share, applied in one place."""
    for decorate in reversed(
        [
            k,
            score_seed,
            score_batch_size,
            keep,
            threshold_quantile,
            score_flag_rule,
            runner,
            workers,
            shards,
            threads,
            precision,
            fail_on_drift,
        ]
    ):
        command = decorate(command)
    return command
