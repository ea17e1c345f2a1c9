"""What `top_features` names first, and what naming it costs: -log p(x_j|z) (every record's)
against -log p(x_j | x_-j) (flagged records', model/estimation/attribution.py), on the demo's data.

    python -m bench.attribution                 # demo seeds 0-2, ~4 min on 2 cores
    python -m bench.attribution --seeds 8
    python -m bench.attribution --quick         # seed 0 (make bench-quick)

Per seed a model is fitted on the demo's first day as `vaewatch demo` fits it (the day holds
0.5 % injected rows) and scores the next three days with the production `Scorer` twice: as
built, and with the calibration's leave-one-out baseline removed, which is what a model that
predates it does (every record's top features by -log p(x_j|z)). The scores and flags are the
same in both; the table gives, per injected kind, the share of its flagged records whose first
top feature is a column that kind changed (model/synthetic.py, CHANGED_COLUMNS), and the
records/s of `Scorer.score` over the three days (best of `--repeats` alternations in this
process, as a ratio, since this machine's speed moves between runs); then the same on a drifted
day (the first scored day's amounts x100, as if in cents), where every record is flagged and
the leave-one-out budget (model/estimation/attribution.py, EXPLAINED_SHARE) bounds the cost.
A third run, "explained", is the scorer as built: the leave-one-out term plus what the model
expected of each listed feature (model/estimation/explanations.py); "leave-one-out" is the
same scorer with those fields left null, as 0.2.0 wrote them, so the ratio between the two is
the explanations' own cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from bench import harness
from vaewatch.jobs.demo import write_partitions
from vaewatch.model import scoring
from vaewatch.model.artifact import ScoringDefaults
from vaewatch.model.scoring import Scorer
from vaewatch.model.synthetic import ANOMALY_KINDS, CHANGED_COLUMNS, LABEL_COLUMNS
from vaewatch.model.training.fit import FitConfig, fit
from vaewatch.model.training.loop import TrainConfig


def named_first(scored, days: pa.Table) -> tuple[dict[str, float], float]:
    """(per kind, the share of its flagged rows whose first top feature it changed; the share
    of normal rows flagged)."""
    kinds = np.asarray(days["anomaly_kind"].take(pa.array(scored.scored_rows)).to_pylist())
    flagged = scored.scores["is_anomaly"].to_numpy(zero_copy_only=False).astype(bool)
    first = np.array(
        [t[0]["feature"] if t else "" for t in scored.scores["top_features"].to_pylist()]
    )
    shares = {}
    for kind in ANOMALY_KINDS:
        hits = (kinds == kind) & flagged
        shares[kind] = float(np.isin(first[hits], CHANGED_COLUMNS[kind]).mean())
    return shares, float(flagged[kinds == ""].mean())


@contextlib.contextmanager
def _without_explanations(active: bool):
    """The scorer with top_features' expectation fields left null (what 0.2.0 computed)."""
    if not active:
        yield
        return
    original = scoring.Expectations
    scoring.Expectations = lambda *args, **kwargs: None
    try:
        yield
    finally:
        scoring.Expectations = original


def run_seed(seed: int, work: Path, repeats: int) -> dict:
    paths = write_partitions(work / f"demo-s{seed}", 4, 20_000, seed)
    config = FitConfig(
        id_column="record_id",
        exclude=[c for c in LABEL_COLUMNS if c != "record_id"],
        train=TrainConfig(epochs=30, seed=seed, device="cpu"),
        scoring=ScoringDefaults(seed=seed),
    )
    started = time.perf_counter()
    fitted = fit(str(paths[0]), config)
    fit_seconds = time.perf_counter() - started
    days = pa.concat_tables([pq.read_table(p) for p in paths[1:]])
    built = fitted.artifact
    cheap = dataclasses.replace(
        built, calibration=dataclasses.replace(built.calibration, conditional_baseline=None)
    )
    scorers = {
        name: Scorer(artifact, model_version="bench", device="cpu", precision="fp32")
        for name, artifact in (("posterior", cheap), ("leave-one-out", built), ("explained", built))
    }
    # a drifted day: the first scored day's amounts in cents (x100), every record flagged
    first = pq.read_table(paths[1])
    drifted = first.set_column(
        first.schema.get_field_index("amount"), "amount", pc.multiply(first["amount"], 100.0)
    )
    result, best = {}, {(name, day): float("inf") for name in scorers for day in ("3", "drift")}
    for _ in range(repeats):
        for name, scorer in scorers.items():
            for day, table in (("3", days), ("drift", drifted)):
                with _without_explanations(name == "leave-one-out"):
                    started = time.perf_counter()
                    scored = scorer.score(table)
                    best[name, day] = min(best[name, day], time.perf_counter() - started)
                if day == "3":
                    result[name] = named_first(scored, days)
    flagged = scored.scores["is_anomaly"].to_numpy(zero_copy_only=False).mean()
    return {
        "named": {name: shares for name, (shares, _) in result.items()},
        "normal_flagged": result["explained"][1],
        "rows_per_s": {name: days.num_rows / best[name, "3"] for name in scorers},
        "drift_rows_per_s": {name: drifted.num_rows / best[name, "drift"] for name in scorers},
        "drift_flagged": flagged,
        "fit_seconds": fit_seconds,
    }


def main() -> None:
    parser = harness.parser(__doc__, quick="seed 0, 2 repeats")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed alternations per seed")
    args = parser.parse_args()
    harness.start(args, "attribution")
    if args.quick:
        args.seeds, args.repeats = 1, 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; demo data, 3 x 20,000 "
          "scored rows per seed, fp32")  # fmt: skip
    print("\n| seed | first top feature from | " + " | ".join(ANOMALY_KINDS)
          + " | normal rows flagged | Scorer rows/s | vs posterior | drifted day: flagged | "
          "rows/s | vs posterior |")  # fmt: skip
    print("|---:|---|" + "---:|" * (len(ANOMALY_KINDS) + 6))
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            found = run_seed(seed, Path(tmp), args.repeats)
            rates, drift = found["rows_per_s"], found["drift_rows_per_s"]
            for name in ("posterior", "leave-one-out", "explained"):
                cells = " | ".join(f"{found['named'][name][k]:.1%}" for k in ANOMALY_KINDS)
                print(f"| {seed} | {name} | {cells} | {found['normal_flagged']:.2%} | "
                      f"{rates[name]:,.0f} | {rates[name] / rates['posterior']:.2f}x | "
                      f"{found['drift_flagged']:.1%} | {drift[name]:,.0f} | "
                      f"{drift[name] / drift['posterior']:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
