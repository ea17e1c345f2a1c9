"""What `is_anomaly` flags on bench/quality.py's datasets: the share of the test split's normal
rows (false alarms) and of its anomalies (hits), under the default rule ("any": the total score
or any one feature in its tail) and under "total" (anomaly_score above its calibration
quantile), both at the default threshold quantile (0.99), from one model per split.

    python -m bench.flags              # seed 0, every split (~1.5 min on 2 cores)
    python -m bench.flags --seeds 3
    python -m bench.flags --seeds 0 --demo-seeds 8   # the demo's data only (~4 min)
    python -m bench.flags --seeds 0 --demo-seeds 8 --set train.robust_trim=0.2  # other settings
    python -m bench.flags --sparse demo,100x10x50 --seeds 3  # one numeric value shifted (~8 min)

`--sparse TABLES` measures instead what the rules catch of a *sparse* anomaly: normal rows
with one numeric value each moved by 2-8 training standard deviations, on the demo's days and on
bench/wide.py's wide mixed table (NUMBERSxSTRINGSxVALUES), a model per table and seed.

`--demo-seeds N` adds the demo's data for seeds 0..N-1: a model fitted on the first day (which
holds 0.5 % injected rows) scores the next three days, and each injected kind's flagged share
is reported under both rules, with a second table of what decides them: the flag threshold, the
normal rows' 99th percentile of `anomaly_score`, and per kind its median and its ROC-AUC against
the normal rows. `--set` takes bench/quality.py's fit.NAME=VALUE / train.NAME=VALUE overrides.

Each model is fitted in process on the split's training rows (the defaults, as `vaewatch
train`) and scores the test rows with the production `Scorer`; "total" is read from the same
scores, so the two rules are compared on identical models.
"""

from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from bench import harness, quality
from bench.datasets import real_splits, wide_table, write_parquet
from vaewatch.jobs.demo import write_partitions
from vaewatch.model import defaults
from vaewatch.model.artifact import ScoringDefaults
from vaewatch.model.data.features import FeatureKind
from vaewatch.model.scoring import Scorer, ScoringOverrides
from vaewatch.model.synthetic import ANOMALY_KINDS, LABEL_COLUMNS
from vaewatch.model.training.fit import FitConfig, fit
from vaewatch.model.training.loop import TrainConfig

SPARSE_ROWS = 3_000  # normal rows per table, each with one value shifted
SPARSE_SHIFTS = (0, 2, 3, 5, 8)  # training standard deviations; 0: the rows as they are


def rates(
    split, seed: int, work: Path, quality, settings: tuple[dict, dict] = ({}, {})
) -> tuple[int, float, float, float, float]:
    """(calibration rows, normal flagged any/total, anomalies flagged any/total)."""
    folder = work / f"{split.name}-s{seed}"
    write_parquet(split.train, folder / "train.parquet")
    write_parquet(split.test, folder / "test.parquet")
    config = FitConfig(
        id_column="record_id",
        train=TrainConfig(seed=seed, device="cpu", **settings[1]),
        **settings[0],
    )
    fitted = fit(str(folder / "train.parquet"), config)
    calibration = fitted.artifact.calibration
    scored = Scorer(fitted.artifact, model_version="bench", device="cpu").score(
        pq.read_table(folder / "test.parquet")
    )
    rows = scored.scored_rows
    flagged = scored.scores["is_anomaly"].to_numpy(zero_copy_only=False).astype(bool)
    total = scored.scores["anomaly_score"].to_numpy() > calibration.score_quantile(
        defaults.THRESHOLD_QUANTILE
    )
    anomalous = split.test_labels[rows].astype(bool)
    return (
        calibration.rows,
        flagged[~anomalous].mean(),
        total[~anomalous].mean(),
        flagged[anomalous].mean(),
        total[anomalous].mean(),
    )


@dataclass
class DemoRates:
    """One demo seed: flagged shares per injected kind ("" = normal rows) under "any" and
    "total", and what decides them (the threshold, and where each kind's scores lie)."""

    shares: dict[str, tuple[float, float]]
    threshold: float  # the total score's calibration quantile
    normal_q99: float  # the normal scored rows' 99th percentile of anomaly_score
    medians: dict[str, float]  # per anomaly kind: median anomaly_score
    aucs: dict[str, float]  # per anomaly kind: ROC-AUC of anomaly_score against the normal rows


def fit_demo(seed: int, work: Path, settings: tuple[dict, dict] = ({}, {})):
    """(the model fitted on the demo's first day as `vaewatch demo` fits it, its next 3 days)."""
    paths = write_partitions(work / f"demo-s{seed}", 4, 20_000, seed)
    config = FitConfig(
        id_column="record_id",
        exclude=[c for c in LABEL_COLUMNS if c != "record_id"],
        train=TrainConfig(epochs=30, seed=seed, device="cpu", **settings[1]),
        scoring=ScoringDefaults(seed=seed),
        **settings[0],
    )
    fitted = fit(str(paths[0]), config)
    return fitted, pa.concat_tables([pq.read_table(p) for p in paths[1:]])


def scorer(fitted, rule: str) -> Scorer:
    return Scorer(
        fitted.artifact,
        model_version="bench",
        device="cpu",
        precision="fp32",
        overrides=ScoringOverrides(flag_rule=rule),
    )


def demo_rates(seed: int, work: Path, settings: tuple[dict, dict] = ({}, {})) -> DemoRates:
    """The demo's three scored days, the model fitted on its first day as `vaewatch demo` does."""
    fitted, days = fit_demo(seed, work, settings)
    shares, score, kinds = {}, None, None
    for rule in defaults.FLAG_RULES:
        scored = scorer(fitted, rule).score(days)
        flagged = scored.scores["is_anomaly"].to_numpy(zero_copy_only=False).astype(bool)
        kinds = np.asarray(days["anomaly_kind"].take(pa.array(scored.scored_rows)).to_pylist())
        score = scored.scores["anomaly_score"].to_numpy()  # the same under either rule
        shares[rule] = {kind: flagged[kinds == kind].mean() for kind in ["", *ANOMALY_KINDS]}
    normal = score[kinds == ""]
    return DemoRates(
        shares={kind: (shares["any"][kind], shares["total"][kind]) for kind in shares["any"]},
        threshold=fitted.artifact.calibration.score_quantile(defaults.THRESHOLD_QUANTILE),
        normal_q99=float(np.quantile(normal, 0.99)),
        medians={k: float(np.median(score[kinds == k])) for k in ANOMALY_KINDS},
        aucs={k: _auc(normal, score[kinds == k]) for k in ANOMALY_KINDS},
    )


def shifted(table: pa.Table, numeric: list, shift: float, seed: int) -> pa.Table:
    """`table` with one numeric value per row moved by `shift` training standard deviations
    (a feature and a sign drawn per row; a missing value moved from the training mean)."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(numeric), table.num_rows)
    sign = rng.choice([-1.0, 1.0], table.num_rows)
    for j, feature in enumerate(numeric):
        rows = pick == j
        values = table[feature.name].to_numpy(zero_copy_only=False).astype(np.float64)
        base = np.where(np.isnan(values), feature.mean, values)
        values = np.where(rows, base + sign * shift * feature.std, values)
        column = table.schema.get_field_index(feature.name)
        table = table.set_column(column, feature.name, pa.array(values, from_pandas=True))
    return table


def sparse_rates(kind: str, seed: int, work: Path, settings) -> tuple[str, dict]:
    """(the rule in effect, {shift in sd: (flagged under any, under total)}) for normal rows
    with one numeric value shifted: the demo's days, or bench/wide.py's table (`kind` = its
    numbers x strings x values), a model fitted on 20,000 rows."""
    if kind == "demo":
        fitted, days = fit_demo(seed, work, settings)
        normal = days.filter(pc.equal(days["anomaly_kind"], "")).slice(0, SPARSE_ROWS)
    else:
        numbers, strings, values = (int(v) for v in kind.split("x"))
        path = work / f"wide-{kind}-s{seed}.parquet"
        pq.write_table(wide_table(20_000, numbers, strings, values, seed), path)
        train = TrainConfig(seed=seed, device="cpu", **settings[1])
        fitted = fit(str(path), FitConfig(id_column="record_id", train=train, **settings[0]))
        normal = wide_table(SPARSE_ROWS, numbers, strings, values, seed + 1000)
    numeric = [f for f in fitted.artifact.spec.features if f.kind is FeatureKind.CONTINUOUS]
    scorers = [scorer(fitted, rule) for rule in defaults.FLAG_RULES]
    shares = {}
    for shift in SPARSE_SHIFTS:
        table = shifted(normal, numeric, shift, seed) if shift else normal
        shares[shift] = tuple(
            np.asarray(s.score(table).scores["is_anomaly"]).mean() for s in scorers
        )
    return fitted.artifact.calibration.effective_rule, shares


def print_sparse(kinds: list[str], seeds: int, work: Path, settings) -> None:
    shifts = " | ".join(f"{s} sd" if s else "none" for s in SPARSE_SHIFTS)
    print(f"\n| table | seed | rule in effect | {shifts} |  (flagged: any / total)")
    print("|---|---:|---|" + "---:|" * len(SPARSE_SHIFTS))
    for kind in kinds:
        for seed in range(seeds):
            rule, shares = sparse_rates(kind, seed, work, settings)
            cells = " | ".join(f"{a:.1%} / {t:.1%}" for a, t in shares.values())
            print(f"| {kind} | {seed} | {rule} | {cells} |", flush=True)


def _auc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """ROC-AUC of a score that should be higher for the anomalous rows (ties count half)."""
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return float(roc_auc_score(labels, np.r_[normal, anomalous]))


def print_demo(seeds: int, work: Path, settings: tuple[dict, dict] = ({}, {})) -> None:
    kinds = ["", *ANOMALY_KINDS]
    print("\n| demo seed | " + " | ".join(k or "normal" for k in kinds) + " |  (total -> any)")
    print("|---:|" + "---:|" * len(kinds))
    rows, details = [], []
    for seed in range(seeds):
        found = demo_rates(seed, work, settings)
        rows.append([found.shares[k] for k in kinds])
        details.append(found)
        cells = " | ".join(f"{t:.1%} -> {a:.1%}" for a, t in rows[-1])
        print(f"| {seed} | {cells} |", flush=True)
    means = np.mean(rows, axis=0)
    print("| mean | " + " | ".join(f"{t:.1%} -> {a:.1%}" for a, t in means) + " |")
    print(
        "\n| demo seed | threshold | normal 99th percentile | "
        + " | ".join(ANOMALY_KINDS)
        + " |  (median anomaly_score, ROC-AUC against normal rows)"
    )
    print("|---:|---:|---:|" + "---:|" * len(ANOMALY_KINDS))
    for seed, found in enumerate(details):
        cells = " | ".join(f"{found.medians[k]:.1f}, {found.aucs[k]:.3f}" for k in ANOMALY_KINDS)
        print(f"| {seed} | {found.threshold:.1f} | {found.normal_q99:.1f} | {cells} |")


def main() -> None:
    parser = harness.parser(__doc__, quick="one seed")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--digits", default="8,1", help="digit classes of the one-class splits")
    parser.add_argument("--demo-seeds", type=int, default=0, help="also the demo's data")
    parser.add_argument(
        "--sparse",
        default=None,
        help="instead of the splits: normal rows with one numeric value shifted, on these "
        "tables: demo, or bench/wide.py's NUMBERSxSTRINGSxVALUES (e.g. demo,100x10x50); "
        "--seeds of each",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="fit.NAME=VALUE or train.NAME=VALUE (JSON)"
    )
    args = parser.parse_args()
    harness.start(args, "flags")
    if args.quick:
        args.seeds, args.demo_seeds = 1, 0
    settings = quality.overrides(args.set)
    digits = [int(d) for d in args.digits.split(",")]
    if args.sparse:
        with tempfile.TemporaryDirectory() as tmp:
            print_sparse(args.sparse.split(","), args.seeds, Path(tmp), settings)
        return
    groups = collections.defaultdict(list)
    print("| group | split | seed | calibration rows | normal flagged, any | total | anomalies "
          "flagged, any | total |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo_seeds:
            print_demo(args.demo_seeds, Path(tmp), settings)
        for seed in range(args.seeds):
            for split in real_splits(seed, digits):
                cal, *shares = rates(split, seed, Path(tmp), quality, settings)
                groups[split.group].append(shares)
                cells = " | ".join(f"{s:.1%}" for s in shares)
                print(f"| {split.group} | {split.name} | {seed} | {cal:,} | {cells} |", flush=True)
    if groups:
        print("\n| group | splits | normal flagged, any | total | anomalies flagged, any | total |")
        print("|---|---:|---:|---:|---:|---:|")
    for group, shares in groups.items():
        means = np.mean(shares, axis=0)
        print(f"| {group} | {len(shares)} | " + " | ".join(f"{m:.1%}" for m in means) + " |")


if __name__ == "__main__":
    main()
