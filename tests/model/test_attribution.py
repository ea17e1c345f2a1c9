"""Leave-one-out attribution, -log p(x_j | x_-j) (model/estimation/attribution.py), against the
closed form
of probabilistic PCA with hand-set weights (tests/model/ppca.py), and what it names."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.model.ppca import make_ppca
from vaewatch.model.estimation.attribution import explain_flagged, explained_rows, leave_one_out
from vaewatch.model.estimation.estimators import iwae

N_RECORDS = 200


@pytest.fixture(scope="module")
def ppca():
    return make_ppca(n_features=12, latent_dim=3, seed=0)


def _estimator(spec, k):
    return dict(k=k, seed=0, log_std=spec.continuous_log_std, proposal_scale=1.0,
                memory_budget=1 << 26)  # fmt: skip


def test_leave_one_out_is_the_closed_form_conditional(ppca):
    """-log p(x_j | x_-j) = log p(x_-j) - log p(x), each closed form (a Gaussian marginal), in
    the data's units. The proposal for p(x_-j) is the linear encoder with x_j hidden, which is
    not that marginal's posterior, so the estimate converges with K rather than being exact."""
    table = ppca.sample_table(N_RECORDS, np.random.default_rng(1))
    spec = ppca.spec()
    enc = spec.encode(table)
    full = ppca.exact_log_likelihood(table)
    exact = np.column_stack([
        ppca.exact_log_likelihood(table, [i for i in range(ppca.n_features) if i != j]) - full
        for j in range(ppca.n_features)
    ])  # fmt: skip
    everything = torch.ones(enc.x.shape, dtype=torch.bool)
    vae = ppca.to_vae()
    errors = {}
    for k in (16, 4096):
        estimate = leave_one_out(vae, enc.x, enc.mask, everything, **_estimator(spec, k)).numpy()
        errors[k] = np.abs(estimate - exact).mean()
    # measured: 0.097 nats per value at K = 16 (spherical points; Sobol 0.164), 0.016 at 4096
    assert errors[4096] < 0.03 and errors[4096] < errors[16] / 4, errors
    # a feature that is not a candidate, or is missing, gets no value
    some = everything.clone()
    some[:, 5] = False
    mask = enc.mask.clone()
    mask[:10, 2] = False
    partial = leave_one_out(vae, enc.x, mask, some, **_estimator(spec, 16)).numpy()
    assert np.isnan(partial[:, 5]).all() and np.isnan(partial[:10, 2]).all()
    assert not np.isnan(partial[10:, 2]).any()


def test_a_value_far_out_of_range_is_named_first(ppca):
    """One feature per record pushed 40 standard deviations out: -log p(x_j | x_-j) names it
    first for every flagged record, the features after it are ordinary once it is left out,
    and the unflagged records keep the cheap attribution. (A linear model
    cannot drag z far enough for the cheap one to go wrong too; the demo's network does: the
    demo test checks the out-of-range amounts are named.)"""
    rng = np.random.default_rng(2)
    spec = ppca.spec()
    normal = spec.encode(ppca.sample_table(N_RECORDS, rng))
    table = ppca.sample_table(N_RECORDS, rng)
    pushed = np.arange(N_RECORDS) % ppca.n_features
    columns = {name: table.column(name).to_numpy().copy() for name in table.column_names}
    for j in range(ppca.n_features):
        columns[f"x{j}"][pushed == j] += 40.0 * ppca.std[j]
    enc = spec.encode(pa.table(columns))
    vae = ppca.to_vae()
    everything = torch.ones(enc.x.shape, dtype=torch.bool)
    estimator = _estimator(spec, 64)

    def cheap(e):
        with torch.inference_mode():
            return iwae(vae, e.x, e.mask, k=64, seed=0, log_std=spec.continuous_log_std,
                        contributions=True).feature_nll.numpy()  # fmt: skip

    baseline = np.median(cheap(normal), axis=0)
    conditional = leave_one_out(vae, normal.x, normal.mask, everything, **estimator).numpy()
    conditional_baseline = np.median(conditional, axis=0)
    excess = cheap(enc) - baseline
    # every third record of the first 192 flagged: 64, the budget of a 200-record batch
    # (max(64, 10 % of 200)); the unflagged keep the cheap attribution
    flagged = (np.arange(N_RECORDS) % 3 == 0) & (np.arange(N_RECORDS) < 192)
    score = -np.arange(N_RECORDS, dtype=float)  # any priority: all 64 fit the budget
    result = explain_flagged(
        vae, enc.x, enc.mask, excess, flagged, conditional_baseline, score, **estimator
    )
    explained, left = result.excess, result.unexplained
    assert left == 0
    np.testing.assert_array_equal(result.rows, np.flatnonzero(flagged))
    np.testing.assert_array_equal(result.lead, pushed[flagged])
    assert (explained.argmax(1)[flagged] == pushed[flagged]).all()
    np.testing.assert_array_equal(explained[~flagged], excess[~flagged])
    # the features after the first are measured with it left out too: given the pushed value,
    # every other feature's Gaussian conditional is shifted (the second largest excess: median
    # 74 nats, all above 5); without it they are ordinary (measured: median 0.6, max 3.1)
    plain = leave_one_out(vae, enc.x, enc.mask, everything, **estimator).numpy()
    assert (np.sort(plain - conditional_baseline, axis=1)[flagged, -2] > 5.0).all()
    assert (np.sort(explained[flagged], axis=1)[:, -2] < 5.0).all()
    # every record flagged: 200 > the budget, so the 64 with the highest scores (hand-set:
    # those flagged above) get the leave-one-out term, and the other 136 keep the cheap one
    every = np.ones(N_RECORDS, dtype=bool)
    chosen = np.flatnonzero(flagged)
    result = explain_flagged(
        vae, enc.x, enc.mask, excess, every, conditional_baseline, flagged * 1.0, **estimator
    )
    budgeted, left = result.excess, result.unexplained
    assert left == N_RECORDS - 64
    np.testing.assert_allclose(budgeted[chosen], explained[chosen], rtol=0, atol=1e-9)
    others = np.setdiff1d(np.arange(N_RECORDS), chosen)
    np.testing.assert_array_equal(budgeted[others], excess[others])


def test_the_budget_picks_the_most_anomalous_flagged_records():
    flagged = np.zeros(3000, dtype=bool)
    flagged[:2000] = True
    score = np.arange(3000, dtype=float) % 1000  # highest at 999, 1999, 998, 1998, ...
    rows = explained_rows(flagged, score)
    assert rows.size == 300  # 10 % of 3,000 > 64
    expected = np.sort(np.concatenate([np.arange(850, 1000), np.arange(1850, 2000)]))
    np.testing.assert_array_equal(rows, expected)
    flagged[300:2000] = False  # 300 flagged: within the budget, all of them whatever the score
    np.testing.assert_array_equal(explained_rows(flagged, score), np.arange(300))
    small = np.ones(100, dtype=bool)  # a small batch: at least 64
    np.testing.assert_array_equal(explained_rows(small, -np.arange(100.0)), np.arange(64))


def test_a_run_at_another_k_keeps_the_posterior_attribution(fitted):
    """The leave-one-out baseline was computed at the model's K; a run with another K (whose
    IWAE estimates lie on another scale, as the drift check knows) keeps -log p(x_j|z) for every
    record, exactly what a model without the baseline gives. At the model's own K the flagged
    records' top features change."""
    import dataclasses

    from vaewatch.model.scoring import Scorer, ScoringOverrides

    artifact, table = fitted
    table = table.slice(0, 3000)
    plain = dataclasses.replace(
        artifact,
        calibration=dataclasses.replace(artifact.calibration, conditional_baseline=None),
    )

    def top(a, k=None):
        scorer = Scorer(a, model_version="t", device="cpu", precision="fp32",
                        overrides=ScoringOverrides(k=k))  # fmt: skip
        scored = scorer.score(table).aligned()
        flagged = scored["is_anomaly"].to_numpy(zero_copy_only=False)
        return scored["top_features"].to_pylist(), flagged

    def listed(rows):
        return [[(e["feature"], e["contribution"]) for e in r] for r in rows]

    def bases(rows, which):
        return {e["basis"] for i in which for e in rows[i]}

    other = artifact.scoring.k // 2
    (built, flagged), (cheap, same) = top(artifact, other), top(plain, other)
    assert listed(built) == listed(cheap) and (flagged == same).all()
    loud = np.flatnonzero(flagged)
    # each says why its flagged records have no expectation fields
    assert bases(built, loud) == {"other_k"} and bases(cheap, loud) == {"not_in_model"}
    assert {e["expected"] for r in built for e in r} == {None}
    (built, flagged), (cheap, same) = top(artifact), top(plain)
    assert (flagged == same).all() and flagged.sum() >= 10
    quiet = np.flatnonzero(~flagged)
    loud = np.flatnonzero(flagged)
    assert listed([built[i] for i in quiet]) == listed([cheap[i] for i in quiet])
    assert listed([built[i] for i in loud]) != listed([cheap[i] for i in loud])
    assert bases(built, quiet) == {"not_flagged"} and bases(built, loud) == {"conditional"}
