"""Detectors ranked on a broad set of real tables: the tables bench/broad_tables.py's rule chose
(committed in bench/broad-tables.json before the first run), and apart from them the tables this
project developed on.

    python -m bench.broad                       # every table, both settings, 5 seeds (hours)
    python -m bench.broad --quick               # 4 of the rule's tables, 1 seed (~6 min)
    python -m bench.broad --only AER::Guns      # one table (any number of --only)
    python -m bench.broad --report              # the tables and tests from the cache alone
    python -m bench.broad --select              # which tables the rule chooses (no scoring)

Resumable: each (table, setting, seed) cell's scores are written to `--cache`
(bench/results/broad/ by default, one JSON file a cell) as soon as it finishes, and a cell found
there is not run again; an interrupted run continues where it stopped. Delete a cell's file (or
the folder) to measure it again, as after a change to training.

Settings, as in bench/quality.py's mixed tables (bench/datasets.py): **contaminated**, where
5 % of the training rows are anomalies and nothing is labelled, tested on a held-out 40 %; and
**one-class**, where the training rows are normal only. A table over MAX_ROWS rows is first
sampled to MAX_ROWS (the same rows for every seed and method).

vaewatch runs in process as `vaewatch train` and `score` run it (`fit` with the defaults, the
production `Scorer`, ranked by `anomaly_score`; a rejected row ranks as most anomalous). The
peers get the practitioner's preprocessing of bench/quality.py (strings one-hot, numbers imputed
with the training median and a missing indicator, standardised): IsolationForest (200 trees),
kNN (5 neighbours, largest distance; the best one-class peer on ADBench), MCD (robust
covariance; the best contaminated peer there), ECOD and PCA reconstruction.

Reported per group (the rule's tables; developed on) and setting: mean ROC-AUC and average
precision, the average rank (Demsar 2006), and a paired Wilcoxon signed-rank test over tables of
vaewatch's mean ROC-AUC against each peer's (two-sided; the table's mean over seeds is one
pair).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import average_precision_score, roc_auc_score

from bench import broad_tables, harness
from bench.broad_tables import committed, load
from bench.datasets import MIXED_CONTAMINATION, contaminated, one_class
from bench.quality import average_ranks, pca_reconstruction, practitioner_matrices

CACHE = Path(__file__).resolve().parent / "results" / "broad"
MAX_ROWS = 10_000
SETTINGS = ("contaminated", "one-class")
PEERS = ("IsolationForest", "kNN", "MCD", "ECOD", "PCA reconstruction")
METHODS = ("vaewatch", *PEERS)
QUICK_TABLES = ("AER::Guns", "DAAG::mifem", "ISLR::College", "openintro::cpu")
REJECTED = 1e300


def table_name(entry: dict) -> str:
    return f"{entry['package']}::{entry['item']}"


def features_and_labels(entry: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """The table as the rule (or its benchmark) defines it: features, and anomalous per row."""
    frame = load(entry["package"], entry["item"]).drop(columns=entry.get("dropped", []))
    anomalous = (frame[entry["label"]].astype(str) == entry["anomaly"]).to_numpy()
    frame = frame.drop(columns=[entry["label"]]).reset_index(drop=True)
    if len(frame) > MAX_ROWS:
        keep = np.sort(np.random.default_rng(0).choice(len(frame), MAX_ROWS, replace=False))
        frame, anomalous = frame.iloc[keep].reset_index(drop=True), anomalous[keep]
    # pandas' categorical columns as plain strings: Parquet and the peers see text
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.CategoricalDtype):
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame, anomalous


def make_split(entry: dict, setting: str, seed: int):
    x, anomalous = features_and_labels(entry)
    if setting == "one-class":
        return one_class(table_name(entry), x, anomalous, seed)
    share = MIXED_CONTAMINATION / (1 - MIXED_CONTAMINATION)
    n_anomalies = min(int(round(share * (~anomalous).sum())), int(anomalous.sum()))
    return contaminated(table_name(entry), x, anomalous, n_anomalies, seed)


def vaewatch_scores(split, seed: int) -> np.ndarray:
    from vaewatch.model.scoring import Scorer
    from vaewatch.model.training.fit import FitConfig, fit
    from vaewatch.model.training.loop import TrainConfig

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "train.parquet"
        pq.write_table(pa.Table.from_pandas(split.train, preserve_index=False), path)
        fitted = fit(str(path), FitConfig(train=TrainConfig(seed=seed, threads=1)))
    scorer = Scorer(fitted.artifact, model_version="1", device="cpu")
    scored = scorer.score(pa.Table.from_pandas(split.test, preserve_index=False))
    score = np.full(len(split.test), REJECTED)
    score[scored.scored_rows] = scored.scores["anomaly_score"].to_numpy()
    return np.nan_to_num(score, nan=REJECTED, posinf=REJECTED)


def peer_scores(split, seed: int) -> dict[str, np.ndarray]:
    from pyod.models.ecod import ECOD
    from pyod.models.knn import KNN
    from pyod.models.mcd import MCD
    from sklearn.ensemble import IsolationForest

    train, test = practitioner_matrices(split.train, split.test)
    out = {"PCA reconstruction": pca_reconstruction(train, test, seed)}
    forest = IsolationForest(n_estimators=200, random_state=seed).fit(train)
    out["IsolationForest"] = -forest.score_samples(test)
    for name, detector in (("kNN", KNN()), ("MCD", MCD(random_state=seed)), ("ECOD", ECOD())):
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                detector.fit(train)
                out[name] = detector.decision_function(test)
            except (ValueError, np.linalg.LinAlgError):  # MCD on a singular one-hot block
                out[name] = np.zeros(len(test))
    return out


def cell_path(cache: Path, group: str, name: str, setting: str, seed: int) -> Path:
    return cache / f"{group}--{name.replace('::', '--')}--{setting}--s{seed}.json"


def run_cell(job: tuple) -> dict:
    """One cell, from the cache or measured; a cell that fails is reported, not cached, and the
    run goes on."""
    try:
        return _run_cell(job)
    except Exception as err:  # noqa: BLE001 - named in the output, the run continues
        _, group, entry, setting, seed = job
        return {"group": group, "table": table_name(entry), "setting": setting, "seed": seed,
                "error": f"{type(err).__name__}: {err}"}  # fmt: skip


def _run_cell(job: tuple) -> dict:
    cache, group, entry, setting, seed = job
    path = cell_path(cache, group, table_name(entry), setting, seed)
    if path.exists():
        return json.loads(path.read_text())
    import torch

    torch.set_num_threads(1)
    split = make_split(entry, setting, seed)
    with harness.Stopwatch() as clock:
        scores = {"vaewatch": vaewatch_scores(split, seed)}
    seconds = clock.seconds
    scores.update(peer_scores(split, seed))
    labels = split.test_labels
    record = {
        "group": group,
        "table": table_name(entry),
        "setting": setting,
        "seed": seed,
        "train_rows": len(split.train),
        "test_rows": len(split.test),
        "test_anomalies": int(labels.sum()),
        "vaewatch_seconds": seconds,
        "auc": {m: float(roc_auc_score(labels, s)) for m, s in scores.items()},
        "ap": {m: float(average_precision_score(labels, s)) for m, s in scores.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def jobs(args) -> list[tuple]:
    tables = committed()
    seeds = range(1 if args.quick else args.seeds)
    out = []
    for seed in seeds:  # seed by seed: a run stopped early has every table at the first seeds
        for group in ("rule", "developed"):
            for entry in tables[group]:
                name = table_name(entry)
                if args.only and name not in args.only:
                    continue
                if args.quick and not args.only and name not in QUICK_TABLES:
                    continue
                out += [(Path(args.cache), group, entry, setting, seed) for setting in SETTINGS]
    return out


def report(records: list[dict]) -> dict:
    """Markdown tables per (group, setting); returns the figures for the record."""
    from scipy.stats import wilcoxon

    figures = {}
    for group in ("rule", "developed"):
        for setting in SETTINGS:
            mine = [r for r in records if r["group"] == group and r["setting"] == setting]
            if not mine:
                continue
            names = sorted({r["table"] for r in mine})
            seeds = len({r["seed"] for r in mine})
            auc = {(m, t): np.mean([r["auc"][m] for r in mine if r["table"] == t])
                   for m in METHODS for t in names}  # fmt: skip
            ap = {(m, t): np.mean([r["ap"][m] for r in mine if r["table"] == t])
                  for m in METHODS for t in names}  # fmt: skip
            ranks = average_ranks(auc, list(METHODS))
            label = "the rule's tables" if group == "rule" else "tables developed on"
            print(f"\n**{label}, {setting}** ({len(names)} tables x {seeds} seed(s))\n")
            print("| method | mean ROC-AUC | mean AP | average rank | vaewatch - method "
                  "(ROC-AUC) | wins/ties/losses | Wilcoxon p |")  # fmt: skip
            print("|---|---:|---:|---:|---:|---|---:|")
            out = {}
            for m in sorted(METHODS, key=ranks.get):
                ours = np.array([auc[("vaewatch", t)] for t in names])
                theirs = np.array([auc[(m, t)] for t in names])
                diff = ours - theirs
                record = {
                    "auc": float(theirs.mean()),
                    "ap": float(np.mean([ap[(m, t)] for t in names])),
                    "rank": float(ranks[m]),
                }
                tests = "| | |"
                if m != "vaewatch":
                    p = (
                        wilcoxon(ours, theirs).pvalue
                        if np.any(diff != 0) and len(names) > 1
                        else 1.0
                    )
                    wins = f"{(diff > 0).sum()}/{(diff == 0).sum()}/{(diff < 0).sum()}"
                    tests = f"{diff.mean():+.3f} | {wins} | {p:.3g} |"
                    record.update(lead=float(diff.mean()), p=float(p))
                print(f"| {m} | {record['auc']:.3f} | {record['ap']:.3f} | "
                      f"{record['rank']:.2f} | {tests}")  # fmt: skip
                out[m] = record
            figures[f"{group}/{setting}"] = out
    per_table = {}
    for r in records:
        key = f"{r['group']}/{r['setting']}/{r['table']}"
        per_table.setdefault(key, []).append(r["auc"])
    print("\nper table, mean ROC-AUC over seeds (vaewatch; best peer):")
    for key, aucs in sorted(per_table.items()):
        ours = np.mean([a["vaewatch"] for a in aucs])
        peer = max(PEERS, key=lambda m: np.mean([a[m] for a in aucs]))
        print(f"  {key}: {ours:.3f}; {peer} {np.mean([a[peer] for a in aucs]):.3f}")
    return figures


def main() -> None:
    parser = harness.parser(__doc__, quick=f"{len(QUICK_TABLES)} of the rule's tables, 1 seed")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", action="append", default=[], metavar="PACKAGE::ITEM")
    parser.add_argument(
        "--cache", default=None, metavar="DIR",
        help=f"where cells are kept (default: {CACHE.relative_to(harness.ROOT)}; with --quick a "
        "new temporary folder, so a quick run measures)",
    )  # fmt: skip
    parser.add_argument("--report", action="store_true", help="report the cached cells only")
    parser.add_argument(
        "--select", action="store_true",
        help="apply bench/broad_tables.py's rule and print the tables; nothing is scored",
    )  # fmt: skip
    parser.add_argument("--write", action="store_true", help="with --select: write the list")
    args = parser.parse_args()
    record = harness.start(args, "broad")
    if args.select:
        tables = {"rule": broad_tables.select(), "developed": broad_tables.developed()}
        print(broad_tables.describe(tables))
        if args.write:
            broad_tables.write(tables)
        return
    if args.cache is None:
        args.cache = tempfile.mkdtemp(prefix="broad-") if args.quick else str(CACHE)
    todo = jobs(args)
    if args.report:
        found = [cell_path(*job[:2], table_name(job[2]), *job[3:]) for job in todo]
        records = [json.loads(p.read_text()) for p in found if p.exists()]
    else:
        with ProcessPoolExecutor(args.workers) as pool:
            records = []
            for r in pool.map(run_cell, todo):
                if "error" in r:
                    print(f"{r['table']} {r['setting']} seed {r['seed']}: FAILED {r['error']}")
                    continue
                records.append(r)
                auc = r["auc"]
                print(f"{r['table']} {r['setting']} seed {r['seed']}: vaewatch "
                      f"{auc['vaewatch']:.3f}, IsolationForest {auc['IsolationForest']:.3f}, "
                      f"kNN {auc['kNN']:.3f}", flush=True)  # fmt: skip
    record.results["figures"] = report(records)
    record.results["cells"] = len(records)


if __name__ == "__main__":
    main()
