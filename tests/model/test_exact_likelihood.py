"""Estimators against closed-form answers: probabilistic PCA, where log p(x) is known exactly."""

import functools

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.model.ppca import make_ppca
from vaewatch.model import defaults
from vaewatch.model.estimation.estimators import ELBO_STREAM, IWAE_STREAM, elbo, iwae
from vaewatch.model.estimation.noise import DESIGNS, iid_noise, noise
from vaewatch.model.metrics import pooled_standardised_difference

N_RECORDS = 200


@pytest.fixture(scope="module")
def ppca():
    return make_ppca(n_features=20, latent_dim=4, seed=0)


@pytest.fixture(scope="module")
def data(ppca):
    table = ppca.sample_table(N_RECORDS, np.random.default_rng(1))
    spec = ppca.spec()
    return table, spec, spec.encode(table), ppca.exact_log_likelihood(table)


def _iwae(vae, enc, spec, k, seed=0):
    with torch.inference_mode():
        return iwae(
            vae, enc.x, enc.mask, k=k, seed=seed, log_std=spec.continuous_log_std
        ).log_likelihood.numpy()


def _elbo(vae, enc, spec, samples=1, seed=0):
    with torch.inference_mode():
        return elbo(
            vae, enc.x, enc.mask, samples=samples, seed=seed, log_std=spec.continuous_log_std
        )


def test_exact_posterior_makes_every_importance_weight_exact(ppca, data):
    """With q = the true posterior, log p(x,z) - log q(z|x) = log p(x) for every z: IWAE_K equals
    log p(x) record by record, for any K, up to float32 rounding."""
    _, spec, enc, exact = data
    vae = ppca.to_vae()
    for k in (1, 10, 100):
        np.testing.assert_allclose(_iwae(vae, enc, spec, k), exact, atol=2e-3, rtol=0)


def test_exact_posterior_elbo_is_exact(ppca, data):
    """The analytic-KL ELBO is exact *in expectation* at the true posterior; its S-sample estimate
    of E_q[log p(x|z)] has Monte-Carlo error. Per record it must sit within 4 standard errors of
    log p(x), and the KL must equal the closed-form KL(q* || p) = log p(x) - E_q*[log p(x|z)]."""
    _, spec, enc, exact = data
    vae = ppca.to_vae()
    samples = 4000
    result = _elbo(vae, enc, spec, samples=samples)
    # Per-record standard error of the reconstruction term, from the same noise.
    eps = iid_noise(samples, ppca.latent_dim, 0, ELBO_STREAM).float()
    with torch.inference_mode():
        post = vae.encoder(enc.x, enc.mask)
        z = post.mean + post.std * eps[:, None, :]
        recon = vae.decoder.log_prob(z, enc.x, enc.mask).total().double()
    stderr = (recon.std(0) / np.sqrt(samples)).numpy()
    assert np.all(np.abs(result.elbo.numpy() - exact) <= 4 * stderr + 1e-3)
    # Analytic KL of the true posterior to N(0, I), by hand.
    mu = np.asarray(post.mean, dtype=np.float64)
    var = ppca.posterior_var
    kl = 0.5 * (mu**2 + var - 1 - np.log(var)).sum(-1)
    np.testing.assert_allclose(result.kl.numpy(), kl, rtol=1e-4, atol=1e-4)


def test_iwae_converges_to_exact_as_k_grows(ppca, data):
    _, spec, enc, exact = data
    vae = ppca.to_vae(mean_scale=0.8, var_scale=1.5)  # a mismatched proposal: a real gap at K=1
    errors = [np.abs(_iwae(vae, enc, spec, k) - exact).mean() for k in (1, 10, 100, 1000, 5000)]
    assert errors[0] > 0.3, f"the mismatched proposal should leave a visible gap: {errors}"
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), (
        f"error must fall with K: {errors}"
    )
    assert errors[-1] < 0.02, f"mean |IWAE_5000 - exact| = {errors[-1]:.4f} nats/record"


def test_bounds_are_ordered_in_expectation(ppca, data):
    """E[elbo] <= E[IWAE_1] <= E[IWAE_10] <= E[IWAE_100] <= log p(x) (Burda et al. 2015).
    Scoring noise is shared across records (common random numbers), so the expectation over the
    noise is estimated by averaging over seeds; tolerances are 3 standard errors of that mean."""
    _, spec, enc, exact = data
    vae = ppca.to_vae(mean_scale=0.7, var_scale=1.0)
    seeds = range(48)
    columns = [[_elbo(vae, enc, spec, seed=s).elbo.numpy().mean() for s in seeds]]
    for k in (1, 10, 100):
        columns.append([_iwae(vae, enc, spec, k, seed=s).mean() for s in seeds])
    runs = np.array(columns) - exact.mean()  # (estimator, seed): gap to the exact mean
    means = runs.mean(1)
    stderr = runs.std(1, ddof=1) / np.sqrt(runs.shape[1])
    for i in range(len(means) - 1):
        slack = 3 * np.hypot(stderr[i], stderr[i + 1])
        assert means[i] <= means[i + 1] + slack, (i, means, stderr)
    assert means[-1] <= 3 * stderr[-1], (means, stderr)
    # and the gaps are real, not all zero: IWAE_100 is strictly tighter than IWAE_1
    assert means[3] - means[1] > 0.5, means


def test_missing_feature_is_marginalised(ppca, data):
    """With feature 3 null, IWAE estimates the closed-form *marginal* log p(x without x3)."""
    table, spec, _, _ = data
    missing = 3
    columns = {name: table.column(name) for name in table.column_names}
    columns[f"x{missing}"] = pa.nulls(table.num_rows, pa.float64())
    holed = pa.table(columns)
    enc = spec.encode(holed)
    assert not enc.mask[:, missing].any()
    observed = [j for j in range(ppca.n_features) if j != missing]
    exact_marginal = ppca.exact_log_likelihood(table, observed=observed)
    estimate = _iwae(ppca.to_vae(), enc, spec, k=5000)
    assert np.abs(estimate - exact_marginal).mean() < 0.02
    # a NaN in a float column is missing too, with the same answer
    columns[f"x{missing}"] = pa.array(np.full(table.num_rows, np.nan))
    np.testing.assert_allclose(
        _iwae(ppca.to_vae(), spec.encode(pa.table(columns)), spec, 5000), estimate
    )


def _errors(vae, enc, spec, exact, k, points, seeds=range(6)) -> tuple[float, float]:
    """(mean |IWAE_K - log p(x)| per record, |bias of the table mean|), averaged over seeds."""
    gaps = []
    for seed in seeds:
        eps = points(k, vae.config.latent_dim, seed, IWAE_STREAM)
        with torch.inference_mode():
            ll = iwae(vae, enc.x, enc.mask, eps=eps, log_std=spec.continuous_log_std)
        gaps.append(ll.log_likelihood.numpy() - exact)
    return float(np.mean([np.abs(g).mean() for g in gaps])), float(
        np.mean([abs(g.mean()) for g in gaps])
    )


def _mean_error(vae, enc, spec, exact, k, points, seeds=range(6)):
    return _errors(vae, enc, spec, exact, k, points, seeds)[0]


@pytest.mark.parametrize("points", DESIGNS)
def test_the_randomised_points_are_closer_to_exact_than_iid(ppca, data, points):
    """At equal K on the mismatched proposal, both designs give a mean |IWAE - log p(x)| well
    under the i.i.d. one (measured at K = 32: 0.065 for Sobol's, 0.060 for the spherical points,
    0.145 for i.i.d.): the margin asked for, 0.7x, is many seed-to-seed spreads from chance."""
    _, spec, enc, exact = data
    vae = ppca.to_vae(mean_scale=0.8, var_scale=1.5)
    design = _mean_error(vae, enc, spec, exact, 32, functools.partial(noise, points=points))
    plain = _mean_error(vae, enc, spec, exact, 32, iid_noise)
    assert design < 0.7 * plain, (design, plain)


def test_spherical_points_at_k16_are_as_accurate_as_iid_at_k64(ppca):
    """Issue's goal for the points, on the over-dispersed proposal, where it is met clearly
    (bench/notes/, 100 seeds: 0.082 / 0.023 against 0.099 / 0.034 nats): on 2,000 records
    and 16 seeds, the mean |IWAE - log p| and the table-mean bias of the spherical points at
    K = 16 are below those of i.i.d. points at K = 64 (measured: 0.080 / 0.025 against 0.105 /
    0.034)."""
    table = ppca.sample_table(2000, np.random.default_rng(1))
    spec = ppca.spec()
    enc, exact = spec.encode(table), ppca.exact_log_likelihood(table)
    vae = ppca.to_vae(mean_scale=0.8, var_scale=1.5)
    error, bias = _errors(vae, enc, spec, exact, 16, noise, seeds=range(16))
    iid_error, iid_bias = _errors(vae, enc, spec, exact, 64, iid_noise, seeds=range(16))
    assert error < 0.9 * iid_error and bias < iid_bias, (error, bias, iid_error, iid_bias)


@pytest.mark.parametrize("mean_scale, var_scale", [(0.8, 1.5), (0.9, 0.7)])
def test_the_default_k_is_as_accurate_as_iid_k64(ppca, mean_scale, var_scale):
    """The accuracy target the default K was chosen by (model/defaults.py): on 2,000 records and
    8 seeds, with an over- and an under-dispersed proposal, the default K's mean |IWAE - log p|
    and the bias of the table mean are no worse than those of i.i.d. points at K = 64, the
    default before. Measured at K = 24 with the spherical points: 0.077 / 0.013 against 0.111 /
    0.032 (over-dispersed), 0.114 / 0.086 against 0.127 / 0.101 (under-dispersed); with Sobol's,
    0.093 / 0.027 and 0.096 / 0.069."""
    table = ppca.sample_table(2000, np.random.default_rng(1))
    spec = ppca.spec()
    enc, exact = spec.encode(table), ppca.exact_log_likelihood(table)
    vae = ppca.to_vae(mean_scale=mean_scale, var_scale=var_scale)
    error, bias = _errors(vae, enc, spec, exact, defaults.K, noise, seeds=range(8))
    iid_error, iid_bias = _errors(vae, enc, spec, exact, 64, iid_noise, seeds=range(8))
    assert error <= iid_error and bias <= iid_bias, (error, bias, iid_error, iid_bias)


@pytest.mark.parametrize("points", DESIGNS)
def test_standard_error_is_calibrated(ppca, data, points):
    """Over records, the difference of two independently seeded estimates divided by their
    combined standard error has a standard deviation near 1 (R = 4 replicates leave the error
    estimate 3 degrees of freedom, which fattens the tails), at K = 64 and at the default K.
    Every record shares a seed's points, so one pair of seeds is one draw of the whole table's
    errors (0.8-2.0 between pairs, measured): the sd is pooled over four pairs (measured at K = 24:
    1.21 for the spherical points, 1.04 for Sobol's; at K = 64, where both designs are Sobol's
    (16 points a replicate in 4 dimensions), 1.19)."""
    _, spec, enc, _ = data
    vae = ppca.to_vae(mean_scale=0.8, var_scale=1.5)
    for k in (64, defaults.K):
        with torch.inference_mode():
            runs = [
                iwae(vae, enc.x, enc.mask, k=k, seed=s, log_std=spec.continuous_log_std,
                     standard_error=True, points=points)
                for s in range(1, 9)
            ]  # fmt: skip
        pooled = pooled_standardised_difference(
            [r.log_likelihood.numpy() for r in runs], [r.log_likelihood_se.numpy() for r in runs]
        )
        assert 0.75 < pooled < 1.5, (k, pooled)
    with torch.inference_mode():
        single = iwae(vae, enc.x, enc.mask, k=1, standard_error=True).log_likelihood_se
    assert torch.isnan(single).all()  # one point: no spread to measure


@pytest.mark.parametrize("points", DESIGNS)
def test_standard_error_holds_where_one_replicate_takes_the_weight(ppca, points):
    """Records far out in latent space (z at 5x the prior's scale) under a proposal that puts
    them too near the origin and too narrow: their importance weights are heavy-tailed, and a
    few points carry them. `log_likelihood_se` is the sd of the 4 replicates' own estimates / 2
    (recomputed here from four separate IWAE runs on the replicates' points); the delta method
    (sd of the replicate means / 2 over their mean) saturates near 1 nat and understates the
    seed-to-seed spread on such records. Every record shares a seed's points, so one pair of
    seeds is one draw of the table's errors (1.3-2.1 between pairs for this rule, measured):
    the standardised differences are pooled over eight pairs (measured: 1.72 for the spherical
    points and 1.73 for Sobol's, against 2.94 and 2.89 with the delta method)."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((1000, ppca.latent_dim)) * 5.0
    x_std = z @ ppca.W.T + ppca.b + rng.standard_normal((1000, ppca.n_features)) * np.sqrt(ppca.psi)
    x = ppca.mean + ppca.std * x_std
    spec = ppca.spec()
    enc = spec.encode(pa.table({f"x{j}": x[:, j] for j in range(ppca.n_features)}))
    vae = ppca.to_vae(mean_scale=0.7, var_scale=0.5)
    k, log_std = defaults.K, spec.continuous_log_std
    values, errors, delta = [], [], []
    with torch.inference_mode():
        for s in range(1, 17):
            run = iwae(vae, enc.x, enc.mask, k=k, seed=s, log_std=log_std, standard_error=True,
                       points=points)  # fmt: skip
            eps = noise(k, ppca.latent_dim, s, IWAE_STREAM, points)
            blocks = torch.stack([
                iwae(vae, enc.x, enc.mask, eps=block, log_std=log_std).log_likelihood
                for block in eps.chunk(4)
            ])  # fmt: skip
            torch.testing.assert_close(
                run.log_likelihood_se, blocks.std(0) / 2, rtol=1e-6, atol=1e-9
            )
            means = torch.exp(blocks - blocks.max(0).values)
            values.append(run.log_likelihood.numpy())
            errors.append(run.log_likelihood_se.numpy())
            delta.append((means.std(0) / 2 / means.mean(0)).numpy())
    pooled = pooled_standardised_difference(values, errors)
    pooled_delta = pooled_standardised_difference(values, delta)
    assert 0.75 < pooled < 2.0, pooled
    assert pooled_delta > 1.25 * pooled, (pooled, pooled_delta)  # the old rule fails here


def _validation(ppca, rows=2000, exact=False):
    """What `choose_proposal_scale` reads of the training data: the validation rows (and, with
    `exact`, their exact log p(x))."""
    from types import SimpleNamespace

    spec = ppca.spec()
    table = ppca.sample_table(rows, np.random.default_rng(7))
    enc = spec.encode(table)
    data = SimpleNamespace(x_val=enc.x, m_val=enc.mask)
    return (spec, data, ppca.exact_log_likelihood(table)) if exact else (spec, data)


@pytest.mark.parametrize(
    "var_scale, allowed",
    [
        # q is the exact posterior: every weight is p(x) at 1. A wider q's weight depends on the
        # point's radius alone, which the spherical points' stratified radii average closely
        # (measured: 0.017 nats per record at 1.25), so 1.25 may win on the points' luck
        (1.0, {1.0, 1.25}),
        (1.5, {1.0}),  # q already wider than the posterior
        (0.7, {1.25, 1.5}),  # q's sd 0.84 of the posterior's: the match is a factor of 1.2
        (0.3, {1.5, 2.0}),  # q's sd 0.55 of the posterior's: the match is a factor of 1.8
    ],
)
def test_the_proposal_scale_is_chosen_by_how_wide_q_is(ppca, var_scale, allowed):
    """The factor chosen is one the match allows, and within 0.02 nats per record of the most
    accurate of the four (the mean |IWAE - log p(x)| on the same rows, exact): the criterion
    cannot tell apart factors closer than that (measured with the default seed: q exact, 1 chosen;
    q's variance x1.5, 1 at 0.018 against 0.003 for 1.25; x0.7, 1.25 at 0.011 against 0.007 for
    2; x0.3, 2 at 0.017, the best)."""
    from vaewatch.model.artifact import ScoringDefaults
    from vaewatch.model.estimation.proposal import choose_proposal_scale

    spec, data, exact = _validation(ppca, exact=True)
    vae = ppca.to_vae(var_scale=var_scale)
    scale = choose_proposal_scale(vae, data, spec, ScoringDefaults(), "cpu", trim=0.01)
    assert scale in allowed, (var_scale, scale)
    with torch.inference_mode():
        posterior = vae.encoder(data.x_val, data.m_val)
        error = {
            c: np.abs(
                iwae(vae, data.x_val, data.m_val, k=defaults.K, log_std=spec.continuous_log_std,
                     posterior=posterior.widened(c)).log_likelihood.numpy() - exact
            ).mean()
            for c in defaults.PROPOSAL_SCALES
        }  # fmt: skip
    assert error[scale] <= min(error.values()) + 0.02, (scale, error)


@pytest.mark.parametrize(
    "mean_scale, var_scale, allowed",
    [
        # q too wide already (bench's over-dispersed proposal): widening only costs (measured
        # mean errors 0.074 / 0.152 / 0.220 / 0.387 for 1 / 1.25 / 1.5 / 2)
        (0.8, 1.5, {1.0}),
        # q far too narrow: 1.5 or 2 (0.121, 0.017), never 1 or 1.25 (0.823, 0.364)
        (1.0, 0.3, {1.5, 2.0}),
    ],
)
def test_the_proposal_scale_follows_the_design_not_one_draws_luck(
    ppca, mean_scale, var_scale, allowed
):
    """For every one of 8 scoring seeds the factor is one the proposal's width allows. Chosen
    on the scored draw alone, the highest of four trimmed means was that draw's luck: for the
    too-wide q it chose 2 on 4 of these 8 seeds and 1.5 on one (measured), the worst of the
    four, at 5x the error of 1."""
    from dataclasses import replace

    from vaewatch.model.artifact import ScoringDefaults
    from vaewatch.model.estimation.proposal import choose_proposal_scale

    spec, data = _validation(ppca)
    vae = ppca.to_vae(mean_scale=mean_scale, var_scale=var_scale)
    chosen = [
        choose_proposal_scale(
            vae, data, spec, replace(ScoringDefaults(), seed=seed), "cpu", trim=0.01
        )
        for seed in range(8)
    ]
    assert set(chosen) <= allowed, chosen


def test_a_wider_proposal_brings_a_narrow_qs_estimate_closer_to_log_p(ppca):
    """The chosen scale is worth having: with q's variance at 0.3 of the posterior's, the
    mean |IWAE_K - log p(x)| at the default K falls from 0.82 to 0.017 nats (measured; it chose
    2, the most accurate of the four: 0.36 at 1.25, 0.12 at 1.5) when q is widened, and
    the scorer uses the artifact's factor (its log_likelihood equals the IWAE computed here with
    the widened Gaussian written out by hand)."""
    from vaewatch.model.artifact import ModelArtifact, ScoringDefaults
    from vaewatch.model.calibration.scores import Calibration
    from vaewatch.model.estimation.proposal import choose_proposal_scale
    from vaewatch.model.network.vae import Posterior
    from vaewatch.model.scoring import Scorer

    spec, data = _validation(ppca)
    vae = ppca.to_vae(var_scale=0.3)
    scale = choose_proposal_scale(vae, data, spec, ScoringDefaults(), "cpu", trim=0.01)
    table = ppca.sample_table(2000, np.random.default_rng(8))
    enc, exact = spec.encode(table), ppca.exact_log_likelihood(table)
    with torch.inference_mode():
        post = vae.encoder(enc.x, enc.mask)
        wide = Posterior(post.mean, post.log_var + 2.0 * np.log(scale))
        plain_ll = iwae(vae, enc.x, enc.mask, log_std=spec.continuous_log_std, posterior=post)
        wide_ll = iwae(vae, enc.x, enc.mask, log_std=spec.continuous_log_std, posterior=wide)
    plain_error = np.abs(plain_ll.log_likelihood.numpy() - exact).mean()
    wide_error = np.abs(wide_ll.log_likelihood.numpy() - exact).mean()
    assert wide_error < 0.1 * plain_error, (plain_error, wide_error)
    calibration = Calibration.fit(-wide_ll.log_likelihood.numpy(), np.zeros((2000, 20)))
    artifact = ModelArtifact.from_model(
        vae, spec, calibration, scoring=ScoringDefaults(proposal_scale=scale)
    )
    scored = Scorer(artifact, model_version="t", device="cpu", precision="fp32").score(table)
    np.testing.assert_allclose(
        scored.scores["log_likelihood"].to_numpy(), wide_ll.log_likelihood.numpy(), rtol=1e-9
    )


def test_replicates_far_apart_keep_their_own_scale():
    """Hand-set log-weights, 4 replicates of 2 points, the first replicate 2,000 nats above the
    others (as on the demo's most extreme records): each replicate's log-sum is exact, whatever
    the chunks the samples arrive in, so the standard error is the plain sd of the four
    log-means / 2 (with one shared scale the lower three underflowed and it stopped near 177)."""
    from vaewatch.model.estimation.estimators import block_log_sums, replicate_error

    log_w = torch.tensor([[0.0], [-1.0], [-2000.0], [-2001.0], [-2002.0], [-2000.5], [-2001.5],
                          [-2003.0]], dtype=torch.float64)  # fmt: skip
    expected = torch.tensor([np.logaddexp(a, b) for a, b in log_w.view(4, 2).tolist()])
    for chunk in (8, 3, 1):
        state = None
        for start in range(0, 8, chunk):
            state = block_log_sums(state, log_w[start : start + chunk], start, 2, 4)
        torch.testing.assert_close(state[:, 0], expected, rtol=0, atol=1e-12)
        se = replicate_error(state)
        torch.testing.assert_close(se, (expected.std(correction=1) / 2).view(1), rtol=1e-12, atol=0)
    assert se.item() > 400  # sd of (2000, 0, 0, 0) is 1000; halved: 500


def test_k_is_chosen_by_the_error_the_scored_points_make(ppca):
    """`choose_k`: with q the exact posterior every importance weight is p(x), so K = 24 is
    exact and chosen; with q's variance 0.7 of the posterior's the shared points' error at 24
    exceeds the budget and a larger K is chosen (measured: 0.094 nats at 24, 0.101 at 48, 0.019
    at 96, chosen). Each error it reports is the mean over the
    rows of IWAE at K_REFERENCE minus IWAE at that K, as score_records computes them with the
    model's seed and points, and the chosen K is closer to the exact log p(x)."""
    from dataclasses import replace

    from vaewatch.model.artifact import ScoringDefaults
    from vaewatch.model.estimation.estimators import score_records
    from vaewatch.model.estimation.proposal import choose_k

    spec, data, exact = _validation(ppca, exact=True)
    scoring = ScoringDefaults()
    k, errors = choose_k(ppca.to_vae(), data, spec, scoring, "cpu", budget=0.025, trim=0.0)
    assert k == defaults.K_LADDER[0] and abs(errors[k]) < 1e-3, errors

    narrow = ppca.to_vae(var_scale=0.7)
    k, errors = choose_k(narrow, data, spec, scoring, "cpu", budget=0.025, trim=0.0)
    assert k > defaults.K_LADDER[0] and list(errors) == list(defaults.K_LADDER[: len(errors)])

    def scored(k_: int) -> np.ndarray:
        return score_records(
            narrow, data.x_val, data.m_val, log_std=spec.continuous_log_std, k=k_,
            seed=scoring.seed, points=scoring.points,
        ).log_likelihood.double().numpy()  # fmt: skip

    reference = scored(defaults.K_REFERENCE)
    for tried, error in errors.items():
        assert error == pytest.approx(np.mean(reference - scored(tried)), abs=1e-4)
    assert abs(errors[k]) <= 0.025 < abs(errors[defaults.K_LADDER[0]])
    assert abs(np.mean(exact - scored(k))) < abs(np.mean(exact - scored(defaults.K_LADDER[0])))
    # another seed is another draw: its errors are its own
    other = choose_k(narrow, data, spec, replace(scoring, seed=1), "cpu", 0.025, 0.0)[1]
    assert other[defaults.K_LADDER[0]] != errors[defaults.K_LADDER[0]]
