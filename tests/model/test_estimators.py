"""Estimator properties with exact answers: units, normalisation, attribution, batching, memory."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.estimation.estimators import (
    IWAE_STREAM,
    bytes_per_pair,
    iwae,
    plan_chunks,
    score_records,
)
from vaewatch.model.estimation.noise import DESIGNS, SIMPLICES, noise, replicates
from vaewatch.model.network.vae import VAE, VAEConfig
from vaewatch.model.synthetic import LABEL_COLUMNS as LABELS


def _model(spec: FeatureSpec, seed: int = 0, **overrides) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig.for_spec(spec, **overrides)).eval()


def _dense(spec: FeatureSpec, table: pa.Table) -> torch.Tensor:
    """(B, F_cont) float64, from the raw values: 1 where a continuous value is scored by a
    density (observed, and not an exact 0 of a zero-inflated column), 0 elsewhere."""
    columns = []
    for f in spec.features[: len(spec.continuous_log_std)]:
        raw = table.column(f.name).to_numpy(zero_copy_only=False).astype(float)
        columns.append(np.isfinite(raw) & ~(f.zero_atom & (raw == 0.0)))
    return torch.from_numpy(np.stack(columns, axis=1).astype(np.float64))


def _scores(model, spec, table, **kwargs):
    enc = spec.encode(table)
    return score_records(model, enc.x, enc.mask, log_std=spec.continuous_log_std, **kwargs)


def test_rescaling_a_feature_shifts_log_likelihood_by_minus_log_c(transactions_table):
    table = transactions_table.slice(0, 2000)
    spec = FeatureSpec.fit(table, exclude=LABELS)
    model = _model(spec)
    base = _scores(model, spec, table, k=32)
    for name, c in (("amount", 1000.0), ("travel_min", 1 / 60.0)):
        index = table.schema.get_field_index(name)
        scaled = table.set_column(index, name, pa.compute.multiply(table.column(name), c))
        rescaled_spec = FeatureSpec.fit(scaled, exclude=LABELS)
        moved = _scores(model, rescaled_spec, scaled, k=32)
        values = table.column(name).to_numpy(zero_copy_only=False).astype(float)
        # a density: observed and not an exact 0 (travel_min is 0 for every online purchase,
        # so it is zero-inflated: a 0 is a point mass, a probability, and does not scale)
        dense = np.isfinite(values) & (values != 0.0)
        assert dense.sum() > 1000
        shift = (moved.log_likelihood - base.log_likelihood).numpy()
        np.testing.assert_allclose(shift[dense], -math.log(c), atol=2e-4)
        np.testing.assert_allclose(shift[~dense], 0.0, atol=2e-4)
        np.testing.assert_allclose((moved.elbo - base.elbo).numpy()[dense], -math.log(c), atol=2e-4)


def test_decoder_likelihoods_are_normalised():
    torch.manual_seed(0)
    config = VAEConfig(
        n_continuous=1, n_boolean=1, category_sizes=[4, 7], latent_dim=3, hidden=[16]
    )
    decoder = VAE(config).decoder
    z = torch.randn(5, 3, dtype=torch.float64)  # 5 latent points; check each separately
    decoder = decoder.double()
    grid = torch.linspace(-40, 40, 400_001, dtype=torch.float64)
    totals = {"cont": [], "bool": [], "cat0": [], "cat1": []}
    for point in z:
        zs = point.expand(len(grid), 3)
        x = torch.zeros(len(grid), 4, dtype=torch.float64)
        x[:, 0] = grid
        mask = torch.ones_like(x, dtype=torch.bool)
        density = decoder.log_prob(zs, x, mask).continuous[:, 0].exp()
        totals["cont"].append(torch.trapezoid(density, grid).item())
        for name, column, values in (
            ("bool", 1, [0, 1]),
            ("cat0", 2, range(4)),
            ("cat1", 3, range(7)),
        ):
            xs = torch.zeros(len(values), 4, dtype=torch.float64)
            xs[:, column] = torch.tensor(list(values), dtype=torch.float64)
            lp = decoder.log_prob(
                point.expand(len(values), 3), xs, torch.ones_like(xs, dtype=torch.bool)
            )
            per_kind = {
                "bool": lp.boolean[:, 0],
                "cat0": lp.categorical[:, 0],
                "cat1": lp.categorical[:, 1],
            }
            totals[name].append(per_kind[name].exp().sum().item())
    for name, values in totals.items():
        np.testing.assert_allclose(values, 1.0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("sizes", [[], [4], [4, 7, 1001]])
def test_encoder_looks_up_categories_instead_of_one_hot(sizes):
    """The encoder's first layer on (values, codes, mask) equals the same Linear applied to the
    explicit one-hot input, missing categories included, so no model changes meaning."""
    torch.manual_seed(0)
    config = VAEConfig(n_continuous=3, n_boolean=2, category_sizes=sizes, latent_dim=3, hidden=[16])
    encoder = VAE(config).encoder
    n = 64
    codes = [torch.randint(0, size, (n, 1)).float() for size in sizes]
    x = torch.cat([torch.randn(n, 3), torch.randint(0, 2, (n, 2)).float(), *codes], dim=1)
    mask = torch.rand(n, config.n_features) > 0.25
    x = torch.where(mask, x, torch.zeros(()))  # what encode() gives a missing value
    one_hot = encoder.inputs(x, mask)
    assert one_hot.shape[1] == config.encoder_input_dim
    # built independently: values, each category one-hot, the mask; missing entries zero
    observed = mask.float()
    parts = [x[:, :5] * observed[:, :5]]
    for j, size in enumerate(sizes):
        parts.append(
            torch.nn.functional.one_hot(x[:, 5 + j].long(), size) * observed[:, 5 + j, None]
        )
    torch.testing.assert_close(one_hot, torch.cat([*parts, observed], 1), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.first_layer(x, mask), encoder.net[0](one_hot), rtol=1e-5, atol=1e-6
        )
        posterior = encoder(x, mask)
        expected = encoder.net(one_hot)
    torch.testing.assert_close(
        torch.cat([posterior.mean, posterior.log_var], 1),
        torch.cat([expected[:, :3], expected[:, 3:].clamp(-12, 6)], 1),
        rtol=1e-5,
        atol=1e-6,
    )


def test_discrete_model_probabilities_sum_to_one():
    """A model of one categorical and one boolean feature: sum_x exp(IWAE_K(x)) -> 1."""
    table = pa.table({"c": ["a", "b", "c", "d", "e"] * 4, "flag": [True, False] * 10})
    spec = FeatureSpec.fit(table)
    model = _model(spec, hidden=[16], latent_dim=2)
    every = pa.table(
        {
            "c": [
                c for c, _ in itertools.product(["a", "b", "c", "d", "e", "unseen"], [True, False])
            ],
            "flag": [f for _, f in itertools.product(range(6), [True, False])],
        }
    )
    enc = spec.encode(every)
    assert enc.x[:, 1].max().item() == 5  # 'unseen' sits in the OOV bucket, index 5
    with torch.inference_mode():
        ll = iwae(model, enc.x, enc.mask, k=20_000).log_likelihood
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=5e-3)


def test_feature_contributions_match_direct_computation(transactions_table):
    table = transactions_table.slice(0, 300)
    spec = FeatureSpec.fit(table, exclude=LABELS)
    model = _model(spec)
    enc = spec.encode(table)
    k = 50
    log_std = spec.continuous_log_std
    with torch.inference_mode():
        chunked = iwae(
            model, enc.x, enc.mask, k=k, log_std=log_std, contributions=True, memory_budget=20_000
        )
        whole = iwae(
            model, enc.x, enc.mask, k=k, log_std=log_std, contributions=True, memory_budget=2**34
        )
        # by hand
        post = model.encoder(enc.x, enc.mask)
        eps = noise(k, model.config.latent_dim, 0, 1).float()
        z = post.mean + post.std * eps[:, None, :]
        lp = model.decoder.log_prob(z, enc.x, enc.mask).stacked().double()  # (K, B, F)
        d = model.config.latent_dim
        log_prior = -0.5 * (d * math.log(2 * math.pi) + (z * z).sum(-1))
        log_q = -0.5 * (
            d * math.log(2 * math.pi) + post.log_var.sum(-1) + (eps * eps).sum(-1)[:, None]
        )
        log_w = lp.sum(-1) + (log_prior - log_q).double()
        weights = torch.softmax(log_w, dim=0)
        n_cont = len(log_std)
        dense = _dense(spec, table)
        assert 0 < dense.sum() < enc.mask[:, :n_cont].sum()  # zero-inflated columns are there
        jac = dense @ log_std
        expected_ll = torch.logsumexp(log_w, 0) - math.log(k) - jac
        expected_nll = -(weights[..., None] * lp).sum(0)
        expected_nll[:, :n_cont] += dense * log_std
    assert plan_chunks(300, k, bytes_per_pair(model), 20_000)[0] < 300  # really chunked
    for result in (chunked, whole):
        np.testing.assert_allclose(result.log_likelihood.numpy(), expected_ll.numpy(), atol=1e-4)
        np.testing.assert_allclose(result.feature_nll.numpy(), expected_nll.numpy(), atol=1e-4)
    # a missing value contributes the surprise of its absence, -log p(missing | z) > 0 ...
    assert (~enc.mask).sum() > 10 and (whole.feature_nll[~enc.mask] > 0).all()
    # ... and exactly nothing when missing values are marginalised
    marginal = _model(spec, missingness="marginal")
    with torch.inference_mode():
        nll = iwae(marginal, enc.x, enc.mask, k=k, log_std=log_std, contributions=True).feature_nll
    assert (nll[~enc.mask] == 0).all()


def test_scores_do_not_depend_on_batching(transactions_table):
    table = pa.concat_tables([transactions_table, transactions_table]).slice(0, 10_000)
    spec = FeatureSpec.fit(table, exclude=LABELS)
    model = _model(spec)
    whole = _scores(model, spec, table, k=16, seed=7)
    parts = [_scores(model, spec, table.slice(i, 7), k=16, seed=7) for i in range(0, 10_000, 7)]
    fields = ("elbo", "log_likelihood", "log_likelihood_se", "latent_mean", "latent_std")
    for field in (*fields, "feature_nll"):
        joined = torch.cat([getattr(p, field) for p in parts])
        np.testing.assert_allclose(
            joined.numpy(), getattr(whole, field).numpy(), rtol=1e-5, atol=1e-4, err_msg=field
        )
    other_seed = _scores(model, spec, table.slice(0, 100), k=16, seed=8)
    assert not torch.allclose(other_seed.log_likelihood, whole.log_likelihood[:100])


def test_iwae_is_differentiable_for_training(transactions_table):
    spec = FeatureSpec.fit(transactions_table.slice(0, 256), exclude=LABELS)
    model = _model(spec).train()
    enc = spec.encode(transactions_table.slice(0, 256))
    loss = -iwae(model, enc.x, enc.mask, k=5, memory_budget=50_000).log_likelihood.mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def _probe(budget: int, records: int, k: int) -> int:
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("_memory_probe.py")),
            str(budget),
            str(records),
            str(k),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta"]


@pytest.mark.slow
def test_iwae_memory_stays_within_budget():
    """K=5000 on 10,000 records (50M importance samples) under a 64 MiB budget. A second run with a
    budget big enough to hold 10x more shows the measurement sees memory use at all."""
    budget = 64 * 2**20
    peak = _probe(budget, 10_000, 5000)
    assert peak <= budget * 1.25, (
        f"peak {peak / 2**20:.1f} MiB over a {budget / 2**20:.0f} MiB budget"
    )
    unbounded = _probe(16 * budget, 10_000, 200)
    assert unbounded > 2 * budget, f"control run peaked at only {unbounded / 2**20:.1f} MiB"


def test_elbo_is_the_mean_log_weight_and_a_bound_on_every_record(transactions_table):
    """elbo = (1/K) sum_k log w_k over the same K points as the IWAE (checked by hand), hence
    elbo <= log_likelihood record by record (Jensen), for every K, seed and batching."""
    spec = FeatureSpec.fit(transactions_table, exclude=LABELS)
    model = _model(spec)
    enc = spec.encode(transactions_table.slice(0, 3000))
    log_std = spec.continuous_log_std
    d = model.config.latent_dim
    with torch.no_grad():
        exact = model.double()
        x = enc.x.double()
        eps = noise(8, d, 9, IWAE_STREAM)
        post = exact.encoder(x, enc.mask)
        z = post.mean + post.std * eps[:, None, :]
        lp = exact.decoder.log_prob(z, x, enc.mask).total()
        log_prior = -0.5 * (d * math.log(2 * math.pi) + (z * z).sum(-1))
        log_q = -0.5 * (
            d * math.log(2 * math.pi) + post.log_var.sum(-1) + (eps * eps).sum(-1)[:, None]
        )
        log_w = lp + log_prior - log_q  # (K, B)
        jac = _dense(spec, transactions_table.slice(0, 3000)) @ log_std
        scores = score_records(exact, x, enc.mask, log_std=log_std, k=8, seed=9)
        torch.testing.assert_close(scores.elbo, log_w.mean(0) - jac, rtol=1e-12, atol=1e-10)
        expected_ll = torch.logsumexp(log_w, 0) - math.log(8) - jac
        torch.testing.assert_close(scores.log_likelihood, expected_ll, rtol=1e-12, atol=1e-10)
        model = model.float()
        checked = 0
        for k, seed, batch in itertools.product((1, 3, 16, 64), (0, 1, 2), (3000, 257)):
            parts = [
                score_records(
                    model, enc.x[i : i + batch], enc.mask[i : i + batch], log_std=log_std,
                    k=k, seed=seed,
                )
                for i in range(0, 3000, batch)
            ]  # fmt: skip
            elbo = torch.cat([p.elbo for p in parts])
            ll = torch.cat([p.log_likelihood for p in parts])
            assert (elbo <= ll + 1e-10).all(), (k, seed, batch, (elbo - ll).max().item())
            checked += len(elbo)
    assert checked == 3000 * 4 * 3 * 2


def test_k1_is_the_general_reduction_of_one_weight(transactions_table):
    """iwae at K = 1 computes its reductions directly (one weight: the log-sum-exp, the
    replicate sums and the normalised attribution are identities). The general path, given the
    same point twice, has two equal weights and must give the same numbers: log-mean-exp of
    (w, w) is log w, the normalised attribution of equal weights is the point's own."""
    table = transactions_table.slice(0, 500)
    spec = FeatureSpec.fit(table, exclude=LABELS)
    model = _model(spec)
    enc = spec.encode(table)
    point = noise(1, model.config.latent_dim, seed=4, stream=IWAE_STREAM)
    kwargs = dict(log_std=spec.continuous_log_std, contributions=True, conditional=True)
    with torch.inference_mode():
        one = iwae(model, enc.x, enc.mask, eps=point, standard_error=True, **kwargs)
        two = iwae(model, enc.x, enc.mask, eps=point.repeat(2, 1), **kwargs)
    assert one.discrete_nll is not None  # the table has both kinds: the conditional is asked
    for name in ("log_likelihood", "elbo", "feature_nll", "discrete_nll"):
        torch.testing.assert_close(getattr(one, name), getattr(two, name), rtol=0, atol=1e-9)
    torch.testing.assert_close(one.elbo, one.log_likelihood, rtol=0, atol=0)
    assert torch.isnan(one.log_likelihood_se).all()  # one replicate: no spread to measure


@pytest.mark.parametrize("points", DESIGNS)
def test_the_shared_points_are_seeded_normal_replicates(points):
    a = noise(4096, 3, seed=5, stream=IWAE_STREAM, points=points)
    assert torch.equal(a, noise(4096, 3, seed=5, stream=IWAE_STREAM, points=points))  # pure
    assert not torch.equal(a, noise(4096, 3, seed=6, stream=IWAE_STREAM, points=points))
    assert replicates(64) == 4 and replicates(6) == 3 and replicates(10) == 2
    assert replicates(7) == 1 and replicates(1) == 1
    # each point is marginally N(0, 1): moments of 4,096 points, and of each replicate block
    assert abs(a.mean().item()) < 0.02 and abs(a.var().item() - 1) < 0.05
    blocks = a.reshape(4, 1024, 3)
    assert not torch.equal(blocks[0], blocks[1])  # independently drawn replicates
    assert (blocks.mean(1).abs() < 0.05).all()


@pytest.mark.parametrize("points", DESIGNS)
@pytest.mark.parametrize("k", [24, 64])  # spherical replicates at 24 (latent 4), Sobol's at 64
def test_independent_draws_are_the_design_from_their_own_seeds(points, k):
    """What the proposal scale is chosen on (model/estimation/proposal.py): draw j is exactly the
    points
    `noise` gives seed * draws + j on that stream (the same design, batched), the draws differ,
    and none is the scorer's draw (another stream)."""
    from vaewatch.model.estimation.noise import independent_draws

    draws = independent_draws(5, k, 4, seed=3, stream=9, points=points)
    assert draws.shape == (5, k, 4)
    for j in range(5):
        assert torch.equal(draws[j], noise(k, 4, seed=3 * 5 + j, stream=9, points=points))
    assert not torch.equal(draws[0], draws[1])
    scored = noise(k, 4, seed=3, stream=IWAE_STREAM, points=points)
    assert not any(torch.equal(d, scored) for d in draws)


def test_spherical_points_are_rotated_simplices_with_one_radius_per_stratum():
    """Each replicate of K/R points: groups of up to D + 1 directions that are a regular simplex
    (unit vectors summing to 0, every pair at cos = -1/(n-1)), and radii whose chi_D
    probabilities fall one in each of K/R equal strata. Checked by hand-derived properties, not
    by the construction's own helpers. Beyond SIMPLICES x (D + 1) points a replicate, the
    replicates are Sobol's."""
    d, k = 4, 36  # 4 replicates of 9 points: groups of 5 and 4
    points = noise(k, d, seed=2, stream=IWAE_STREAM, points="spherical")
    for block in points.chunk(4):
        radius = block.norm(dim=1)
        cdf = torch.special.gammainc(torch.tensor(d / 2, dtype=torch.float64), radius**2 / 2)
        assert sorted((cdf * 9).floor().long().tolist()) == list(range(9))
        unit = block / radius[:, None]
        for group in (unit[:5], unit[5:]):
            n = group.shape[0]
            torch.testing.assert_close(group.sum(0), torch.zeros(d, dtype=torch.float64))
            cos = group @ group.T
            off = cos[~torch.eye(n, dtype=torch.bool)]
            torch.testing.assert_close(off, torch.full_like(off, -1.0 / (n - 1)))
    above = 4 * (SIMPLICES * (d + 1) + 1)
    sobol = noise(above, d, seed=2, stream=IWAE_STREAM, points="sobol")
    assert torch.equal(noise(above, d, seed=2, stream=IWAE_STREAM, points="spherical"), sobol)


def test_spherical_points_are_marginally_standard_normal():
    """Pooled over 500 seeds' points, the coordinates have the N(0, 1) quantiles and are
    uncorrelated, and the squared radius the chi-squared_D mean and variance: a direction
    uniform on the sphere times an independent chi radius."""
    d = 3
    first = torch.cat([noise(8, d, s, IWAE_STREAM, "spherical") for s in range(500)])
    assert first.mean(0).abs().max() < 0.08
    torch.testing.assert_close(
        torch.cov(first.T), torch.eye(d, dtype=torch.float64), atol=0.1, rtol=0
    )
    squared = first.pow(2).sum(1)
    assert abs(squared.mean().item() - d) < 0.15 and abs(squared.var().item() - 2 * d) < 0.6
    normal = torch.distributions.Normal(0.0, 1.0)
    for q in (0.1, 0.5, 0.9):
        assert abs(torch.quantile(first[:, 0], q).item() - normal.icdf(torch.tensor(q))) < 0.08


def test_chunk_plans_fit_the_budget_and_hold_several_samples():
    """records x samples x bytes <= budget, every sample and record covered, and a step holds
    SAMPLES_PER_STEP samples (all K when fewer) whenever one record's worth fits."""
    from vaewatch.model.estimation.estimators import SAMPLES_PER_STEP

    for n_records, k, pair_bytes, budget in itertools.product(
        (1, 7, 300, 65_536), (1, 4, 32, 5000), (100, 4_496, 2**20), (20_000, 64 * 2**20)
    ):
        records, samples = plan_chunks(n_records, k, pair_bytes, budget)
        assert 1 <= records <= n_records and 1 <= samples <= k
        max_pairs = budget // pair_bytes
        if max_pairs >= 1:
            assert records * samples * pair_bytes <= budget
        if max_pairs >= min(k, SAMPLES_PER_STEP):
            assert samples >= min(k, SAMPLES_PER_STEP)
    # the production shape: a 65,536-row batch at K=32 with the 64 MiB default
    assert plan_chunks(65_536, 32, 4_496, 64 * 2**20) == (1_865, 8)


def test_pooled_standardised_difference_by_hand():
    """Runs 0 and 1 paired, 2 and 3 paired; z = (a - b) / sqrt(se_a^2 + se_b^2) per record."""
    from vaewatch.model.metrics import pooled_standardised_difference

    values = [[1.0, 2.0], [0.0, 0.0], [3.0, 3.0], [3.0, 0.0]]
    errors = [[1.0, 1.0], [1.0, 1.0], [0.6, 2.0], [0.8, 0.0]]
    # z: 1/sqrt2, 2/sqrt2, 0/1, 3/2 -> mean of squares (0.5 + 2 + 0 + 2.25) / 4
    assert pooled_standardised_difference(values, errors) == pytest.approx((4.75 / 4) ** 0.5)
