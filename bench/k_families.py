"""How far the scoring K's log-likelihood is from K = 1,000's, on models of families the default
K was not chosen on.

    python -m bench.k_families            # 7 families x 2 seeds, 10,000 training rows
    python -m bench.k_families --quick    # 7 families x 1 seed, 4,000 training rows

Each family is a known generator of tabular rows (none of them the suite's pPCA, on which the
default K was chosen, model/defaults.py):

- `ppca-r2`: 10 numbers from 2 factors plus noise, unit scales;
- `ppca-r8-scaled`: 30 numbers from 8 factors, each multiplied by its own scale from 1e-2 to 1e3;
- `mixture`: 8 numbers from 4 well-separated Gaussian clusters of different shapes;
- `student-t`: 8 correlated numbers with Student's t (3 degrees of freedom) tails;
- `skewed`: 6 log-normal amounts driven by 2 factors, 30 % of two of them exactly 0;
- `discrete`: 6 string columns of 4 to 12 values from a 3-class latent class model;
- `mixed`: 5 numbers from 2 factors, 3 strings and 2 booleans whose odds follow the factors,
  5 % of all values missing.

vaewatch is fitted with its defaults on each (the Parquet path of `vaewatch train`), then the
held-out rows are scored twice with the production estimator and the model's own proposal
scale and design: at the K the model scores with, and at K = 1,000. Printed per family: the
table-mean error mean(L_1000 - L_K) in nats (a lower bound's bias: positive), the mean
per-record |error|, and the K the model chose. Goal (issue "Robust without bias"): a table-mean
error <= 0.05 nats on every family.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench import harness
from vaewatch.model import defaults
from vaewatch.model.estimation.estimators import score_records
from vaewatch.model.training.fit import FitConfig, fit
from vaewatch.model.training.loop import TrainConfig

REFERENCE_K = 1_000
TEST_ROWS = 2_000
GOAL = 0.05


def _numbers(x: np.ndarray, prefix: str = "n") -> dict:
    return {f"{prefix}{j:02d}": x[:, j] for j in range(x.shape[1])}


def ppca(rows, rng, features, rank, scales=None) -> dict:
    structure = np.random.default_rng(100 + rank)
    w = structure.normal(size=(features, rank))
    noise = structure.uniform(0.1, 0.5, features)
    x = rng.normal(size=(rows, rank)) @ w.T + rng.normal(size=(rows, features)) * noise
    return _numbers(x * (1.0 if scales is None else scales))


def mixture(rows, rng) -> dict:
    structure = np.random.default_rng(7)
    means = structure.normal(scale=4.0, size=(4, 8))
    chols = [
        np.linalg.cholesky(a @ a.T + 0.1 * np.eye(8))
        for a in structure.normal(size=(4, 8, 8)) * 0.4
    ]
    which = rng.choice(4, size=rows, p=[0.4, 0.3, 0.2, 0.1])
    z = rng.normal(size=(rows, 8))
    x = np.stack([means[c] + chols[c] @ z[i] for i, c in enumerate(which)])
    return _numbers(x)


def student_t(rows, rng) -> dict:
    structure = np.random.default_rng(8)
    a = structure.normal(size=(8, 8))
    chol = np.linalg.cholesky(a @ a.T / 8 + 0.2 * np.eye(8))
    t = rng.standard_t(3, size=(rows, 8))
    return _numbers(t @ chol.T)


def skewed(rows, rng) -> dict:
    structure = np.random.default_rng(9)
    w = structure.normal(size=(6, 2)) * 0.6
    x = np.exp(rng.normal(size=(rows, 2)) @ w.T + 0.3 * rng.normal(size=(rows, 6)) + 3.0)
    x[:, :2][rng.random((rows, 2)) < 0.3] = 0.0
    return _numbers(np.round(x, 2))


def discrete(rows, rng) -> dict:
    structure = np.random.default_rng(10)
    sizes = (4, 5, 6, 8, 10, 12)
    classes = rng.choice(3, size=rows, p=[0.5, 0.3, 0.2])
    out = {}
    for j, size in enumerate(sizes):
        probabilities = structure.dirichlet(np.full(size, 0.5), size=3)
        cumulative = probabilities[classes].cumsum(1)
        codes = (rng.random((rows, 1)) > cumulative).sum(1)
        out[f"s{j}"] = np.array([f"v{c}" for c in np.minimum(codes, size - 1)], dtype=object)
    return out


def mixed(rows, rng) -> dict:
    structure = np.random.default_rng(11)
    factors = rng.normal(size=(rows, 2))
    numbers = factors @ structure.normal(size=(2, 5)) + 0.4 * rng.normal(size=(rows, 5))
    out = _numbers(numbers)
    for j in range(3):
        logits = factors @ structure.normal(size=(2, 5)) + structure.normal(size=5)
        p = np.exp(logits - logits.max(1, keepdims=True))
        codes = (rng.random((rows, 1)) > (p / p.sum(1, keepdims=True)).cumsum(1)).sum(1)
        out[f"s{j}"] = np.array([f"c{min(c, 4)}" for c in codes], dtype=object)
    for j in range(2):
        out[f"b{j}"] = factors @ structure.normal(size=2) + rng.normal(size=rows) > 0.5
    for name, values in out.items():
        gaps = rng.random(rows) < 0.05
        column = np.asarray(values, dtype=object)
        column[gaps] = None
        out[name] = column
    return out


FAMILIES = {
    "ppca-r2": lambda rows, rng: ppca(rows, rng, 10, 2),
    "ppca-r8-scaled": lambda rows, rng: ppca(rows, rng, 30, 8, np.logspace(-2, 3, 30)),
    "mixture": mixture,
    "student-t": student_t,
    "skewed": skewed,
    "discrete": discrete,
    "mixed": mixed,
}


def to_table(columns: dict) -> pa.Table:
    return pa.table(
        {
            name: pa.array(list(values) if values.dtype == object else values, from_pandas=True)
            for name, values in columns.items()
        }
    )


def run_cell(family: str, seed: int, rows: int) -> dict:
    rng = np.random.default_rng(seed)
    train, test = to_table(FAMILIES[family](rows, rng)), to_table(FAMILIES[family](TEST_ROWS, rng))
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "train.parquet"
        pq.write_table(train, path)
        fitted = fit(str(path), FitConfig(train=TrainConfig(seed=seed)))
    artifact = fitted.artifact
    encoded = artifact.spec.encode(test)
    x, mask = encoded.x[encoded.ok], encoded.mask[encoded.ok]
    model = fitted.model.cpu().eval()

    def at(k: int) -> np.ndarray:
        return score_records(
            model, x, mask, log_std=artifact.spec.continuous_log_std, k=k,
            seed=artifact.scoring.seed, proposal_scale=artifact.scoring.proposal_scale,
            points=artifact.scoring.points,
        ).log_likelihood.double().numpy()  # fmt: skip

    reference = at(REFERENCE_K)
    likely = reference >= np.quantile(reference, 0.01)  # the 99 % most likely rows
    error = reference - at(artifact.scoring.k)
    at_default = reference - at(defaults.K)
    return {
        "family": family,
        "seed": seed,
        "k": artifact.scoring.k,
        "k_errors": artifact.metadata.get("k_errors"),  # on the validation rows, at training
        "proposal_scale": artifact.scoring.proposal_scale,
        "table_mean_error": float(error.mean()),
        "likely_mean_error": float(error[likely].mean()),
        "mean_abs_error": float(np.abs(error).mean()),
        "error_at_default_k": float(at_default.mean()),
        "likely_error_at_default_k": float(at_default[likely].mean()),
    }


def main() -> None:
    parser = harness.parser(__doc__, quick="1 seed, 4,000 training rows")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--only", action="append", default=[], choices=sorted(FAMILIES))
    args = parser.parse_args()
    record = harness.start(args, "k_families")
    torch.set_num_threads(2)
    rows = args.rows or (4_000 if args.quick else 10_000)
    seeds = range(1 if args.quick else args.seeds)
    cells = []
    for family in args.only or FAMILIES:
        for seed in seeds:
            cell = run_cell(family, seed, rows)
            cells.append(cell)
            record.results["cells"] = cells
            record.save()
            print(f"{family} seed {seed}: K {cell['k']}, scale {cell['proposal_scale']:g}, "
                  f"table-mean error {cell['table_mean_error']:+.4f} (99 % most likely rows "
                  f"{cell['likely_mean_error']:+.4f}; at K={defaults.K} "
                  f"{cell['error_at_default_k']:+.4f} / {cell['likely_error_at_default_k']:+.4f})"
                  f", mean |error| {cell['mean_abs_error']:.4f}", flush=True)  # fmt: skip
    print(f"\n| family | K chosen | table-mean error, all rows / 99 % most likely | at K = "
          f"{defaults.K} | worst seed within {GOAL} |")  # fmt: skip
    print("|---|---|---:|---:|---|")
    for family in args.only or FAMILIES:
        mine = [c for c in cells if c["family"] == family]
        ks = "/".join(str(c["k"]) for c in mine)
        chosen = (
            f"{np.mean([c['table_mean_error'] for c in mine]):+.4f} / "
            f"{np.mean([c['likely_mean_error'] for c in mine]):+.4f}"
        )
        default = (
            f"{np.mean([c['error_at_default_k'] for c in mine]):+.4f} / "
            f"{np.mean([c['likely_error_at_default_k'] for c in mine]):+.4f}"
        )
        worst = max(abs(c["table_mean_error"]) for c in mine)
        print(f"| {family} | {ks} | {chosen} | {default} | "
              f"{'yes' if worst <= GOAL else 'no'} ({worst:.3f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
