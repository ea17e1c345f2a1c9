"""Baselines per segment against one global threshold, at the same overall flag budget: what
each catches on data where one segment's normal is another's anomaly.

    python -m bench.segments              # 3 seeds
    python -m bench.segments --quick      # 1 seed

Data: model/synthetic.py `segmented`: kiosks (readings alike), markets (readings spread tenfold
wider) and a few outlets; an anomaly moves one reading by 5 of its own segment's spreads. Per
seed one model is trained with `--segment-column store` (24,000 rows, 10 epochs), and the same
data without it. A held-out day of 40,000 rows with 2 % anomalies is scored by both. The
per-segment model flags at the model's quantile (0.99); the global one is held to the same
number of flagged rows (its threshold quantile found by bisection on that day), so the two
spend one budget. The table gives, per segment, the share of its anomalies each flags and the
share of its normal rows.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bench import harness
from vaewatch.model.scoring import Scorer, ScoringOverrides
from vaewatch.model.synthetic import SEGMENTS, segmented
from vaewatch.model.training.fit import FitConfig, fit
from vaewatch.model.training.loop import TrainConfig

TRAIN_ROWS, DAY_ROWS, EPOCHS = 24_000, 40_000, 10


def flags(artifact, day, quantile=None) -> np.ndarray:
    scorer = Scorer(artifact, model_version="bench", device="cpu",
                    overrides=ScoringOverrides(threshold_quantile=quantile))  # fmt: skip
    return scorer.score(day).aligned()["is_anomaly"].to_numpy(zero_copy_only=False).astype(bool)


def same_budget(artifact, day, count: int) -> tuple[np.ndarray, float]:
    """The global model's flags at the quantile where it flags `count` rows of `day` (the
    nearest from above), found by bisection: (flags, quantile)."""
    low, high = 0.5, 1.0 - 1e-6
    best = flags(artifact, day, high)
    for _ in range(14):
        middle = 0.5 * (low + high)
        found = flags(artifact, day, middle)
        if found.sum() >= count:
            low, best = middle, found
        else:
            high = middle
    return best, low


def run_seed(seed: int, work: Path) -> dict:
    folder = work / f"s{seed}"
    folder.mkdir()
    pq.write_table(segmented(TRAIN_ROWS, seed=seed), folder / "train.parquet")
    models = {}
    for name, column in (("per segment", "store"), ("global", None)):
        config = FitConfig(id_column="record_id", exclude=["is_injected_anomaly"],
                           segment_column=column,
                           train=TrainConfig(epochs=EPOCHS, seed=seed, device="cpu"))  # fmt: skip
        models[name] = fit(str(folder), config).artifact
    day = segmented(DAY_ROWS, anomaly_rate=0.02, seed=1000 + seed)
    store = np.asarray(day["store"].to_pylist())
    anomalous = day["is_injected_anomaly"].to_numpy(zero_copy_only=False).astype(bool)
    segment_flags = flags(models["per segment"], day)
    global_flags, quantile = same_budget(models["global"], day, int(segment_flags.sum()))
    out = {"global_quantile": quantile, "flagged": {}}
    for name, flagged in (("per segment", segment_flags), ("global", global_flags)):
        out["flagged"][name] = {
            s: {
                "anomalies": float(flagged[(store == s) & anomalous].mean()),
                "normal": float(flagged[(store == s) & ~anomalous].mean()),
            }  # fmt: skip
            for s in SEGMENTS
        }
        out["flagged"][name]["all"] = {"anomalies": float(flagged[anomalous].mean()),
                                       "normal": float(flagged[~anomalous].mean()),
                                       "rows": int(flagged.sum())}  # fmt: skip
    out["baselines"] = {
        v: round(c.threshold(), 3) for v, c in models["per segment"].calibrations().items()
    }
    return out


def main() -> None:
    parser = harness.parser(__doc__, quick="1 seed")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    run = harness.start(args, "segments")
    seeds = 1 if args.quick else args.seeds
    print(f"{TRAIN_ROWS:,} training rows, a {DAY_ROWS:,}-row day with 2 % anomalies; "
          "share of each segment's anomalies / normal rows flagged\n")  # fmt: skip
    print("| seed | baseline | flagged rows | " + " | ".join(SEGMENTS) + " | all |")
    print("|---:|---|---:|" + "---:|" * (len(SEGMENTS) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            found = run_seed(seed, Path(tmp))
            run.results[f"seed {seed}"] = found
            for name, shares in found["flagged"].items():
                cells = " | ".join(
                    f"{shares[s]['anomalies']:.1%} / {shares[s]['normal']:.2%}"
                    for s in (*SEGMENTS, "all")
                )
                print(f"| {seed} | {name} | {shares['all']['rows']:,} | {cells} |", flush=True)
            print(f"| {seed} | (global held at quantile {found['global_quantile']:.4f}; "
                  f"per-segment thresholds {found['baselines']}) |||||||")  # fmt: skip


if __name__ == "__main__":
    main()
