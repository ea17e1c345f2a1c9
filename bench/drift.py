"""Drift check: the data-drift alarm's false-alarm rate on days whose bulk is drawn like the
training data but which hold more anomalies, and its power on days whose amounts are scaled;
the anomaly-rate notice on the same days.

For each of --models models (trained on 3 days of the synthetic transactions, anomaly rate
0.5 %, each from its own seeds), --days fresh days are drawn: day d holds the demo's injected
kinds at ANOMALY_RATES[d % 6] (0 to 10 %), the rest drawn as in training. Each is scored as
drawn, then with `amount` multiplied by each factor on every record. Each day goes through the
statistics the pipeline computes (DayStats) and the assessment written into manifests
(Reference.assess). Prints one line per setting and anomaly rate: days, data-drift alarms,
anomaly-rate notices (above the calibration's flagged share).

    python -m bench.drift                 # 5 models x 40 days
    python -m bench.drift --quick         # 2 models x 12 days
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
ANOMALY_RATES = (0.0, 0.02, 0.04, 0.06, 0.08, 0.10)
EXCLUDE = [c for c in LABEL_COLUMNS if c != "record_id"]


def day_findings(scorer: Scorer, reference: Reference, table) -> tuple[bool, bool]:
    """(data-drift alarm, anomaly rate above the calibration's flagged share) of one day."""
    scored = scorer.score(table).scores
    stats = reference.empty_stats()
    stats.add(
        scored["anomaly_score"].to_numpy(),
        scored["is_anomaly"].to_numpy(),
        np.asarray(reference.quantiles),
        named_features(scored["top_features"], list(reference.features)),
    )
    result = reference.assess(stats)
    return result["alarm"], result["anomaly_rate"]["above_expected"]


def main() -> None:
    parser = harness.parser(__doc__, quick="2 models x 10 days")
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--days", type=int, default=40)
    parser.add_argument("--rows", type=int, default=20_000, help="rows per scored day")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument(
        "--factors", default=",".join(map(str, FACTORS)), help="amount factors, comma-separated"
    )
    args = parser.parse_args()
    run = harness.start(args, "drift")
    if args.quick:
        args.models, args.days = 2, 12
    factors = [float(f) for f in args.factors.split(",")]

    days, alarms, notices = (collections.Counter() for _ in range(3))
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
            rate = ANOMALY_RATES[d % len(ANOMALY_RATES)]
            day = transactions(args.rows, anomaly_rate=rate, seed=1_000 * m + 100 + d)
            for factor in factors:
                shifted = day.set_column(
                    day.schema.get_field_index("amount"),
                    "amount",
                    pc.multiply(day["amount"], factor),
                )
                alarm, notice = day_findings(scorer, reference, shifted)
                days[factor, rate] += 1
                alarms[factor, rate] += alarm
                notices[factor, rate] += notice
        print(f"model {m + 1}/{args.models}: calibration rows {reference.rows}", flush=True)

    print(f"\n{args.models} models x {args.days} days of {args.rows:,} rows")
    print("| amount x | injected | days | data-drift alarms | anomaly-rate notices |")
    print("|---:|---:|---:|---:|---:|")
    for factor in factors:
        total = {"days": 0, "alarms": 0, "notices": 0}
        for rate in ANOMALY_RATES:
            n, a, k = days[factor, rate], alarms[factor, rate], notices[factor, rate]
            if n:
                print(f"| {factor} | {rate:.0%} | {n} | {a} ({a / n:.0%}) | {k} ({k / n:.0%}) |")
            total["days"] += n
            total["alarms"] += a
            total["notices"] += k
        run.results[f"amount x{factor}"] = total
        n, a = total["days"], total["alarms"]
        print(f"| {factor} | all | {n} | **{a} ({a / n:.1%})** | {total['notices']} |")


if __name__ == "__main__":
    main()
