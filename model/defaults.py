"""Every default a user can override, in one place, with the reason for its value.

Plain constants, importing only the sets of choices (model/choices.py): the dataclasses that
use them (TrainConfig, VAEConfig, ScoringDefaults, FitConfig, ScoreOptions) and the CLI's
options read them from here, so `vaewatch --help` shows exactly what the code does, without
importing torch or Beam.
"""

from vaewatch.model.choices import FlagRule

# ---------------------------------------------------------------- scoring
# IWAE samples, chosen by accuracy. Target: no worse than i.i.d. K = 64, the earlier default, on
# the suite's closed-form pPCA with a mismatched proposal, in both the mean |IWAE - log p(x)| per
# record and the bias of the table mean. With the scrambled-Sobol points K = 24 was the smallest
# multiple of 4 that met it with either mismatch (over-dispersed 0.097 / 0.028 nats against
# 0.106 / 0.034; K = 20 missed the bias, K = 16 both). With the spherical points
# (model/estimation/noise.py)
# K = 24 meets it with a margin (0.076 / 0.010; under-dispersed 0.108 / 0.078 against 0.135 /
# 0.113) and on 7 of the 9 pPCAs of bench/accuracy_breadth.py (Sobol's: 4); K = 16 meets it on
# the over-dispersed proposal and ties it on the others, so 24 stays: the trained models'
# errors fall with K further than the pPCAs' (bench/notes/, "Rotated simplices")
K = 24
# ... the K a model scores with unless `train --k` gives one: the smallest of K_LADDER whose
# validation rows' mean IWAE is within K_BUDGET nats of K_REFERENCE's, on the scorer's own
# points (model/estimation/proposal.py `choose_k`). K = 24 alone missed 0.05 nats on 2 of 7
# model families it was not chosen on, by the shared draw's luck (bench/k_families.py)
K_LADDER = (24, 48, 96, 192)
K_REFERENCE = 1_000
K_BUDGET = 0.025
SEED = 0  # common-random-numbers seed of the scoring noise (and of training)
# the design of the K shared points (model/estimation/noise.py): rotated simplices with stratified
# radii. On
# the suite's pPCA at K = 24, 0.077 / 0.014 nats against scrambled Sobol's 0.095 / 0.030 (100
# seeds, bench/notes/); models saved before it keep "sobol" (model/artifact.py)
POINTS = "spherical"
# factors on q(z|x)'s standard deviation tried at training; the best on the validation rows,
# over 64 independent draws of the points, is kept (model/estimation/proposal.py). On the demo's
# data it
# chose 1.25 and cut the likely records' error from 0.28 to 0.20 nats (bench/notes/); 1 first:
# a tie keeps the encoder's q
PROPOSAL_SCALES = (1.0, 1.25, 1.5, 2.0)
THRESHOLD_QUANTILE = 0.99  # flags ~1% of normal records; overridable at scoring
TOP_FEATURES = 3  # features reported per record in top_features
# is_anomaly: the total score, any one feature, or -log p(discrete | continuous) in its tail
# (model/calibration/scores.py). On the demo, trained on a day holding its injected rows: unseen
# merchants flagged 19 % -> 100 %, impossible combinations 70 % -> 90 % (per-feature terms) ->
# 94.8 % (the conditional term), normal rows 0.77 % -> 0.60 % (8 seeds, in process;
# bench/notes/). "total" is anomaly_score > its quantile alone.
FLAG_RULE = "any"
FLAG_RULES = FlagRule.values()  # kept for bench/ and older callers
# a term's tail is exponential above this quantile of its calibration values (peaks over
# threshold); scales below MIN_TAIL_SCALE nats (a near-deterministic feature) are raised to it,
# so that differences of a fraction of a nat, at the level of Monte Carlo noise, never flag
TAIL_LEVEL = 0.9
# below this many calibration rows the tails rest on too few excesses (20 at the 0.9 level) and
# the "any" rule falls back to "total": on bench/quality.py's smallest tables (16-54
# calibration rows) "any" flagged 3-44 % of normal test rows, against 0-6 % for "total";
# from 134 rows up both stayed within 1 % of each other (bench/flags.py)
MIN_TAIL_ROWS = 200
TAIL_FOLDS = 10  # the flag threshold is set on out-of-fold surprises (model/calibration/scores.py)
MIN_TAIL_SCALE = 0.25
# the "any" threshold leaves out of its 1 - q the calibration rows whose surprise lies beyond
# the OUTLIER_TAIL level of the exponential tail of all of them, up to OUTLIER_SHARE x (1 - q):
# on the demo's data (0.5 % anomalies in training) impossible combinations flagged 83.7-100 % ->
# 90.3-100 % over 8 seeds, normal rows 0.1-1.1 % -> 0.5-1.3 % (bench/notes/)
OUTLIER_TAIL = 1e-4
OUTLIER_SHARE = 0.5
SCORE_BATCH_SIZE = 65_536  # rows per model call: amortises Python; scores do not depend on it
# the MLPs' matmuls in bfloat16 where the device has it natively: on this project's CPU that
# changed log_likelihood by 0.003 nats on average, under a tenth of its Monte Carlo error at
# the default K (bench/estimators.py), for 1.1-1.4x the records/s
PRECISION = "auto"

# ---------------------------------------------------------------- features
MAX_CATEGORIES = 1000  # vocabulary cap per categorical column; rarer values share OOV
# distinct values a string column's training counts hold exactly (twice this), pruned beyond
VALUE_COUNT_CAPACITY = 100_000
# a categorical with at least this many classes is decoded as a two-level softmax (cluster, then
# class within it: ~2 sqrt(V) logits per sample instead of V). Below ~130 classes the flat head
# is as fast on this CPU; 256 keeps every small vocabulary on the flat head it had before.
TWO_LEVEL_MIN_CLASSES = 256
MIN_CATEGORY_COUNT = 1  # training rows a value needs for its own vocabulary entry
# ... and the share of the training rows it needs (0 = no such rule). Measured against 0.001 on
# the demo, whose training day holds 3 anomalous merchants with ~8 rows each: pooling them into
# the out-of-vocabulary entry gives it their summed probability, so each is *less* surprising
# (rare_category flagged 13.5 % vs 27 %, impossible_combination 57 % vs 76 %; bench/notes/)
MIN_CATEGORY_SHARE = 0.0

# ---------------------------------------------------------------- network
LATENT_DIM = 8  # enough for the handful of factors tabular data usually has
HIDDEN = (128, 128)  # encoder and decoder widths
# ... for tables of ~1,000 training rows and more; smaller tables get a smaller network
# (model/training/sizing.py `capacity`): 128x128 units with 8 latent dimensions can memorise the 6
# anomalous
# rows of a 77-row table as a mode of their own (bench/notes/)
ROWS_PER_HIDDEN_UNIT = 8
MIN_HIDDEN = 16
ROWS_PER_LATENT = 40
# the observation pattern is part of the record: a value missing where it usually is not costs
# nats, so rows missing different columns are scored on one scale ("marginal": a missing value
# costs nothing, the density of what was observed)
MISSINGNESS = "model"

# ---------------------------------------------------------------- training
EPOCHS = 40  # upper bound; early stopping usually ends sooner
BATCH_SIZE = 256  # small enough for many updates per epoch on 10k-row tables
LEARNING_RATE = 1e-3  # Adam's usual default, stable for these MLP sizes
WEIGHT_DECAY = 0.0  # the KL term already regularises the encoder
OBJECTIVE = "elbo"  # "elbo" or "iwae"
TRAIN_K = 5  # IWAE samples per record when objective == "iwae" (k=5 as in Burda et al.)
KL_WARMUP_EPOCHS = 5  # beta: 0 -> 1 over these epochs, against early posterior collapse
FREE_BITS = 0.0  # nats per latent dim below which KL is not penalised (0 = off)
# robust training: each batch's loss down-weights its worst-explained records (training data
# holds the anomalies users want found, and maximum likelihood would learn them), by the table's
# size (model/training/sizing.py; each TrainConfig field left at None takes its profile's value):
# - a large table (the full-width network, from 725 training rows): after the KL warm-up the
#   worst 5 % of each batch count nothing. A large table's normal tail is thousands of rows; a
#   heavier trim fits it less well, the flag threshold rises 2-5 nats and repeated anomalies fall
#   under it (the demo's impossible combinations flagged at 32-100 % instead of 90-100 %).
LARGE_TABLE_TRAINING = {
    "robust_trim": 0.05,
    "trim_weight": 0.0,
    "robust_drop": 0.0,
    "trim_from_start": False,
    "weight_prior": 0.0,
    "refit": True,
}
# - a small table (a narrowed network, up to 724 training rows), where a handful of anomalous
#   rows can be memorised: from the first update the worst 20 % of each batch count a fifth,
#   after the warm-up the worst 5 % nothing, and a Gaussian prior N(0, 1/2) on the weights for
#   the table as a whole (maximum a posteriori: 2 / training rows is the L2 coefficient per
#   record). Measured in bench/notes/ ("Robust training by the table's size"): the
#   contaminated benchmark group 0.792 -> 0.855 ROC-AUC (wine 0.69 -> 0.89); on eight tables
#   outside the benchmark (bench/profile_by_size.py) +0.012 on small contaminated samples,
#   -0.010 on small clean ones, level from 1,300 rows.
SMALL_TABLE_TRAINING = {
    "robust_trim": 0.2,
    "trim_weight": 0.2,
    "robust_drop": 0.05,
    "trim_from_start": True,
    "weight_prior": 2.0,
    "refit": False,
}
# the refit's cutoff (model/training/loop.py `far_out_cutoff`): Tukey's far-out fence, the upper
# quartile of the validation rows' -IWAE under the robust fit plus 3 interquartile ranges
REFIT_FENCE = 3.0
VALIDATION_FRACTION = 0.1  # held out for early stopping and calibration
MIN_VALIDATION_ROWS = 200  # small tables hold out more (up to a quarter): early stopping and
# calibration on a few dozen rows follow noise (a 544-row table stopped on 45 rows at epoch 8)
PATIENCE = 5  # epochs without validation improvement before stopping
# an epoch is at least this many updates: a small table is passed over several times per
# epoch, so 40 epochs of 80 rows are 2,000 updates, not 40 (measured on scikit-learn's wine
# and breast cancer: one pass per epoch stopped at 40 updates with no active latent units)
MIN_STEPS_PER_EPOCH = 50
DEVICE = "auto"  # CUDA when present, else CPU
MIXED_PRECISION = True  # bfloat16 autocast on CUDA (no effect on CPU)
THREADS = None  # torch threads: None picks the cores this process may use (model/threads.py)
MAX_VALIDATION_ROWS = 200_000  # held-out rows kept in memory for validation and calibration
CACHE_BYTES = 2 * 2**30  # encoded training rows kept in memory up to this size

# ---------------------------------------------------------------- the demo
DEMO_ROWS_PER_DAY = 20_000  # a few seconds per day to score on 2 cores
DEMO_DAYS = 5  # the first trains, the rest are scored
DEMO_EPOCHS = 30  # enough for the demo's small table to converge

# ---------------------------------------------------------------- MLflow
EXPERIMENT = "vaewatch"  # the experiment training runs are logged under
ALIAS = "champion"  # the registry alias `train` points at the new version
