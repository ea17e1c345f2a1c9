"""How accurate the default K is beyond the model it was chosen on.

    python -m bench.accuracy_breadth           # 16 seeds on pPCA, 8 on the trained models
    python -m bench.accuracy_breadth --quick   # 4 seeds, fewer records

The default K (model/defaults.py) was chosen on the suite's closed-form pPCA (latent 4, 20
features) with two mismatched proposals. This script asks the same question of models it was not
chosen on, for i.i.d. normal points and for the two replicated designs vaewatch scores with
(model/estimation/noise.py: "spherical", the default since 2026-12-04, which is Sobol's beyond 2(D
+ 1)
points a replicate; "Sobol x4", older models' points), at several K:

1. **pPCA, latent 2, 4 and 8**, each with three proposals: over-dispersed (posterior means x0.8,
   variances x1.5), under-dispersed (x0.9, x0.7) and anisotropic (per latent dimension a mean
   scale in [0.75, 1.1] and a variance scale in [0.5, 2]). log p(x) is exact.
2. **Trained models**: the default `fit` on the synthetic transactions (the demo's data; latent 8,
   128x128) and on scikit-learn's breast-cancer table, scored on held-out rows. log p(x) has no
   closed form, so the reference is the pooled IWAE of four runs of 16,384 points (two Sobol, two
   i.i.d.: K = 65,536). An IWAE is a lower bound in expectation, and the reference is one too: a
   second reference with a *widened* proposal (half the points from q, half from q with twice its
   standard deviation, weighted by the mixture density) is computed beside it, and the gap
   between them is reported. Errors are measured against the higher of the two, per record.

On the trained models the records are split by the reference into the 95 % most likely (where
a score's value is read against the threshold) and the 5 % least likely (the anomalies), because
the Monte Carlo error of the two differs by two orders of magnitude. Printed: mean |error| per
record, the table-mean bias (the last row: the estimator as the scorer runs it, with the
proposal scale `fit` chose for the model), and the share of records whose error is within two
`log_likelihood_se` (the spread of 4 equal blocks of the points, as the scorer computes it), and
that standard error's own check (the standardised seed-to-seed difference, as scored).
"""

from __future__ import annotations

import functools
import math
import tempfile
import time

import numpy as np
import torch

from bench import harness
from bench.datasets import PPCAS, proposals
from tests.model.ppca import make_ppca
from vaewatch.model.defaults import K
from vaewatch.model.estimation.estimators import IWAE_STREAM, iwae, jacobian
from vaewatch.model.estimation.noise import SOBOL, iid_noise, noise
from vaewatch.model.network.vae import LOG_2PI

POINTS = {
    "i.i.d.": iid_noise,
    "Sobol x4": functools.partial(noise, points=SOBOL),
    "spherical x4": noise,
}
PPCA_RUNS = [("i.i.d.", 24), ("i.i.d.", 64), ("Sobol x4", 16), ("Sobol x4", K),
             ("spherical x4", 16), ("spherical x4", K), ("spherical x4", 32),
             ("spherical x4", 64)]  # fmt: skip
TRAINED_RUNS = [*PPCA_RUNS, ("i.i.d.", 256), ("spherical x4", 256), ("as scored", K)]
REFERENCE_POINTS = ("i.i.d.", "Sobol x4")  # as measured before the spherical points
REFERENCE_K = 16_384
REFERENCE_STREAM = 77  # not the scorer's stream: the reference shares no points with the runs


def ppca_models(seeds: int, records: int) -> list[dict]:
    """(latent, proposal, points, K, mean error, bias) on three pPCAs x three proposals."""
    out = []
    for n_features, latent, model_seed in PPCAS:
        ppca = make_ppca(n_features, latent, model_seed)
        table = ppca.sample_table(records, np.random.default_rng(1))
        spec = ppca.spec()
        enc = spec.encode(table)
        exact = ppca.exact_log_likelihood(table)
        for proposal, (mean_scale, var_scale) in proposals(latent).items():
            vae = ppca.to_vae(mean_scale=mean_scale, var_scale=var_scale)
            for points, k in PPCA_RUNS:
                errors, biases = [], []
                for seed in range(seeds):
                    eps = POINTS[points](k, latent, seed, IWAE_STREAM)
                    with torch.inference_mode():
                        ll = iwae(vae, enc.x, enc.mask, eps=eps, log_std=spec.continuous_log_std)
                    gap = ll.log_likelihood.numpy() - exact
                    errors.append(np.abs(gap).mean())
                    biases.append(abs(gap.mean()))
                out.append({
                    "latent": latent, "proposal": proposal, "points": points, "k": k,
                    "error": float(np.mean(errors)), "bias": float(np.mean(biases)),
                })  # fmt: skip
    return out


def widened_iwae(model, x, mask, log_std, eps: torch.Tensor, widen: float = 2.0) -> np.ndarray:
    """IWAE with a defensive proposal: the first half of the points from q(z|x), the second half
    from q with its standard deviation x `widen`, each weighted by the equal mixture's density
    (a valid proposal: the estimate of p(x) stays unbiased)."""
    d = model.config.latent_dim
    post = model.encoder(x, mask)
    mu, sd, log_var = post.mean.double(), post.std.double(), post.log_var.double()
    k = eps.shape[0]
    scales = torch.ones(k, dtype=torch.float64)
    scales[k // 2 :] = widen
    log_w = []
    for k0 in range(0, k, 32):
        e, s = eps[k0 : k0 + 32].double(), scales[k0 : k0 + 32]
        z = mu + s[:, None, None] * sd * e[:, None, :]
        log_px = model.decoder.log_prob(z.to(post.mean.dtype), x, mask).total().double()
        log_prior = -0.5 * (d * LOG_2PI + (z * z).sum(-1))
        components = []
        for c in (1.0, widen):
            u = (z - mu) / (c * sd)
            log_n = -0.5 * (d * LOG_2PI + (log_var + 2 * math.log(c)).sum(-1) + (u * u).sum(-1))
            components.append(math.log(0.5) + log_n)
        log_w.append(log_px + log_prior - torch.logsumexp(torch.stack(components), 0))
    log_w = torch.cat(log_w)
    correction = jacobian(model.decoder.density_mask(x, mask), log_std)
    return (torch.logsumexp(log_w, 0) - math.log(k) - correction).numpy()


def _pool(estimates: list[np.ndarray]) -> np.ndarray:
    """Several equal-K IWAEs of the same records pooled into one IWAE of all their points."""
    stacked = torch.from_numpy(np.stack(estimates))
    return (torch.logsumexp(stacked, 0) - math.log(len(estimates))).numpy()


def trained_models(seeds: int, quick: bool) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn import datasets

    from vaewatch.model.synthetic import LABEL_COLUMNS, transactions
    from vaewatch.model.training.fit import FitConfig, fit
    from vaewatch.model.training.loop import TrainConfig

    bc = datasets.load_breast_cancer().data
    order = np.random.default_rng(0).permutation(len(bc))
    cut = int(0.7 * len(bc))

    def frame(rows):
        return pa.table({f"f{j:02d}": bc[rows, j] for j in range(bc.shape[1])})

    tables = {
        "synthetic transactions": (
            transactions(6000, seed=11),
            transactions(1000 if quick else 2000, seed=12),
            {"id_column": "record_id", "exclude": [c for c in LABEL_COLUMNS if c != "record_id"]},
        ),  # fmt: skip
        "breast cancer": (frame(order[:cut]), frame(order[cut:]), {}),
    }
    out = []
    for name, (train, test, options) in tables.items():
        with tempfile.TemporaryDirectory() as folder:
            pq.write_table(train, f"{folder}/train.parquet")
            fitted = fit(folder, FitConfig(train=TrainConfig(device="cpu"), **options))
        model, spec = fitted.model, fitted.artifact.spec
        enc = spec.encode(test)
        x, mask, log_std = enc.x, enc.mask, spec.continuous_log_std
        d = model.config.latent_dim
        with torch.inference_mode():
            plain = _pool([
                iwae(model, x, mask, eps=POINTS[p](REFERENCE_K, d, s, REFERENCE_STREAM),
                     log_std=log_std).log_likelihood.numpy()
                for p in REFERENCE_POINTS for s in (0, 1)
            ])  # fmt: skip
            widened = _pool([
                widened_iwae(model, x, mask, log_std,
                             POINTS["Sobol x4"](REFERENCE_K, d, s, REFERENCE_STREAM))
                for s in (0, 1)
            ])  # fmt: skip
            reference = np.maximum(plain, widened)
            tail = reference < np.quantile(reference, 0.05)
            lift = widened - plain
            out.append({
                "model": name, "kind": "reference", "latent": d, "hidden": model.config.hidden,
                "records": len(reference), "lift_body": float(np.median(lift[~tail])),
                "lift_tail": float(np.median(lift[tail])), "lift_max": float(lift.max()),
                "lifted": float((lift > 1.0).mean()),
            })  # fmt: skip
            scale = fitted.artifact.scoring.proposal_scale
            scored = model.encoder(x, mask).widened(scale)  # what the Scorer uses
            out[-1]["scale"] = scale
            runs = [
                iwae(model, x, mask, k=K, seed=s, log_std=log_std, standard_error=True,
                     posterior=scored)
                for s in (1, 2)
            ]  # fmt: skip
            z = (runs[0].log_likelihood - runs[1].log_likelihood) / torch.hypot(
                runs[0].log_likelihood_se, runs[1].log_likelihood_se
            )
            out[-1]["z_sd_body"] = float(z[~tail].std())
            out[-1]["z_sd_tail"] = float(z[tail].std())
            for points, k in TRAINED_RUNS:
                body, tails, biases, covered = [], [], [], []
                for seed in range(seeds):
                    eps = POINTS.get(points, noise)(k, d, seed, IWAE_STREAM)
                    result = iwae(model, x, mask, eps=eps, log_std=log_std, standard_error=True,
                                  posterior=scored if points == "as scored" else None)  # fmt: skip
                    gap = result.log_likelihood.numpy() - reference
                    body.append(np.abs(gap[~tail]).mean())
                    tails.append(np.abs(gap[tail]).mean())
                    biases.append(abs(gap.mean()))
                    covered.append(np.abs(gap) <= 2 * result.log_likelihood_se.numpy())
                covered = np.stack(covered)
                label = points
                if points == "as scored":
                    label = f"spherical x4, q's sd x {scale:g} (as scored)"
                out.append({
                    "model": name, "kind": "run", "points": label, "k": k,
                    "body": float(np.mean(body)), "tail": float(np.mean(tails)),
                    "bias": float(np.mean(biases)),
                    "covered_body": float(covered[:, ~tail].mean()),
                    "covered_tail": float(covered[:, tail].mean()),
                })  # fmt: skip
    return out


def main() -> None:
    parser = harness.parser(__doc__, quick="4 seeds, fewer records")
    args = parser.parse_args()
    harness.start(args, "accuracy_breadth")
    started = time.perf_counter()
    ppca = ppca_models(4 if args.quick else 16, 1000 if args.quick else 3000)
    print(
        "pPCA, exact log p(x); mean |IWAE_K - log p(x)| per record / table-mean bias "
        f"(default K = {K})\n"
    )
    print("| latent | proposal | " + " | ".join(f"{p} K={k}" for p, k in PPCA_RUNS) + " |")
    print("|---:|---|" + "---:|" * len(PPCA_RUNS))
    for latent in (2, 4, 8):
        for proposal in ("over-dispersed", "under-dispersed", "anisotropic"):
            cells = [r for r in ppca if r["latent"] == latent and r["proposal"] == proposal]
            text = " | ".join(f"{r['error']:.3f} / {r['bias']:.3f}" for r in cells)
            print(f"| {latent} | {proposal} | {text} |")
    trained = trained_models(4 if args.quick else 8, args.quick)
    for ref in (r for r in trained if r["kind"] == "reference"):
        print(
            f"\n{ref['model']}: latent {ref['latent']}, hidden {ref['hidden']}, "
            f"{ref['records']:,} held-out records, proposal scale chosen at training "
            f"{ref['scale']:g}. Widened reference - plain reference: median "
            f"{ref['lift_body']:.3f} nats on the 95 % most likely records, "
            f"{ref['lift_tail']:.2f} on the 5 % least likely, max {ref['lift_max']:.1f}; "
            "more than 1 nat higher on "
            f"{ref['lifted']:.1%} of records. log_likelihood_se as scored (seeds 1 vs 2): "
            f"sd of the standardised difference {ref['z_sd_body']:.2f} on the 95 %, "
            f"{ref['z_sd_tail']:.2f} on the 5 % (1 is ideal)\n"
        )
        print("| points | K | mean abs error, 95 % most likely | 5 % least likely "
              "| table-mean bias | within 2 se (95 % / 5 %) |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|")
        for r in (r for r in trained if r["kind"] == "run" and r["model"] == ref["model"]):
            covered = f"{r['covered_body']:.1%} / {r['covered_tail']:.1%}"
            print(f"| {r['points']} | {r['k']} | {r['body']:.3f} | {r['tail']:.2f} | "
                  f"{r['bias']:.3f} | {covered} |")  # fmt: skip
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
