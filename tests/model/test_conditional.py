"""-log p(x_discrete | x_continuous): the flag rule's conditional term
(model/estimation/estimators.py
`iwae(conditional=True)`), against a closed form, and its place in the calibration.

The closed form: probabilistic PCA for the continuous features (z ~ N(0, 1), x_c = W z + b + e)
plus one boolean whose logit is w z + c. Then p(z | x_c) is the Gaussian N(m, v) of pPCA and
p(x_b | x_c) = integral of sigmoid(+-(w z + c)) N(z; m, v) dz, a one-dimensional integral done
here by Gauss-Hermite quadrature from the hand-set weights, not by vaewatch's code.
"""

import numpy as np
import pyarrow as pa
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss
from scipy.special import expit

from tests.model.ppca import make_ppca
from vaewatch.model.calibration.scores import Calibration
from vaewatch.model.data.features import Feature, FeatureKind, FeatureSpec
from vaewatch.model.estimation.estimators import score_records
from vaewatch.model.network.vae import VAE, VAEConfig

LOGIT_SLOPE, LOGIT_BIAS = 2.5, -0.4  # the boolean's logit: w z + c


def _setup(mean_scale: float, var_scale: float):
    ppca = make_ppca(n_features=3, latent_dim=1, seed=4)
    spec = FeatureSpec([*ppca.spec().features, Feature("flag", FeatureKind.BOOLEAN)])
    n, d = 3, 1
    model = VAE(VAEConfig(n_continuous=n, n_boolean=1, latent_dim=d, hidden=[], min_variance=1e-4))
    gain = ppca.posterior_gain * mean_scale  # the posterior given x_c only: the boolean unseen
    with torch.no_grad():
        enc = model.encoder.net[0]  # inputs [x_c (3), flag, mask (4)] -> [mu, log_var]
        enc.weight.zero_()
        enc.weight[:d, :n] = torch.tensor(gain)
        enc.bias[:d] = torch.tensor(-gain @ ppca.b)
        enc.bias[d:] = torch.tensor(np.log(ppca.posterior_var * var_scale))
        dec = model.decoder.net[0]  # z -> [means (3), log-variances (3), the boolean's logit]
        dec.weight.zero_()
        dec.weight[:n] = torch.tensor(ppca.W)
        dec.bias[:n] = torch.tensor(ppca.b)
        dec.bias[n : 2 * n] = torch.tensor(np.log(ppca.psi))
        dec.weight[2 * n, 0] = LOGIT_SLOPE
        dec.bias[2 * n] = LOGIT_BIAS
    rng = np.random.default_rng(0)
    table = ppca.sample_table(300, rng)
    table = table.append_column("flag", pa.array(rng.random(300) < 0.5))
    return ppca, spec, model.eval(), table


def _expected(ppca, table: pa.Table) -> np.ndarray:
    """-log p(flag | x_c) by quadrature over pPCA's exact posterior of z given x_c."""
    x = np.stack([table.column(f"x{j}").to_numpy() for j in range(3)], axis=1)
    x_std = (x - ppca.mean) / ppca.std
    m = (x_std - ppca.b) @ ppca.posterior_gain[0]  # (rows,)
    v = ppca.posterior_var[0]
    nodes, weights = hermegauss(120)
    z = m[:, None] + np.sqrt(v) * nodes[None, :]
    sign = np.where(table.column("flag").to_numpy(zero_copy_only=False), 1.0, -1.0)
    p = expit(sign[:, None] * (LOGIT_SLOPE * z + LOGIT_BIAS)) @ weights / np.sqrt(2 * np.pi)
    return -np.log(p)


@pytest.mark.parametrize(
    ("mean_scale", "var_scale", "tolerance"),
    [(1.0, 1.0, 0.01), (0.7, 2.0, 0.03)],  # the exact p(z|x_c) as proposal; a mismatched one
)
def test_the_conditional_term_is_minus_log_p_of_the_discrete_values_given_the_rest(
    mean_scale, var_scale, tolerance
):
    ppca, spec, model, table = _setup(mean_scale, var_scale)
    enc = spec.encode(table)
    s = score_records(model, enc.x, enc.mask, log_std=spec.continuous_log_std, k=4096, seed=1)
    expected = _expected(ppca, table)
    got = s.discrete_nll.numpy()
    # worst where the flag is rare given x_c (p ~ 1e-3): an importance sum for a rare event;
    # 0.004 nats there at K = 4096, 0.014 at 1024, 0.07 at 64 (exact proposal)
    assert np.abs(got - expected).max() < tolerance, np.abs(got - expected).max()
    # and it is not the boolean's own term under the posterior of the whole record
    assert np.abs(s.feature_nll[:, 3].numpy() - expected).mean() > 0.1


def test_no_conditional_term_without_both_kinds_of_feature():
    ppca = make_ppca(n_features=3, latent_dim=1, seed=4)
    spec = ppca.spec()
    enc = spec.encode(ppca.sample_table(50, np.random.default_rng(1)))
    s = score_records(ppca.to_vae(), enc.x, enc.mask, log_std=spec.continuous_log_std, k=8)
    assert s.discrete_nll is None
    only = FeatureSpec([Feature("flag", FeatureKind.BOOLEAN)])
    model = VAE(VAEConfig(n_boolean=1, latent_dim=2, hidden=[4])).eval()
    enc = only.encode(pa.table({"flag": [True, False, True]}))
    assert score_records(model, enc.x, enc.mask, log_std=None, k=8).discrete_nll is None


def test_the_calibration_tests_the_conditional_term_as_its_last():
    rng = np.random.default_rng(0)
    n, f = 2_000, 3
    scores, nll = rng.gamma(4.0, size=n), rng.gamma(2.0, size=(n, f))
    discrete = rng.gamma(2.0, size=n)
    calibration = Calibration.fit(scores, nll, discrete_nll=discrete)
    assert calibration.conditional_term
    assert len(calibration.tail_start) == len(calibration.tail_scale) == 1 + f + 1
    # a record ordinary in every term but the conditional one is flagged by it alone
    ordinary = np.median(nll, axis=0)[None, :]
    typical = np.array([np.median(scores)])
    assert not calibration.flags(typical, ordinary, discrete_nll=np.median(discrete, keepdims=True))
    assert calibration.flags(typical, ordinary, discrete_nll=np.array([discrete.max() * 3]))[0]
    with pytest.raises(ValueError, match="discrete_nll"):
        calibration.flags(typical, ordinary)
    # the flagged share of the calibration rows stays about 1 - q with the extra term
    assert 0.005 < calibration.flags(scores, nll, discrete_nll=discrete).mean() < 0.02


def test_models_calibrated_before_the_term_flag_as_they_did():
    rng = np.random.default_rng(1)
    scores, nll = rng.gamma(4.0, size=1_000), rng.gamma(2.0, size=(1_000, 2))
    old = Calibration.fit(scores, nll).to_json()
    old.pop("conditional_term")
    calibration = Calibration.from_json(old)
    assert not calibration.conditional_term
    np.testing.assert_array_equal(
        calibration.flags(scores, nll), Calibration.fit(scores, nll).flags(scores, nll)
    )
    # too few rows for tails: the total rule, and no term however it was asked
    few = Calibration.fit(scores[:50], nll[:50], discrete_nll=nll[:50, 0])
    assert few.effective_rule == "total" and not few.conditional_term
