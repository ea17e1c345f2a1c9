"""Every CLI option, defined once, with help text: the shared ones and scoring's first, then
`vaewatch train`'s (data and features, the network, training, calibration). Environment
variables are given per command by `assign_envvars`: VAEWATCH_<COMMAND>_<NAME>
(VAEWATCH_SCORE_BATCH_SIZE), so no variable sets options of two commands; the few options that
mean the same everywhere keep VAEWATCH_<NAME>."""

from __future__ import annotations

from pathlib import Path

import click

from vaewatch.model import defaults
from vaewatch.model.choices import FlagRule, Missingness, Objective, Precision, TrainingProfile
from vaewatch.model.errors import UserError
from vaewatch.model.training.sizing import SMALL_TABLE_MAX_ROWS
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
    help="Daily partitions to generate: the first trains the model, the rest are scored; with "
    "three or more, the last has every amount x1.6 (a shifted day, which raises data drift).",
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
    default=None,
    show_default="chosen per model, as train does",
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
    help="Exit 3 after committing when a scored day raises a data-drift alarm: the bulk of its "
    "records is distributed differently from the model's calibration sample (the alarm is "
    "written into the manifest and logged either way). More anomalies than usual is not data "
    "drift: see --fail-on-anomaly-rate.",
)
fail_on_anomaly_rate = option(
    "--fail-on-anomaly-rate",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=None,
    metavar="RATE",
    help="Exit 4 after committing when a scored day's share of flagged records is above RATE "
    "(e.g. 0.02) and so is the lower end of its 95 % interval (default: the rate is reported, "
    "never an exit code).",
)


score_progress = option(
    "--progress/--no-progress",
    default=None,
    show_default="on when stderr is a terminal",
    help="Show a progress bar of the rows scored (the local runner with one worker: the rows "
    "are scored in this process). The log's progress lines are written either way.",
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
            fail_on_anomaly_rate,
            score_progress,
        ]
    ):
        command = decorate(command)
    return command


# ================================================================== vaewatch train
# ------------------------------------------------------------------ data and features
data = option(
    "--data",
    required=True,
    callback=stored,
    help="Training Parquet: a file, a directory (every *.parquet below it) or a glob; local "
    "paths or any URI pyarrow reads (s3://, gs://, hdfs://).",
)
id_column = option(
    "--id-column", default=None, help="Record id column: kept in outputs, never a feature."
)
exclude = option(
    "--exclude",
    type=CommaList(),
    default="",
    help="Columns that are not features (comma-separated).",
)
features = option(
    "--features",
    type=CommaList(),
    default=None,
    help="Use only these feature columns (default: every numeric, boolean and string column).",
)
categorical = option(
    "--categorical",
    type=CommaList(),
    default="",
    help="Integer columns to model as categories instead of numbers.",
)
continuous = option(
    "--continuous",
    type=CommaList(),
    default="",
    help="Columns that must be modelled as continuous numbers (checked: they must be numeric).",
)
max_categories = option(
    "--max-categories",
    type=click.IntRange(min=1),
    default=defaults.MAX_CATEGORIES,
    help="Largest vocabulary per categorical column; rarer values share the out-of-vocabulary "
    "bucket.",
)
min_category_count = option(
    "--min-category-count",
    type=click.IntRange(min=1),
    default=defaults.MIN_CATEGORY_COUNT,
    help="A category needs this many training rows to get its own vocabulary entry.",
)
min_category_share = option(
    "--min-category-share",
    type=click.FloatRange(0, 1, max_open=True),
    default=defaults.MIN_CATEGORY_SHARE,
    help="... and this share of the training rows (rarer values share the out-of-vocabulary "
    "bucket; 0 = no share rule).",
)
missingness = option(
    "--missingness",
    type=click.Choice(Missingness.values()),
    default=defaults.MISSINGNESS,
    help="model: which values are missing is part of the record (an unusual gap costs nats); "
    "marginal: a missing value is marginalised out and costs nothing.",
)

# ------------------------------------------------------------------ model and training
latent_dim = option(
    "--latent-dim",
    type=click.IntRange(min=1),
    default=None,
    show_default=f"scaled to the training rows, {defaults.LATENT_DIM} from "
    f"{defaults.LATENT_DIM * defaults.ROWS_PER_LATENT} rows",
    help="Latent dimensions.",
)
hidden = option(
    "--hidden",
    type=IntList(),
    default=None,
    show_default=f"scaled to the training rows, {','.join(map(str, defaults.HIDDEN))} from "
    f"{int(max(defaults.HIDDEN) * defaults.ROWS_PER_HIDDEN_UNIT / 2**0.5) + 1} rows",
    help="Encoder/decoder hidden widths.",
)
batch_size = option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=defaults.BATCH_SIZE,
    help="Training mini-batch rows.",
)
learning_rate = option(
    "--learning-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=defaults.LEARNING_RATE,
    help="Adam step.",
)
weight_decay = option(
    "--weight-decay",
    type=click.FloatRange(min=0),
    default=defaults.WEIGHT_DECAY,
    help="Adam weight decay.",
)
objective = option(
    "--objective",
    type=click.Choice(Objective.values()),
    default=defaults.OBJECTIVE,
    help="Training objective: the ELBO, or the importance-weighted bound with --train-k samples.",
)
train_k = option(
    "--train-k",
    type=click.IntRange(min=1),
    default=defaults.TRAIN_K,
    help="IWAE samples for --objective iwae.",
)
kl_warmup_epochs = option(
    "--kl-warmup-epochs",
    type=click.IntRange(min=0),
    default=defaults.KL_WARMUP_EPOCHS,
    help="Epochs over which the KL weight rises from 0 to 1 (ELBO objective).",
)
free_bits = option(
    "--free-bits",
    type=click.FloatRange(min=0),
    default=defaults.FREE_BITS,
    help="Nats per latent dimension of KL that are not penalised (0 = off).",
)
# robust training: unset, each of these takes the profile for the table's size
# (model/training/sizing.py)
_PROFILE = (
    f"Default: by the table's size; up to {SMALL_TABLE_MAX_ROWS} training rows (a narrowed "
    f"network) {{small}}, from {SMALL_TABLE_MAX_ROWS + 1} rows {{large}}."
)


def _by_size(name: str, show=str) -> str:
    small, large = defaults.SMALL_TABLE_TRAINING[name], defaults.LARGE_TABLE_TRAINING[name]
    return _PROFILE.format(small=show(small), large=show(large))


training_profile = option(
    "--training-profile",
    "profile",
    type=click.Choice(TrainingProfile.values()),
    default="auto",
    help="The robust-training profile: auto picks it by the training rows (small up to "
    f"{SMALL_TABLE_MAX_ROWS}, where the network is narrowed; large from "
    f"{SMALL_TABLE_MAX_ROWS + 1}); small or large forces one, e.g. large on "
    "a small table known to be clean (the small profile fits a minority of normal rows less "
    "well). --robust-trim, --trim-weight, --robust-drop, --trim-from-start, --weight-prior and "
    "--refit given explicitly override the profile's value.",
)
robust_trim = option(
    "--robust-trim",
    type=click.FloatRange(0, 0.5, max_open=True),
    default=None,
    help="Each batch's worst-explained share of rows counts only --trim-weight in the loss "
    "(after the KL warm-up unless --trim-from-start), so anomalies in the training data are not "
    "learned as normal (0 = plain likelihood). " + _by_size("robust_trim"),
)
trim_weight = option(
    "--trim-weight",
    type=click.FloatRange(0, 1),
    default=None,
    help="What a trimmed row's loss counts (0 = left out, 1 = no trim). Above 0 a long "
    "legitimate tail is still learned under a large --robust-trim; a tight cluster of repeated "
    "anomalies may be learned too (see --robust-drop). " + _by_size("trim_weight"),
)
robust_drop = option(
    "--robust-drop",
    type=click.FloatRange(0, 0.5, max_open=True),
    default=None,
    help="With --trim-weight above 0: the worst-explained share of each batch that still counts "
    "nothing once the KL warm-up is over (at most --robust-trim). " + _by_size("robust_drop"),
)
trim_from_start = option(
    "--trim-from-start/--trim-after-warmup",
    default=None,
    help="Trim from the first update rather than after the KL warm-up, by which time a cluster "
    "of anomalies larger than the trim may have been learned. "
    + _by_size("trim_from_start", lambda v: "from the start" if v else "after the warm-up"),
)
weight_prior = option(
    "--weight-prior",
    type=click.FloatRange(min=0),
    default=None,
    help="Precision of a Gaussian prior on the network's weights, for the table as a whole "
    "(the L2 penalty per row is this over the training rows): strong on a table of a few "
    "dozen rows, negligible on a large one (0 = off). " + _by_size("weight_prior"),
)
refit = option(
    "--refit/--no-refit",
    default=None,
    help="After the robust fit, refit the plain likelihood at a tenth of the learning rate on "
    "every training row except those it explains beyond --refit-fence interquartile ranges "
    "above the upper quartile of the validation rows' -IWAE, so a clean table keeps its "
    "density's tails. " + _by_size("refit", lambda v: "on" if v else "off"),
)
refit_fence = option(
    "--refit-fence",
    type=click.FloatRange(min=0, min_open=True),
    default=defaults.REFIT_FENCE,
    help="The refit's cutoff, in interquartile ranges above the upper quartile (3: Tukey's "
    "far-out fence).",
)
validation_fraction = option(
    "--validation-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=defaults.VALIDATION_FRACTION,
    help="Rows held out (by seeded hash) for early stopping and calibration.",
)
patience = option(
    "--patience",
    type=click.IntRange(min=1),
    default=defaults.PATIENCE,
    help="Epochs without validation improvement before training stops.",
)
min_steps_per_epoch = option(
    "--min-steps-per-epoch",
    type=click.IntRange(min=1),
    default=defaults.MIN_STEPS_PER_EPOCH,
    help="Updates per epoch at least: a small table is passed over several times per epoch.",
)
device = option(
    "--device",
    default=defaults.DEVICE,
    help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
)
mixed_precision = option(
    "--mixed-precision/--no-mixed-precision",
    default=defaults.MIXED_PRECISION,
    help="bfloat16 autocast when training on CUDA (no effect on CPU).",
)
max_validation_rows = option(
    "--max-validation-rows",
    type=click.IntRange(min=100),
    default=defaults.MAX_VALIDATION_ROWS,
    help="Held-out rows kept in memory for validation and calibration (a seeded sample).",
)
cache_bytes = option(
    "--cache-mib",
    type=click.IntRange(min=0),
    default=defaults.CACHE_BYTES // 2**20,
    help="Keep encoded training rows in memory up to this size; larger data is streamed from "
    "Parquet every epoch.",
)
progress = option(
    "--progress/--no-progress",
    default=None,
    show_default="on when stderr is a terminal",
    help="Show a progress bar with the live loss.",
)
score_k = option(
    "--k",
    type=click.IntRange(min=1),
    default=None,
    show_default=f"chosen per model from {', '.join(map(str, defaults.K_LADDER))}",
    help="IWAE samples per record the model scores with (used for calibration, stored with the "
    "model as its default). Unset: the smallest of "
    f"{', '.join(map(str, defaults.K_LADDER))} whose validation rows' mean log-likelihood is "
    f"within {defaults.K_BUDGET:g} nats of K={defaults.K_REFERENCE:,}'s, on the points scoring "
    "uses.",
)
train_threshold_quantile = option(
    "--threshold-quantile",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=defaults.THRESHOLD_QUANTILE,
    help="Share of validation rows NOT flagged: is_anomaly flags 1 - this of them (stored with "
    "the model as its default).",
)
flag_rule = option(
    "--flag-rule",
    type=click.Choice(FlagRule.values()),
    default=defaults.FLAG_RULE,
    help="is_anomaly: 'any' flags a record whose total score, any single feature, or its "
    "discrete values given its continuous ones is in its own calibration tail (at one level, "
    "flagging 1 - the threshold quantile of validation rows); 'total': anomaly_score above its "
    "validation quantile only.",
)

segment_column = option(
    "--segment-column",
    default=None,
    metavar="COL",
    help="A categorical feature whose values each get their own threshold, score quantiles and "
    "drift reference (values with at least 1,000 validation rows; the rest, a null and a value "
    "not seen in training are judged by the global baseline). It stays a model feature. The "
    "output's `baseline` column says which judged each record.",
)

by_segment = option(
    "--by-segment/--no-by-segment",
    default=False,
    help="One row per day and baseline (a segment's own, or the global one and why), with the "
    "segment's data-drift finding (models trained with --segment-column).",
)


def training_options(command):
    """The options of `train` after --data and the MLflow ones, in the order --help lists
    them."""
    for decorate in reversed(
        [
            id_column,
            exclude,
            features,
            categorical,
            continuous,
            max_categories,
            min_category_count,
            min_category_share,
            missingness,
            latent_dim,
            hidden,
            train_epochs,
            batch_size,
            learning_rate,
            weight_decay,
            objective,
            train_k,
            kl_warmup_epochs,
            free_bits,
            training_profile,
            robust_trim,
            trim_weight,
            robust_drop,
            trim_from_start,
            weight_prior,
            refit,
            refit_fence,
            validation_fraction,
            patience,
            min_steps_per_epoch,
            seed,
            device,
            mixed_precision,
            threads,
            score_k,
            train_threshold_quantile,
            flag_rule,
            segment_column,
            max_validation_rows,
            cache_bytes,
            progress,
        ]
    ):
        command = decorate(command)
    return command
