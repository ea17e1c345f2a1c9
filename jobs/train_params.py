"""The options of `vaewatch train`: data and features, the network, training, calibration."""

from __future__ import annotations

import click

from vaewatch.jobs.params import (
    CommaList,
    IntList,
    option,
    seed,
    stored,
    threads,
    train_epochs,
)
from vaewatch.model import defaults
from vaewatch.model.choices import FlagRule, Missingness, Objective, TrainingProfile
from vaewatch.model.training.sizing import SMALL_TABLE_MAX_ROWS

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
    "well). --robust-trim, --trim-weight, --robust-drop, --trim-from-start and --weight-prior "
    "given explicitly override the profile's value.",
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
    default=defaults.K,
    help="IWAE samples per record the model scores with (used for calibration, stored with the "
    "model as its default).",
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
            max_validation_rows,
            cache_bytes,
            progress,
        ]
    ):
        command = decorate(command)
    return command
