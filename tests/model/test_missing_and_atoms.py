"""The observation model and zero-inflated columns, against closed forms from hand-set weights.

With every weight zero the encoder outputs q(z|x) = N(0, I) = p(z), so every importance weight is
exactly p(x|z), and with a decoder that ignores z (zero weights, chosen biases) p(x|z) is the
same for every z: IWAE_K = ELBO = log p(x) exactly, at any K. The expected values below are
written out with scipy from the biases, not from vaewatch's code.
"""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy.special import expit
from scipy.stats import norm

from vaewatch.model.artifact import UPGRADES
from vaewatch.model.calibration.scores import Calibration
from vaewatch.model.data.features import Feature, FeatureKind, FeatureSpec
from vaewatch.model.estimation.estimators import score_records
from vaewatch.model.network.vae import VAE, VAEConfig

ROWS = 999  # training rows the spec claims: a never-missing column costs log(0.5 / 1000)
AMOUNT_MEAN, AMOUNT_STD = 40.0, 25.0
MU, LOG_VAR = 0.3, math.log(0.5)  # the decoder's Gaussian for `amount`, standardised units
ATOM_LOGIT, MISSING_LOGIT, SPEED_MU = -1.2, -2.5, -0.4


def _spec() -> FeatureSpec:
    return FeatureSpec(
        [
            # zero-inflated and sometimes missing
            Feature("amount", FeatureKind.CONTINUOUS, mean=AMOUNT_MEAN, std=AMOUNT_STD,
                    zero_atom=True, missing_share=0.05),
            # never missing in training
            Feature("speed", FeatureKind.CONTINUOUS, mean=0.0, std=1.0),
        ],
        rows=ROWS,
    )  # fmt: skip


def _model(spec: FeatureSpec, missingness: str = "model") -> VAE:
    config = VAEConfig.for_spec(spec, missingness=missingness, latent_dim=2, hidden=[4])
    model = VAE(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        bias = model.decoder.net[-1].bias
        # layout: means (2), raw log-variances (2), atom logits (1), missingness logits (1)
        bias[0], bias[1] = MU, SPEED_MU
        bias[2], bias[3] = LOG_VAR, 0.0
        if config.atom_features:
            bias[4] = ATOM_LOGIT
        if config.missing_features:
            bias[5] = MISSING_LOGIT
    return model.eval()


def _score(model: VAE, spec: FeatureSpec, amount: list, speed: list):
    enc = spec.encode(pa.table({"amount": pa.array(amount, pa.float64()), "speed": speed}))
    s = score_records(model, enc.x, enc.mask, log_std=spec.continuous_log_std, k=8, seed=3)
    return s, enc


def _log_sigmoid(v: float) -> float:
    return float(np.log(expit(v)))


def _speed(speed: float) -> float:
    return norm.logpdf(speed, SPEED_MU, 1.0)


def test_config_follows_the_spec():
    config = VAEConfig.for_spec(_spec())
    assert config.atom_features == [0]
    assert config.atom_values == [pytest.approx((0.0 - AMOUNT_MEAN) / AMOUNT_STD, rel=1e-6)]
    assert config.missing_features == [0]  # `speed` was never missing: no Bernoulli for it
    assert config.missing_log_prob == [0.0, pytest.approx(math.log(0.5 / 1000))]
    marginal = VAEConfig.for_spec(_spec(), missingness="marginal")
    assert marginal.missing_features == [] and marginal.missing_log_prob == [0.0, 0.0]
    with pytest.raises(ValueError, match="missingness"):
        VAEConfig.for_spec(_spec(), missingness="impute")


def test_point_mass_density_and_missingness_are_exact():
    spec = _spec()
    s, _ = _score(_model(spec), spec, [0.0, 55.0, None, 55.0], [0.1, 0.1, 0.1, None])
    observed = _log_sigmoid(-MISSING_LOGIT)  # log p(amount observed)
    sd = math.exp(0.5 * LOG_VAR)
    dense = norm.logpdf((55.0 - AMOUNT_MEAN) / AMOUNT_STD, MU, sd) - math.log(AMOUNT_STD)
    expected = [
        # an exact 0: the point mass, a probability (no Jacobian)
        _log_sigmoid(ATOM_LOGIT) + observed + _speed(0.1),
        # elsewhere: (1 - pi) times the Gaussian density in the column's own units
        _log_sigmoid(-ATOM_LOGIT) + dense + observed + _speed(0.1),
        # amount missing: log p(missing), nothing for its value
        _log_sigmoid(MISSING_LOGIT) + _speed(0.1),
        # speed missing although it never was in 999 rows: the rule of succession's 0.5 / 1000
        _log_sigmoid(-ATOM_LOGIT) + dense + observed + math.log(0.5 / 1000),
    ]
    np.testing.assert_allclose(s.log_likelihood.numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(s.elbo.numpy(), expected, rtol=0, atol=1e-5)
    # attribution: each feature's own term, the missingness terms included
    np.testing.assert_allclose(
        s.feature_nll.numpy()[:, 0],
        [
            -(_log_sigmoid(ATOM_LOGIT) + observed),
            -(_log_sigmoid(-ATOM_LOGIT) + dense + observed),
            -_log_sigmoid(MISSING_LOGIT),
            -(_log_sigmoid(-ATOM_LOGIT) + dense + observed),
        ],
        atol=1e-5,
    )


def test_marginal_missingness_is_the_density_of_what_was_observed():
    spec = _spec()
    s, _ = _score(_model(spec, "marginal"), spec, [None, 55.0], [0.1, None])
    sd = math.exp(0.5 * LOG_VAR)
    dense = norm.logpdf((55.0 - AMOUNT_MEAN) / AMOUNT_STD, MU, sd) - math.log(AMOUNT_STD)
    expected = [_speed(0.1), _log_sigmoid(-ATOM_LOGIT) + dense]
    np.testing.assert_allclose(s.log_likelihood.numpy(), expected, atol=1e-5)


def test_anomaly_score_completes_a_missing_value_with_its_typical_cost():
    """A row missing a column is charged that column's calibration median on top of the surprise
    of the gap, so it does not outrank a complete row just by having fewer terms."""
    spec = _spec()
    model = _model(spec)
    rng = np.random.default_rng(0)
    amount = np.round(rng.normal(AMOUNT_MEAN, AMOUNT_STD, 400), 1)
    s, enc = _score(model, spec, amount.tolist(), rng.normal(0.0, 1.0, 400).tolist())
    missing = ~enc.mask.numpy()
    calibration = Calibration.fit(-s.log_likelihood.numpy(), s.feature_nll.numpy(), missing=missing)
    assert calibration.completes_missing
    median = np.median(s.feature_nll.numpy(), axis=0)
    gap, _ = _score(model, spec, [None], [0.1])
    full, _ = _score(model, spec, [55.0], [0.1])
    ll = gap.log_likelihood.numpy()
    np.testing.assert_allclose(calibration.complete(ll, [[True, False]]), -ll + median[0])
    # the same row observed at a typical value, and missing: now on one scale
    score_gap = calibration.complete(ll, [[True, False]])[0]
    score_full = calibration.complete(full.log_likelihood.numpy(), [[False, False]])[0]
    assert score_gap > -ll[0] and abs(score_gap - score_full) < 3.5
    # models calibrated without it keep -log_likelihood
    old = Calibration.fit(-s.log_likelihood.numpy(), s.feature_nll.numpy())
    np.testing.assert_array_equal(old.complete(ll, [[True, False]]), -ll)


def test_spec_finds_zero_inflated_columns_missing_shares_and_frequent_categories():
    n = 10_000
    rng = np.random.default_rng(1)
    debt = np.where(rng.random(n) < 0.3, 0.0, rng.gamma(2.0, 100.0, n))
    income = rng.normal(50.0, 10.0, n)
    income[:500] = np.nan
    zeros_rare = np.where(np.arange(n) < 500, 0.0, rng.normal(5.0, 1.0, n))  # 5 %: no atom
    # whole numbers, 30 % zeros: the quantisation floor already keeps the Gaussian off a spike
    counts = np.where(rng.random(n) < 0.3, 0, rng.poisson(4.0, n) + 1)
    merchant = np.array(["grocery"] * 9_980 + ["casino"] * 11 + ["pawn"] * 9, dtype=object)
    table = pa.table(
        {
            "debt": debt,
            "income": income,
            "zeros_rare": zeros_rare,
            "counts": counts,
            "merchant": merchant,
        }
    )
    spec = FeatureSpec.fit(table, min_category_share=0.001)
    by = {f.name: f for f in spec.features}
    assert by["debt"].zero_atom and not by["income"].zero_atom and not by["zeros_rare"].zero_atom
    assert by["counts"].resolution == 1.0 and not by["counts"].zero_atom
    assert by["income"].missing_share == pytest.approx(0.05)
    assert by["debt"].missing_share == 0.0
    assert spec.rows == n
    # 0.1 % of 10,000 rows = 10: `casino` (11) keeps its entry, `pawn` (9) shares the OOV one
    assert by["merchant"].vocabulary == ["grocery", "casino"]
    assert FeatureSpec.fit(table).features[-1].vocabulary == [
        "grocery",
        "casino",
        "pawn",
    ]
    assert FeatureSpec.loads(spec.dumps()) == spec


def test_models_saved_before_these_fields_load_and_score_as_before():
    """A config.json written before point masses and the observation model existed has none of
    their keys: it loads with neither, so its scores keep their meaning."""
    spec = _spec()
    new = VAEConfig.for_spec(spec, latent_dim=2, hidden=[4]).to_json()
    old = {
        k: v
        for k, v in new.items()
        if k not in ("atom_features", "atom_values", "missing_features", "missing_log_prob")
    }
    config = VAEConfig.from_json(old)
    assert config.atom_features == config.missing_features == config.missing_log_prob == []
    assert config.decoder_output_dim == 4  # means and log-variances of the two columns only
    model = VAE(config)
    assert model.decoder.missing_log_prob.tolist() == [0.0, 0.0]
    spec_json = spec.to_json() | {"format_version": 1}
    for feature in spec_json["features"]:
        feature.pop("zero_atom", None), feature.pop("missing_share", None)
    spec_json.pop("rows")
    format_1 = {"vae": old, "features": spec_json, "calibration": {}, "scoring": {}}
    upgraded = UPGRADES[1](format_1)
    old_spec = FeatureSpec.from_json(upgraded["features"])
    assert old_spec.rows == 0 and not any(f.zero_atom for f in old_spec.features)
    assert VAEConfig.from_json(upgraded["vae"]) == config


def test_boolean_likelihood_is_the_bernoulli_of_its_logit():
    """A boolean decoded with logit l (zero weights, bias l): log p(true) = log expit(l),
    log p(false) = log expit(-l), checked against scipy for both signs of l."""
    for logit in (1.3, -2.1):
        config = VAEConfig(n_boolean=1, latent_dim=2, hidden=[4])
        model = VAE(config)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
            model.decoder.net[-1].bias[0] = logit
        x = torch.tensor([[1.0], [0.0]])
        lp = model.decoder.log_prob(torch.zeros(3, 2, 2), x, torch.ones_like(x, dtype=torch.bool))
        expected = torch.tensor([_log_sigmoid(logit), _log_sigmoid(-logit)])
        torch.testing.assert_close(lp.boolean[..., 0], expected.expand(3, 2), rtol=0, atol=1e-6)
