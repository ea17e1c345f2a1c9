"""Drift check: false-alarm rate on days drawn like the training data, and power on days whose
amounts are scaled.

For each of --models models (trained on 3 days of the synthetic transactions, anomaly rate
0.5 %, each from its own seeds), --days fresh days are drawn the same way and scored; then the
same days with `amount` multiplied by each factor. Each day goes through the statistics the
pipeline computes (DayStats) and the assessment written into manifests (Reference.assess).
Prints one line per setting: days, alarms, the rate and which test fired.

    python -m bench.drift                 # 5 models x 40 days, ~6 min on 2 cores
    python -m bench.drift --models 2 --days 10   # quick
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench import harness
from vaewatch.model.calibration.drift import Reference, named_features
from vaewatch.model.scoring import Scorer
from vaewatch.model.synthetic import LABEL_COLUMNS, transactions
from vaewatch.model.training.fit import FitConfig, fit
from vaewatch.model.training.loop import TrainConfig

FACTORS = (1.0, 1.1, 1.2, 1.3, 1.6, 2.0, 2.5)
EXCLUDE = [c for c in LABEL_COLUMNS if c != "record_id"]


def day_alarm(scorer: Scorer, reference: Reference, table) -> tuple[bool, list[str]]:
    scored = scorer.score(table).scores
    stats = reference.empty_stats()
    stats.add(
        scored["anomaly_score"].to_numpy(),
        scored["is_anomaly"].to_numpy(),
        np.asarray(reference.quantiles),
        named_features(scored["top_features"], list(reference.features)),
    )
    result = reference.assess(stats)
    return result["alarm"], result["reasons"]


def main() -> None:
    parser = harness.parser(__doc__, quick="2 models x 10 days")
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--days", type=int, default=40)
    parser.add_argument("--rows", type=int, default=20_000, help="rows per scored day")
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()
    harness.start(args, "drift")
    if args.quick:
        args.models, args.days = 2, 10

    alarms, fired = collections.Counter(), collections.defaultdict(collections.Counter)
    for m in range(args.models):
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(3):
                table = transactions(5_000, anomaly_rate=0.005, seed=1_000 * m + i)
                pq.write_table(table, Path(tmp) / f"part-{i}.parquet")
            result = fit(
                tmp,
                FitConfig(
                    id_column="record_id",
                    exclude=EXCLUDE,
                    train=TrainConfig(epochs=args.epochs, seed=m, device="cpu"),
                ),
            )
        artifact = result.artifact
        scorer = Scorer(artifact, model_version="bench", device="cpu")
        reference = Reference.of(
            artifact.calibration,
            artifact.spec.names(),
            threshold_quantile=artifact.calibration.threshold_quantile,
            k=artifact.scoring.k,
            model_k=artifact.scoring.k,
        )
        for d in range(args.days):
            day = transactions(args.rows, anomaly_rate=0.005, seed=1_000 * m + 100 + d)
            for factor in FACTORS:
                shifted = day.set_column(
                    day.schema.get_field_index("amount"),
                    "amount",
                    pc.multiply(day["amount"], factor),
                )
                alarm, reasons = day_alarm(scorer, reference, shifted)
                alarms[factor] += alarm
                for reason in reasons:
                    fired[factor][reason.split(" ")[0]] += 1
        print(f"model {m + 1}/{args.models}: calibration rows {reference.rows}", flush=True)

    total = args.models * args.days
    print(f"\n{args.models} models x {args.days} days of {args.rows:,} rows")
    print("amount x  alarms  rate    tests that fired")
    for factor in FACTORS:
        print(f"{factor:<8}  {alarms[factor]:>4}/{total}  {alarms[factor] / total:6.1%}  "
              f"{dict(fired[factor])}")  # fmt: skip


if __name__ == "__main__":
    main()
