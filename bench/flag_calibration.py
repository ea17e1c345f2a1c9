"""How well the "any" flag keeps its promised rate: the share of fresh rows flagged at q = 0.99,
from calibrations of 200, 500 and 2,000 rows of synthetic per-feature costs, with the flag
threshold set in sample (tails fitted on the calibration rows themselves) and out of fold (as
`Calibration.fit` does); then with calibration rows that hold anomalies, as a training set's
held-out rows do, the threshold the q-quantile of the surprises with their outliers set aside
(the code) against the q-quantile of all of them (none set aside: models trained before it).

    python -m bench.flag_calibration            # 20 repetitions per setting (~20 s)
    python -m bench.flag_calibration --quick    # 5

Three laws of the per-feature costs (nats), 8 and 64 features, the total their sum: Gamma(2, 1)
(light tails); log(1 + 3 Pareto(2)) plus, 5 % of the time, 10 x Exp(1) (heavy); 0.05 nats 90 %
of the time and Exp(3) otherwise (spiky, a near-deterministic feature). Each repetition draws
a calibration set and 20,000 fresh rows of the same law; 1 % is the promise. The anomalies of
the second table are 0.5 % or 2 % of the calibration rows, each with one feature 30 nats above
its draw; the fresh rows hold none.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bench import harness
from vaewatch.model.calibration.scores import Calibration, _surprise, exponential_tails


def draw(rng, law: str, n: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (n, features)
    if law == "gamma":
        nll = rng.gamma(2.0, 1.0, shape)
    elif law == "heavy":
        burst = rng.exponential(1.0, shape) * (rng.random(shape) < 0.05) * 10
        nll = np.log1p(rng.pareto(2.0, shape) * 3) + burst
    else:
        nll = np.where(rng.random(shape) < 0.9, 0.05, rng.exponential(3.0, shape))
    return nll.sum(axis=1), nll


def in_sample_rate(scores, nll, fresh) -> float:
    start, scale = exponential_tails(np.column_stack([scores, nll]))
    cut = np.quantile(_surprise(scores, nll, start, scale), 0.99)
    return float(np.mean(_surprise(*fresh, start, scale) > cut))


def main() -> None:
    parser = harness.parser(__doc__, quick="5 repetitions")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    harness.start(args, "flag_calibration")
    repeats = 5 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    print("| law | features | calibration rows | in sample | out of fold (the code) |")
    print("|---|---:|---:|---:|---:|")
    for law in ("gamma", "heavy", "spiky"):
        for features in (8, 64):
            for n in (200, 500, 2_000):
                inside, folds = [], []
                for _ in range(repeats):
                    scores, nll = draw(rng, law, n, features)
                    fresh = draw(rng, law, 20_000, features)
                    inside.append(in_sample_rate(scores, nll, fresh))
                    folds.append(float(np.mean(Calibration.fit(scores, nll).flags(*fresh))))
                print(f"| {law} | {features} | {n:,} | {np.mean(inside):.2%} | "
                      f"{np.mean(folds):.2%} |", flush=True)  # fmt: skip
    print("\n| law | features | calibration rows | anomalies in them | none set aside | the code |")
    print("|---|---:|---:|---:|---:|---:|")
    for law in ("gamma", "heavy", "spiky"):
        for features in (8, 64):
            for n in (200, 2_000):
                for share in (0.0, 0.005, 0.02):
                    quantile, tail = [], []
                    for _ in range(repeats):
                        scores, nll = contaminated(rng, law, n, features, share)
                        fresh = draw(rng, law, 20_000, features)
                        calibration = Calibration.fit(scores, nll)
                        old = replace(calibration, surprise_outliers=0.0)
                        quantile.append(float(np.mean(old.flags(*fresh))))
                        tail.append(float(np.mean(calibration.flags(*fresh))))
                    cells = f"{np.mean(quantile):.2%} | {np.mean(tail):.2%}"
                    print(f"| {law} | {features} | {n:,} | {share:.1%} | {cells} |", flush=True)


def contaminated(rng, law: str, n: int, features: int, share: float):
    """`draw`'s rows, the first `share` of them anomalies: one feature 30 nats higher."""
    scores, nll = draw(rng, law, n, features)
    m = int(round(share * n))
    nll[np.arange(m), rng.integers(0, features, m)] += 30.0
    scores[:m] += 30.0
    return scores, nll


if __name__ == "__main__":
    main()
