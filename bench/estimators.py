"""Estimator throughput: records/s for the ELBO and the IWAE at several K, as a fraction of the
FLOP/s torch reaches on a large matmul measured in the same process.

    python -m bench.estimators            # full run, prints Markdown tables
    python -m bench.estimators --quick    # fewer repeats, fewer seeds
    python -m bench.estimators --accuracy-only  # the accuracy table alone (~1 min)

Accuracy (the second table): the suite's closed-form model (probabilistic PCA with hand-set
weights, 20 features on scales 0.01..50, latent 4, a deliberately mismatched proposal: posterior
means x0.8, variances x1.5), where log p(x) is exact. Per K, for i.i.d. normal points and for the
two replicated designs vaewatch scores with (model/estimation/noise.py: spherical, the default, and
the
scrambled Sobol of older models): the mean |IWAE_K - log p(x)| per record,
and the bias of the table mean |mean(IWAE_K) - mean(log p(x))|, averaged over seeds; then the
calibration of `log_likelihood_se` (sd of the standardised seed-to-seed difference; 1 is ideal).

Model: 32 features (24 continuous, 4 boolean, 4 categorical with 10 values + OOV), the default
VAEConfig (latent 8, hidden [128, 128]). Records are random but valid encodings; the estimators'
cost does not depend on the values. FLOPs counted are the network's multiply-adds (x2): the
encoder once per record, the decoder once per (record, sample). Elementwise work (likelihoods,
logsumexp, attribution) is real cost but not counted, so the fraction is "useful FLOP/s".
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import statistics
import time

import numpy as np
import torch

from bench import harness
from bench.datasets import model_and_batch
from vaewatch.model.defaults import K
from vaewatch.model.estimation.estimators import (
    DEFAULT_MEMORY_BUDGET,
    IWAE_STREAM,
    elbo,
    iwae,
    score_records,
)
from vaewatch.model.estimation.noise import SOBOL, SPHERICAL, iid_noise, noise
from vaewatch.model.metrics import pooled_standardised_difference


def linear_flops(sizes: list[int]) -> int:
    return 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def best_seconds(fn, repeats: int) -> float:
    """Median of `repeats` timed calls after one warm-up (medians resist this machine's noise)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(device: torch.device, repeats: int, dtype=torch.float32) -> float:
    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats)


def run(quick: bool, device: torch.device, budget: int) -> list[dict]:
    repeats = 3 if quick else 7
    records = 4096
    model, x, mask = model_and_batch(records, device)
    c = model.config
    encoder_flops = linear_flops([c.encoder_input_dim, *c.hidden, 2 * c.latent_dim])
    decoder_flops = linear_flops([c.latent_dim, *c.hidden, c.decoder_output_dim])
    peak = matmul_flops_per_second(device, repeats)
    rows = []
    with torch.inference_mode():
        for name, k, fn in [
            ("elbo (S=1, training)", 1, lambda: elbo(model, x, mask, memory_budget=budget)),
            *[
                (f"iwae K={k}", k, (lambda k=k: iwae(model, x, mask, k=k, memory_budget=budget)))
                for k in (1, 16, 64, 256)
            ],
            (
                f"score (K={K}: IWAE, ELBO, SE, attribution)",
                K,
                lambda: score_records(model, x, mask, log_std=None, k=K, memory_budget=budget),
            ),
            (
                f"score (K={K}, bf16 matmuls: the default where the CPU has bf16)",
                K,
                lambda: score_records(
                    model,
                    x,
                    mask,
                    log_std=None,
                    k=K,
                    memory_budget=budget,
                    matmul_dtype=torch.bfloat16,
                ),
            ),  # fmt: skip
            (
                "score (K=64: IWAE, ELBO, SE, attribution)",
                64,
                lambda: score_records(model, x, mask, log_std=None, k=64, memory_budget=budget),
            ),
        ]:
            seconds = best_seconds(fn, repeats)
            flops = records * (encoder_flops + k * decoder_flops)
            rows.append(
                {
                    "estimator": name,
                    "records_per_s": records / seconds,
                    "gflops": flops / seconds / 1e9,
                    "fraction": flops / seconds / peak,
                }
            )
    peak_bf16 = matmul_flops_per_second(device, repeats, torch.bfloat16)
    for row in rows:
        row["fraction_bf16"] = row["gflops"] * 1e9 / peak_bf16
    rows.insert(
        0,
        {
            "estimator": "matmul 2048x2048 bf16 (the best rate here)",
            "records_per_s": float("nan"),
            "gflops": peak_bf16 / 1e9,
            "fraction": peak_bf16 / peak,
            "fraction_bf16": 1.0,
        },
    )
    rows.insert(
        0,
        {
            "estimator": "matmul 2048x2048 fp32 (reference)",
            "records_per_s": float("nan"),
            "gflops": peak / 1e9,
            "fraction": 1.0,
            "fraction_bf16": peak / peak_bf16,
        },
    )
    return rows


# the encoder's mismatch with the true posterior: (scale of its means, scale of its variances)
PROPOSALS = {"over-dispersed": (0.8, 1.5), "under-dispersed": (0.9, 0.7)}
DESIGNS = {
    "i.i.d. normal": iid_noise,
    "scrambled Sobol x4": functools.partial(noise, points=SOBOL),
    "spherical x4": functools.partial(noise, points=SPHERICAL),
}


def accuracy(quick: bool) -> tuple[list[dict], float]:
    """Rows of (construction, K, mean |error|, |table-mean bias|) on the closed-form pPCA, and
    the sd of the standardised seed-to-seed difference with the default (spherical) points."""

    from tests.model.ppca import make_ppca

    ppca = make_ppca()
    table = ppca.sample_table(2000 if quick else 4000, np.random.default_rng(1))
    spec = ppca.spec()
    enc = spec.encode(table)
    exact = ppca.exact_log_likelihood(table)
    seeds = range(4 if quick else 8)
    rows = []
    with torch.inference_mode():
        for proposal, (mean_scale, var_scale) in PROPOSALS.items():
            vae = ppca.to_vae(mean_scale=mean_scale, var_scale=var_scale)
            for name, points in DESIGNS.items():
                for k in (4, 16, 20, 24, 32, 64, 256):
                    errors, biases = [], []
                    for seed in seeds:
                        eps = points(k, ppca.latent_dim, seed, IWAE_STREAM)
                        ll = iwae(vae, enc.x, enc.mask, eps=eps, log_std=spec.continuous_log_std)
                        gap = ll.log_likelihood.numpy() - exact
                        errors.append(np.abs(gap).mean())
                        biases.append(abs(gap.mean()))
                    rows.append({
                        "proposal": proposal, "points": name, "k": k,
                        "error": np.mean(errors), "bias": np.mean(biases),
                    })  # fmt: skip
        vae = ppca.to_vae(*PROPOSALS["over-dispersed"])
        runs = [
            iwae(vae, enc.x, enc.mask, k=K, seed=s, log_std=spec.continuous_log_std,
                 standard_error=True)
            for s in range(1, 9)
        ]  # fmt: skip
    pooled = pooled_standardised_difference(
        [r.log_likelihood.numpy() for r in runs], [r.log_likelihood_se.numpy() for r in runs]
    )
    return rows, pooled


def precision_cost(quick: bool) -> dict:
    """bf16 against fp32 on a model fitted to the synthetic transactions (as the demo does):
    accuracy on 8,000 held-out records, and records/s of the whole Scorer at the default K."""
    import tempfile

    import pyarrow.parquet as pq

    from vaewatch.model.scoring import Scorer
    from vaewatch.model.synthetic import LABEL_COLUMNS, transactions
    from vaewatch.model.training.fit import FitConfig, fit
    from vaewatch.model.training.loop import TrainConfig

    with tempfile.TemporaryDirectory() as folder:
        pq.write_table(transactions(6000, seed=11), f"{folder}/train.parquet")
        config = FitConfig(
            id_column="record_id",
            exclude=[c for c in LABEL_COLUMNS if c != "record_id"],
            train=TrainConfig(epochs=8 if quick else 20, device="cpu"),
        )
        artifact = fit(folder, config).artifact
    table = transactions(8000, seed=12)
    out, rates = {}, {}
    for precision in ("fp32", "bf16"):
        scorer = Scorer(artifact, model_version="bench", device="cpu", precision=precision)
        scored = scorer.score(table).aligned()
        out[precision] = scored
        rates[precision] = table.num_rows / best_seconds(lambda s=scorer: s.score(table), 3)
    a = out["fp32"]["log_likelihood"].to_numpy(zero_copy_only=False)
    b = out["bf16"]["log_likelihood"].to_numpy(zero_copy_only=False)
    ok = np.isfinite(a)
    delta = np.abs(a[ok] - b[ok])

    def ranks(v):
        return np.argsort(np.argsort(v))

    flags = out["fp32"]["is_anomaly"].to_numpy(zero_copy_only=False)
    se = out["fp32"]["log_likelihood_se"].to_numpy(zero_copy_only=False)[ok]
    ordinary = ~flags[ok]  # below the model's threshold: where a score's absolute value matters
    return {
        "mean": delta.mean(),
        "max": delta.max(),
        "max_at": a[ok][delta.argmax()],
        "ordinary_mean": delta[ordinary].mean(),
        "ordinary_max": delta[ordinary].max(),
        "within_se": float((delta <= se).mean()),
        "max_relative": float((delta / np.abs(a[ok])).max()),
        "median_se": np.median(se),
        "spearman": np.corrcoef(ranks(a[ok]), ranks(b[ok]))[0, 1],
        "flags_changed": int((flags != out["bf16"]["is_anomaly"].to_numpy(False)).sum()),
        "rows": int(ok.sum()),
        "fp32_rate": rates["fp32"],
        "bf16_rate": rates["bf16"],
    }


def print_accuracy(quick: bool) -> None:
    rows, z_sd = accuracy(quick)
    print("\n| proposal | points | K | mean abs(IWAE - log p(x)) | table-mean bias |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['proposal']} | {r['points']} | {r['k']} | {r['error']:.4f} | {r['bias']:.4f} |"
        )
    print(f"\nlog_likelihood_se calibration (K={K}, seeds 1-8 in pairs): sd of the standardised "
          f"difference, pooled, {z_sd:.2f} (1 is ideal)")  # fmt: skip


def main() -> None:
    parser = harness.parser(__doc__, quick="fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--budget", type=int, default=DEFAULT_MEMORY_BUDGET, help="estimator memory budget in bytes"
    )
    parser.add_argument(
        "--budgets", action="store_true", help="also sweep memory budgets for IWAE K=64"
    )
    parser.add_argument("--accuracy-only", action="store_true", help="the accuracy table alone")
    args = parser.parse_args()
    harness.start(args, "estimators")
    if args.accuracy_only:
        print_accuracy(args.quick)
        return
    device = torch.device(args.device)
    rows = run(args.quick, device, args.budget)
    print(
        f"date {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"budget {args.budget >> 20} MiB, 4096 records x 32 features\n"
    )
    print("| estimator | records/s | useful GFLOP/s | of fp32 matmul | of bf16 matmul |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        rps = "" if r["records_per_s"] != r["records_per_s"] else f"{r['records_per_s']:,.0f}"
        print(
            f"| {r['estimator']} | {rps} | {r['gflops']:.1f} | {r['fraction']:.0%} | "
            f"{r['fraction_bf16']:.0%} |"
        )
    print_accuracy(args.quick)
    cost = precision_cost(args.quick)
    print(
        f"\nbf16 vs fp32 (synthetic transactions, {cost['rows']:,} records, default K): mean "
        f"|delta log_likelihood| {cost['mean']:.4f} nats, max {cost['max']:.3f} (at a record "
        f"scoring {cost['max_at']:.1f}); on the records below the threshold mean "
        f"{cost['ordinary_mean']:.4f}, max {cost['ordinary_max']:.3f}; |delta| <= the record's "
        f"own log_likelihood_se on {cost['within_se']:.1%}; largest |delta| / |log_likelihood| "
        f"{cost['max_relative']:.2%}; median log_likelihood_se {cost['median_se']:.4f}, "
        f"Spearman {cost['spearman']:.6f}, is_anomaly changed on {cost['flags_changed']}; "
        f"Scorer {cost['fp32_rate']:,.0f} -> {cost['bf16_rate']:,.0f} records/s "
        f"({cost['bf16_rate'] / cost['fp32_rate']:.2f}x)"
    )
    if args.budgets:
        print("\n| memory budget | IWAE K=64 fraction of matmul |")
        print("|---:|---:|")
        for mib in (16, 64, 256, 1024):
            sweep = run(True, device, mib << 20)
            k64 = next(r for r in sweep if r["estimator"] == "iwae K=64")
            print(f"| {mib} MiB | {k64['fraction']:.0%} |")


if __name__ == "__main__":
    main()
