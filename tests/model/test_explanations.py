"""Explanations in the data's own units (model/estimation/conditionals.py, explanations.py):
p(x_j | x_-j) against exact answers. A decoder whose heads do not depend on z has that
distribution exactly (hand-set heads, closed-form quantiles); probabilistic PCA has Gaussian
conditionals in closed form; the heads read per feature are the ones log_prob scores with; and
on the demo's injected kinds the explanation says what a person would: an out-of-range amount is
above an interval that excludes it, an unseen merchant category names the likely ones, a column
never missing in training is unusually missing."""

import math
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from tests.model.ppca import make_ppca
from vaewatch.model.data.features import Feature, FeatureKind, FeatureSpec
from vaewatch.model.estimation.attribution import Explained
from vaewatch.model.estimation.conditionals import conditionals
from vaewatch.model.estimation.explanations import OTHER, Expectations
from vaewatch.model.network.vae import VAE, VAEConfig

UNSEEN = "submarine_dealer"
Z = NormalDist()
Z95 = Z.inv_cdf(0.95)


def _estimator(k, spec=None):
    return dict(k=k, seed=0, proposal_scale=1.0, memory_budget=1 << 26,
                log_std=None if spec is None else spec.continuous_log_std)  # fmt: skip


# ------------------------------------------------------------- the heads, read per feature
@pytest.mark.parametrize(
    "sizes, two_level_min",
    [([3, 5, 4], 0), ([700, 600, 3], 0), ([3, 300, 320, 5, 260], 100)],
    ids=["one block", "blocked", "two-level"],
)
def test_each_features_heads_are_the_ones_log_prob_scores_with(sizes, two_level_min):
    """For every feature and random z, the distribution read from its own rows of the last
    layer, evaluated at x_j, is log_prob's term for x_j; a category's probabilities sum to 1
    over its classes (flat, blocked and two-level heads alike)."""
    torch.manual_seed(0)
    config = VAEConfig(n_continuous=2, n_boolean=2, category_sizes=sizes, latent_dim=3,
                       hidden=[16], two_level_min=two_level_min, min_variance=1e-4,
                       variance_floor=[0.5, 1e-4])  # fmt: skip
    vae = VAE(config).eval()
    n = 50
    generator = torch.Generator().manual_seed(1)
    x = torch.cat(
        [
            torch.randn(n, 2, generator=generator) * 3,
            torch.randint(0, 2, (n, 2), generator=generator).float(),
            *[torch.randint(0, s, (n, 1), generator=generator).float() for s in sizes],
        ],
        dim=1,
    )
    mask = torch.ones(x.shape, dtype=torch.bool)
    z = torch.randn(4, n, 3, generator=generator)
    with torch.no_grad():
        lp = vae.decoder.log_prob(z, x, mask).stacked()
        for j in range(config.n_features):
            d = vae.decoder.distribution(z, j)
            if j < 2:
                var = d.log_var.exp()
                got = -0.5 * (math.log(2 * math.pi) + d.log_var + (x[:, j] - d.mean) ** 2 / var)
                assert (d.log_var >= math.log(config.variance_floor[j]) - 1e-6).all()
            elif j < 4:
                got = torch.nn.functional.logsigmoid(torch.where(x[:, j] > 0, d.logit, -d.logit))
            else:
                assert torch.allclose(d.log_probs.exp().sum(-1), torch.ones(4, n), atol=1e-5)
                got = d.log_probs.gather(-1, x[:, j].long().expand(4, n)[..., None])[..., 0]
            torch.testing.assert_close(got, lp[..., j], atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------- hand-set heads: exact answers
# a decoder whose last layer has zero weights: p(x_j | z) is the same for every z, so
# p(x_j | x_-j) is that distribution, whatever the encoder and the weights
MEAN, STD, ATOM_P, BOOL_P = 2.5, 1.0, 0.3, 0.95
LOGITS = [0.5, -1.0, 2.0, 0.0]
MISSING_P = 0.1


def _hand_set(atom: float = 0.0) -> VAE:
    # features: x0 continuous zero-inflated (its point mass at `atom`, standardised), x1
    # continuous plain, b boolean, c categorical of 4 classes; x1's observation modelled
    config = VAEConfig(n_continuous=2, n_boolean=1, category_sizes=[4], latent_dim=2,
                       hidden=[8], atom_features=[0], atom_values=[atom], missing_features=[1],
                       missing_log_prob=[-3.0, 0.0, -3.0, -3.0], min_variance=1e-6)  # fmt: skip
    vae = VAE(config).eval()
    head = vae.decoder.net[-1]
    bias = [MEAN + atom, -1.0, 2 * math.log(STD), 0.0, math.log(BOOL_P / (1 - BOOL_P)), *LOGITS,
            math.log(ATOM_P / (1 - ATOM_P)), math.log(MISSING_P / (1 - MISSING_P))]  # fmt: skip
    assert head.out_features == len(bias)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor(bias))
    return vae


def _atom_quantile(level: float) -> float:
    """The level-quantile of pi delta_0 + (1 - pi) N(MEAN, STD^2), by hand: below the atom the
    Gaussian alone; the atom's jump covers [F(0-), F(0-) + pi]; above it pi + the Gaussian."""
    below = (1 - ATOM_P) * Z.cdf((0.0 - MEAN) / STD)
    if level <= below:
        return MEAN + STD * Z.inv_cdf(level / (1 - ATOM_P))
    if level <= below + ATOM_P:
        return 0.0
    return MEAN + STD * Z.inv_cdf((level - ATOM_P) / (1 - ATOM_P))


def test_hand_set_heads_give_their_own_distributions_exactly():
    vae = _hand_set()
    x = torch.tensor([[1.0, 0.0, 1.0, 2.0], [0.0, 0.5, 0.0, 1.0], [5.0, 0.0, 1.0, 3.0]])
    mask = torch.ones(x.shape, dtype=torch.bool)
    mask[1, 1] = False  # x1 missing in row 1
    rows = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 1])
    feature = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 1])
    found = conditionals(vae, x[rows], mask[rows], feature, **_estimator(16))

    expected = [_atom_quantile(level) for level in (0.05, 0.5, 0.95)]
    assert expected[0] == 0.0  # the atom's jump covers the 5 % level
    # to the float32 heads' precision (the biases are float32 parameters)
    np.testing.assert_allclose(found.quantiles[:3], [expected] * 3, rtol=0, atol=1e-6)
    # P(X <= observed): at 1.0 and 5.0 the atom counts in full, at the atom itself too
    cdf = [ATOM_P + (1 - ATOM_P) * Z.cdf((v - MEAN) / STD) for v in (1.0, 0.0, 5.0)]
    np.testing.assert_allclose(found.cdf[:3], cdf, rtol=0, atol=1e-7)
    # the boolean: p(true) = 0.95; row 0 holds true, row 1 false
    np.testing.assert_allclose(found.p_observed[3:5], [BOOL_P, 1 - BOOL_P], atol=1e-7)
    assert found.usual[3] and not found.usual[4]  # p(false) = 0.05 is outside the 90 % set
    assert found.likely[3, :2].tolist() == [1, 0]
    # the category: softmax of the logits (0.158, 0.035, 0.710, 0.096); rows hold classes 3,
    # 2 and 1
    probs = np.exp(LOGITS) / np.exp(LOGITS).sum()
    np.testing.assert_allclose(found.p_observed[5:8], probs[[3, 2, 1]], atol=1e-7)
    assert found.likely[5].tolist() == list(np.argsort(-probs)[:3])
    np.testing.assert_allclose(found.likely_p[5], np.sort(probs)[::-1][:3], atol=1e-7)
    # class 2 is the likeliest; class 3 has 0.87 of the mass above it (inside the 90 % set);
    # class 1 has 0.96 (outside)
    assert found.usual[5:8].tolist() == [True, True, False]
    # a missing value of the modelled x1: p(missing) and nothing observed; never-missing
    # features charge the constant exp(-3)
    assert found.p_missing[8] == pytest.approx(MISSING_P, abs=1e-7)
    assert math.isnan(found.cdf[8])
    np.testing.assert_allclose(found.p_missing[:3], math.exp(-3.0), rtol=1e-6)


def test_a_value_on_the_point_mass_is_the_columns_zero_and_within():
    """A zero-inflated column's point mass is its exact 0 in the data's units (its standardised
    value is a float32, so the mean + std x atom the units give back is off by ~1e-7): an
    observed 0 that the model expects is `within`, not `below` an interval starting at 1e-7."""
    spec = FeatureSpec([
        Feature("x0", FeatureKind.CONTINUOUS, mean=3.3, std=1.7, zero_atom=True),
        Feature("x1", FeatureKind.CONTINUOUS),
        Feature("b", FeatureKind.BOOLEAN),
        Feature("c", FeatureKind.CATEGORICAL, vocabulary=["p", "q", "r"]),
    ])  # fmt: skip
    atom = spec.features[0].atom
    assert 3.3 + 1.7 * atom != 0.0  # the rounding this guards against
    vae = _hand_set(atom)
    x = torch.tensor([[atom, 0.0, 1.0, 2.0], [atom + 3.0, 0.0, 1.0, 2.0]])
    mask = torch.ones(x.shape, dtype=torch.bool)
    explained = Explained(np.zeros((2, 4)), 0, np.arange(2), np.zeros(2, dtype=np.int64))
    fields = Expectations(vae, spec, x, mask, explained, _estimator(16)).fields(
        np.arange(2), np.zeros(2, dtype=np.int64)
    )
    assert fields["low"].to_pylist()[0] == 0.0  # the 5 % level falls on the point mass
    assert fields["direction"].to_pylist() == ["within", "within"]
    # the median above the mass, in the column's units: 3.3 + 1.7 (atom + the Gaussian's)
    median = 3.3 + 1.7 * (atom + _atom_quantile(0.5))
    assert fields["expected"].to_pylist()[0] == pytest.approx(median, abs=1e-5)


# ------------------------------------------------------------- closed form: pPCA
@pytest.fixture(scope="module")
def ppca():
    return make_ppca(n_features=12, latent_dim=3, seed=0)


def _exact_conditional(ppca, x_std: np.ndarray, j: int, hidden: tuple[int, ...] = ()):
    """Mean and sd of x_j given the other observed features (not j, not `hidden`), in the data's
    units: a Gaussian conditional of N(b, W W^T + psi)."""
    rest = [i for i in range(ppca.n_features) if i != j and i not in hidden]
    c = ppca.covariance
    gain = np.linalg.solve(c[np.ix_(rest, rest)], c[rest, j])
    mean = ppca.b[j] + (x_std[:, rest] - ppca.b[rest]) @ gain
    sd = math.sqrt(c[j, j] - c[j, rest] @ gain)
    return ppca.mean[j] + ppca.std[j] * mean, ppca.std[j] * sd


def test_the_interval_is_the_closed_form_conditional(ppca):
    """On pPCA, x_j | x_-j is Gaussian: the median is its mean and the 5-95 % range mean +-
    1.645 sd. The proposal is the encoder with x_j hidden, not that conditional's posterior, so
    the estimate converges with K rather than being exact; the chained features are read given
    x_-{first, j}, also in closed form. The encoder reads a hidden value at its mean, as a
    trained one learns to, and the proposal is widened 1.5x (one of the scales training picks
    from): hiding a precise feature widens p(z | x_-j) past what the full posterior's width can
    importance-sample with finite variance."""
    spec = ppca.spec()
    table = ppca.sample_table(60, np.random.default_rng(3))
    enc = spec.encode(table)
    vae = ppca.to_vae(hidden_at_mean=True)
    x_std = enc.x.numpy().astype(np.float64)
    rows = np.repeat(np.arange(60), 3)
    lead = np.arange(60) % ppca.n_features
    features = np.stack([lead, (lead + 1) % 12, (lead + 5) % 12], 1).reshape(-1)
    explained = Explained(np.zeros((60, 12)), 0, np.arange(60), lead)
    estimator = dict(_estimator(4096, spec), proposal_scale=1.5)
    fields = Expectations(vae, spec, enc.x, enc.mask, explained, estimator).fields(rows, features)
    got = {
        name: fields[name].to_numpy(zero_copy_only=False) for name in ("expected", "low", "high")
    }
    errors = []
    for e, (r, j) in enumerate(zip(rows, features, strict=True)):
        hidden = () if j == lead[r] else (int(lead[r]),)
        mean, sd = _exact_conditional(ppca, x_std[r : r + 1], int(j), hidden)
        want = np.array([mean[0] - Z95 * sd, mean[0], mean[0] + Z95 * sd])
        errors.append((np.array([got["low"][e], got["expected"][e], got["high"][e]]) - want) / sd)
    errors = np.abs(np.array(errors))
    # measured: mean 0.003 sd, max 0.12 sd over the 540 ends and medians
    assert errors.mean() < 0.01 and errors.max() < 0.2, (errors.mean(), errors.max())
    observed = fields["observed"].to_pylist()
    values = np.array([float(v) for v in observed])
    decoded = spec.features[0].mean + spec.features[0].std * x_std[rows[features == 0], 0]
    np.testing.assert_allclose(values[features == 0], decoded, rtol=1e-6)


def test_a_value_pushed_out_says_which_way_and_the_interval_excludes_it(ppca):
    spec = ppca.spec()
    table = ppca.sample_table(24, np.random.default_rng(4))
    j = np.arange(24) % 12
    sign = np.where(np.arange(24) < 12, 1.0, -1.0)
    columns = {name: table.column(name).to_numpy().copy() for name in table.column_names}
    for r in range(24):
        columns[f"x{j[r]}"][r] += sign[r] * 30.0 * ppca.std[j[r]]
    source = pa.table(columns)
    enc = spec.encode(source)
    explained = Explained(np.zeros((24, 12)), 0, np.arange(24), j)
    fields = Expectations(
        ppca.to_vae(), spec, enc.x, enc.mask, explained, _estimator(256, spec),
        (source, np.arange(24)),
    ).fields(np.arange(24), j)  # fmt: skip
    direction = fields["direction"].to_pylist()
    assert direction == ["above"] * 12 + ["below"] * 12
    observed = np.array([float(v) for v in fields["observed"].to_pylist()])
    # as the input held it, to the last digit
    assert observed.tolist() == [columns[f"x{j[r]}"][r] for r in range(24)]
    low, high = fields["low"].to_numpy(), fields["high"].to_numpy()
    assert (observed[:12] > high[:12]).all() and (observed[12:] < low[12:]).all()
    assert (fields["probability"].to_numpy() < 1e-6).all()
    assert fields["likely"].null_count == 24


# ------------------------------------------------------------- the demo's kinds, through Scorer
@pytest.fixture(scope="module")
def explained(fitted):
    """Injected records of each kind and a few normal ones, scored with the threshold at the
    median so all are flagged and within the budget (64 records a batch)."""
    from vaewatch.model.scoring import Scorer, ScoringOverrides

    artifact, table = fitted
    picked = []
    for kind in ("out_of_range", "rare_category"):
        picked.append(table.filter(pc.equal(table["anomaly_kind"], kind)).slice(0, 10))
    # the last 5 rare ones with a category no training row held
    rare = picked[1]
    names = rare["merchant_category"].cast(pa.string()).to_pylist()
    names[5:] = [UNSEEN] * 5
    where = rare.schema.get_field_index("merchant_category")
    column = pa.array(names, pa.string()).dictionary_encode()
    picked[1] = rare.set_column(where, "merchant_category", column)
    normal = table.filter(pc.equal(table["anomaly_kind"], "")).slice(0, 10)
    # a column never missing in training, missing now
    amount = normal.schema.get_field_index("amount")
    picked.append(normal.set_column(amount, "amount", pa.nulls(10, normal["amount"].type)))
    batch = pa.concat_tables(picked)
    scorer = Scorer(artifact, model_version="t", device="cpu",
                    overrides=ScoringOverrides(threshold_quantile=0.5))  # fmt: skip
    return artifact, batch, scorer.score(batch).aligned()


def test_an_out_of_range_amount_is_above_an_interval_that_excludes_it(explained):
    _, batch, scored = explained
    for r in range(10):
        first = scored["top_features"][r].as_py()[0]
        assert scored["is_anomaly"][r].as_py() and first["basis"] == "conditional"
        assert first["feature"] == "amount" and first["direction"] == "above"
        assert first["observed"] == str(batch["amount"][r].as_py())
        assert first["low"] < first["expected"] < first["high"] < float(first["observed"])
        assert first["likely"] is None


def test_an_unseen_category_names_the_likely_ones(explained):
    artifact, batch, scored = explained
    (category,) = [f for f in artifact.spec.features if f.name == "merchant_category"]
    assert UNSEEN not in category.vocabulary
    for r in range(10, 20):
        entries = {e["feature"]: e for e in scored["top_features"][r].as_py()}
        entry = entries["merchant_category"]
        assert entry["direction"] == "unusual_category"
        # as the input held it: the rare training categories, then the unseen one by name
        assert entry["observed"] == (UNSEEN if r >= 15 else batch["merchant_category"][r].as_py())
        assert len(entry["likely"]) == 3 and entry["observed"] not in entry["likely"]
        assert set(entry["likely"]) <= set(category.vocabulary) and OTHER not in entry["likely"]
        assert entry["probability"] < 0.05 and entry["expected"] is None


def test_a_column_never_missing_in_training_is_unusually_missing(explained):
    """Its probability is exactly the rule of succession's charge, 0.5 / (training rows + 1),
    and the entry still says what value was expected."""
    artifact, _, scored = explained
    for r in range(20, 30):
        entries = {e["feature"]: e for e in scored["top_features"][r].as_py()}
        entry = entries["amount"]
        assert entry["direction"] == "unusually_missing" and entry["observed"] is None
        assert entry["probability"] == pytest.approx(0.5 / (artifact.spec.rows + 1), rel=1e-6)
        assert entry["low"] < entry["expected"] < entry["high"]


def test_the_kept_weights_give_what_a_pass_of_their_own_gives(ppca):
    """The explanations read p(x_j | x_-j) from the points and weights the leave-one-out passes
    kept for the same pairs; a pass of their own over those pairs (what an Explained without
    them takes) draws the same points and weighs them alike."""
    from vaewatch.model.estimation.attribution import explain_flagged

    spec = ppca.spec()
    table = ppca.sample_table(40, np.random.default_rng(5))
    columns = {name: table.column(name).to_numpy().copy() for name in table.column_names}
    for r in range(40):
        columns[f"x{r % 12}"][r] += 20.0 * ppca.std[r % 12]
    enc = spec.encode(pa.table(columns))
    vae = ppca.to_vae(hidden_at_mean=True)
    estimator = dict(_estimator(64, spec), proposal_scale=1.5)
    excess = np.zeros((40, 12))
    flagged = np.ones(40, dtype=bool)
    kept = explain_flagged(vae, enc.x, enc.mask, excess, flagged, np.zeros(12), -np.arange(40.0),
                           **estimator)  # fmt: skip
    assert kept.first is not None and kept.chained is not None
    own = Explained(kept.excess, kept.unexplained, kept.rows, kept.lead)
    from vaewatch.model.estimation.attribution import top_indices

    top, _, keep = top_indices(kept.excess, np.zeros(12), 3)
    rows, features = np.repeat(np.arange(40), keep.sum(1)), top[keep]
    assert len(features) > 80  # the first feature and those after it, for most records
    a = Expectations(vae, spec, enc.x, enc.mask, kept, estimator).fields(rows, features)
    b = Expectations(vae, spec, enc.x, enc.mask, own, estimator).fields(rows, features)
    for name in ("expected", "low", "high", "probability"):
        # the same points and weights, in float32 chunks of other shapes: measured 2.6e-6
        np.testing.assert_allclose(a[name].to_numpy(), b[name].to_numpy(), rtol=1e-5, atol=1e-9,
                                   err_msg=name)  # fmt: skip
    assert a["direction"].to_pylist() == b["direction"].to_pylist()
