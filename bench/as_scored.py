"""Item 2's question as the scorer runs it: fewer points, with the proposal scale `fit` chooses.

    python -m bench.as_scored            # 32 seeds, the three pPCAs
    python -m bench.as_scored --quick    # 8 seeds, the suite's pPCA (latent 4) only

On the pPCAs and mismatched proposals of bench/accuracy_breadth.py (log p(x) exact), each
construction is run twice per seed: with the proposal as given (q itself, the question of
bench/estimators.py's table), and as scored, with the factor on q's standard deviation that
`choose_proposal_scale` picks for it on 2,000 held-out rows (model/estimation/proposal.py: the
highest
trimmed-mean IWAE over 64 independent draws of the construction's own points; the i.i.d.
baseline is given i.i.d. draws). Printed per (latent, proposal, construction, K): the mean
|IWAE_K - log p(x)| per record and the table-mean bias on 4,000 test rows, each averaged over
seeds (± the standard error over seeds), and how often each factor was chosen.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch

from bench import harness
from bench.datasets import PPCAS, proposals
from tests.model.ppca import make_ppca
from vaewatch.model import defaults
from vaewatch.model.artifact import ScoringDefaults
from vaewatch.model.estimation.estimators import IWAE_STREAM, iwae
from vaewatch.model.estimation.noise import iid_noise, noise
from vaewatch.model.estimation.proposal import DRAWS, SCALE_STREAM, choose_proposal_scale

RUNS = (("i.i.d.", 64), ("spherical", 16), ("spherical", defaults.K))
# the trimmed share of the validation rows the scale rule compares means over (the large-table
# training trim; `fit` passes its validation_trim, 0.01)
TRIM = defaults.LARGE_TABLE_TRAINING["robust_trim"]


def construction(name: str, k: int, latent: int, seed: int):
    """(the scored points, the draws the scale is chosen on, or None: the design's own)."""
    if name == "i.i.d.":
        draws = torch.stack(
            [iid_noise(k, latent, seed * DRAWS + j, SCALE_STREAM) for j in range(DRAWS)]
        )
        return iid_noise(k, latent, seed, IWAE_STREAM), draws
    return noise(k, latent, seed, IWAE_STREAM, name), None


def measure(seeds: int, ppcas) -> list[dict]:
    rows = []
    for n_features, latent, model_seed in ppcas:
        ppca = make_ppca(n_features, latent, model_seed)
        spec, log_std = ppca.spec(), ppca.spec().continuous_log_std
        test = ppca.sample_table(4000, np.random.default_rng(1))
        enc, exact = spec.encode(test), ppca.exact_log_likelihood(test)
        held_out = spec.encode(ppca.sample_table(2000, np.random.default_rng(2)))
        data = SimpleNamespace(x_val=held_out.x, m_val=held_out.mask)
        for proposal, (mean_scale, var_scale) in proposals(latent).items():
            vae = ppca.to_vae(mean_scale=mean_scale, var_scale=var_scale)
            with torch.inference_mode():
                q = vae.encoder(enc.x, enc.mask)
            for name, k in RUNS:
                errors = {"given": [], "as scored": []}
                chosen = Counter()
                for seed in range(seeds):
                    eps, draws = construction(name, k, latent, seed)
                    scoring = replace(ScoringDefaults(), k=k, seed=seed)
                    scale = choose_proposal_scale(
                        vae, data, spec, scoring, "cpu", TRIM, draws=draws
                    )
                    chosen[scale] += 1
                    for how, c in (("given", 1.0), ("as scored", scale)):
                        with torch.inference_mode():
                            ll = iwae(vae, enc.x, enc.mask, eps=eps, log_std=log_std,
                                      posterior=q.widened(c)).log_likelihood.numpy()  # fmt: skip
                        errors[how].append((np.abs(ll - exact).mean(), abs((ll - exact).mean())))
                row = {"latent": latent, "proposal": proposal, "points": name, "k": k}
                for how, values in errors.items():
                    values = np.array(values)
                    row[how] = (*values.mean(0), values[:, 0].std(ddof=1) / np.sqrt(seeds))
                row["chosen"] = ", ".join(f"{c:g}: {n}" for c, n in sorted(chosen.items()))
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = harness.parser(__doc__, quick="8 seeds, latent 4 only")
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args()
    harness.start(args, "as_scored")
    torch.set_num_threads(1)
    seeds = args.seeds or (8 if args.quick else 32)
    started = time.perf_counter()
    rows = measure(seeds, [PPCAS[1]] if args.quick else PPCAS)
    print(f"{seeds} seeds, {time.perf_counter() - started:.0f} s; mean |IWAE - log p(x)| / bias")
    print("\n| latent | proposal | points | K | q as given | as scored | factors chosen |")
    print("|---:|---|---|---:|---:|---:|---|")
    for r in rows:
        g, s = r["given"], r["as scored"]
        print(
            f"| {r['latent']} | {r['proposal']} | {r['points']} | {r['k']} "
            f"| {g[0]:.3f}±{g[2]:.3f} / {g[1]:.3f} | {s[0]:.3f}±{s[2]:.3f} / {s[1]:.3f} "
            f"| {r['chosen']} |"
        )


if __name__ == "__main__":
    main()
