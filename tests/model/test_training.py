"""Training: determinism by seed, early stopping, the split, objectives."""

import numpy as np
import pytest
import torch

from vaewatch.model import defaults
from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.data.training_data import TrainingData, held_out_fraction, split_indices
from vaewatch.model.estimation.estimators import score_records
from vaewatch.model.metrics import roc_auc
from vaewatch.model.network.vae import VAE, VAEConfig
from vaewatch.model.synthetic import LABEL_COLUMNS as LABELS
from vaewatch.model.training.loop import (
    TrainConfig,
    far_out_cutoff,
    robust_mean,
    train,
    trimmed_mean,
)
from vaewatch.model.training.sizing import SMALL_TABLE_MAX_ROWS, capacity


@pytest.fixture(scope="module")
def encoded(transactions_table):
    spec = FeatureSpec.fit(transactions_table, exclude=LABELS)
    enc = spec.encode(transactions_table)
    return spec, enc


def _fit(spec, enc, **overrides):
    torch.manual_seed(123)  # init is reseeded inside train(); this must not matter
    model = VAE(VAEConfig.for_spec(spec, hidden=[64, 64]))
    config = TrainConfig(**{"epochs": 3, "seed": 5, **overrides})
    return model, train(model, enc.x, enc.mask, config)


def test_split_is_deterministic_and_disjoint():
    a_train, a_val = split_indices(10_000, 0.1, seed=3)
    b_train, b_val = split_indices(10_000, 0.1, seed=3)
    assert a_val.equal(b_val) and a_train.equal(b_train)
    assert 900 < len(a_val) < 1100 and len(a_val) + len(a_train) == 10_000  # Binomial(10k, 0.1)
    assert not set(a_val.tolist()) & set(a_train.tolist())
    assert not split_indices(10_000, 0.1, seed=4)[1].equal(a_val)


def test_same_seed_same_model_on_cpu(encoded):
    spec, enc = encoded
    m1, r1 = _fit(spec, enc)
    m2, r2 = _fit(spec, enc)
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(p1, p2), name
    assert [h.val_elbo for h in r1.history] == [h.val_elbo for h in r2.history]


def test_training_improves_validation_elbo_and_keeps_best(encoded):
    spec, enc = encoded
    model, result = _fit(spec, enc, epochs=8)
    vals = [h.val_criterion for h in result.history]
    warmup = TrainConfig().kl_warmup_epochs
    assert vals[result.best_epoch] == max(vals[warmup - 1 :])  # chosen after the warm-up
    assert max(vals) > vals[0] + 1.0, vals
    assert len(result.history[0].kl_per_dim) == model.config.latent_dim


def test_iwae_objective_trains(encoded):
    spec, enc = encoded
    _, result = _fit(spec, enc, objective="iwae", train_k=5, epochs=3)
    # the IWAE objective improves the IWAE (its ELBO may get worse: Burda et al. 2015, sec. 5.2);
    # on the validation rows without their worst 1 %: the injected anomalies there are not
    # learned by the robust objective, get less likely as the rest is, and dominate a plain mean
    vals = [h.val_criterion for h in result.history]
    assert np.isfinite(vals).all() and vals[-1] > vals[0] + 0.5, vals
    criterion = [h.val_criterion for h in result.history]
    assert result.best_epoch == int(np.argmax(criterion))


def test_trained_model_separates_injected_anomalies(transactions_table, encoded):
    spec, enc = encoded
    model, _ = _fit(spec, enc, epochs=15)
    model.eval()
    scores = score_records(model, enc.x, enc.mask, log_std=spec.continuous_log_std, k=32)
    labels = transactions_table.column("is_injected_anomaly").to_numpy()
    assert roc_auc(scores.anomaly_score.numpy(), labels) > 0.9


def test_roc_auc_matches_hand_computed_values():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([1.0, 1.0, 1.0]), np.array([0, 1, 1])) == 0.5  # ties count half
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.array([1.0]), np.array([1]))


def test_trimmed_mean_by_hand():
    assert trimmed_mean(np.array([-1000.0, 1.0, 2.0, 3.0]), 0.25) == 2.0
    assert trimmed_mean(np.array([5.0, 1.0]), 0.0) == 3.0
    assert trimmed_mean(np.array([7.0]), 0.4) == 7.0


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="objective must be"):
        TrainConfig(objective="wake-sleep")


def test_small_tables_get_min_steps_per_epoch():
    config = TrainConfig(batch_size=100, min_steps_per_epoch=50)
    assert config.passes_per_epoch(80) == 50  # one step per pass
    assert config.passes_per_epoch(1000) == 5  # 10 steps per pass
    assert config.passes_per_epoch(1001) == 5  # 11 steps per pass -> 55 steps
    assert config.passes_per_epoch(10_000) == 1
    x = torch.randn(90, 3, dtype=torch.float64)
    mask = torch.ones_like(x, dtype=torch.bool)
    steps = []
    model = VAE(VAEConfig(n_continuous=3, hidden=[8])).double()
    config = TrainConfig(
        epochs=2, batch_size=16, min_steps_per_epoch=20, validation_fraction=0.2, device="cpu"
    )
    result = train(model, x, mask, config, on_step=lambda rows, loss: steps.append(rows))
    rows = TrainingData.from_tensors(x, mask, 0.2, config.seed).counts.rows_train
    passes = config.passes_per_epoch(rows)
    assert passes * -(-rows // 16) >= 20 > (passes - 1) * -(-rows // 16)
    assert len(steps) == len(result.history) * passes * -(-rows // 16)
    assert sum(steps) == len(result.history) * passes * rows


def test_decoder_variance_floor_is_per_feature_and_old_configs_load():
    config = VAEConfig(n_continuous=3, hidden=[4], variance_floor=[0.0, 0.25, 2e-5])
    model = VAE(config)
    raw = torch.full((2, 3), -30.0)
    log_var = model.decoder.log_variance(raw)
    expected = torch.log(torch.tensor([1e-4, 0.25, 1e-4]))  # max(min_variance, floor)
    torch.testing.assert_close(log_var, expected.expand(2, 3))
    high = model.decoder.log_variance(torch.full((1, 3), 50.0))
    torch.testing.assert_close(high, torch.full((1, 3), float(np.log(1e4))))
    # a config written before the floor existed has no key: the scalar floor applies
    old = config.to_json()
    del old["variance_floor"]
    legacy = VAE(VAEConfig.from_json(old))
    torch.testing.assert_close(
        legacy.decoder.log_variance(raw), torch.full((2, 3), float(np.log(1e-4)))
    )
    with pytest.raises(ValueError, match="variance_floor has 2 entries"):
        VAE(VAEConfig(n_continuous=3, hidden=[4], variance_floor=[0.1, 0.1]))


def test_no_stop_and_no_choice_during_the_kl_warm_up(encoded):
    """Patience 1 would stop at the first flat epoch; during the warm-up nothing counts."""
    spec, enc = encoded
    _, result = _fit(spec, enc, epochs=9, patience=1, kl_warmup_epochs=6)
    assert result.best_epoch >= 5
    assert len(result.history) >= 7  # the warm-up's 6 epochs, then at least one to compare


@pytest.mark.parametrize(
    ("rows", "expected"),
    [(80, 0.25), (544, 0.25), (1_000, 0.2), (2_000, 0.1), (100_000, 0.1)],
)
def test_small_tables_hold_out_enough_rows(rows, expected):
    # 200 rows wanted, at most a quarter of the table, at least the 10 % default
    assert held_out_fraction(rows, 0.1) == pytest.approx(expected)


def test_robust_mean_by_hand():
    losses = torch.tensor([1.0, 9.0, 2.0, 3.0, 100.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    assert robust_mean(losses, 0.0).item() == pytest.approx(14.5)
    assert robust_mean(losses, 0.1).item() == pytest.approx(45.0 / 9)  # drops 100
    assert robust_mean(losses, 0.25).item() == pytest.approx(36.0 / 8)  # drops 100 and 9
    assert robust_mean(torch.tensor([3.0]), 0.49).item() == 3.0  # keeps at least one


def _planted_cluster(rows=3000, planted=90, features=6):
    """A correlated Gaussian table whose first `planted` rows (3 % by default) form a tight
    cluster far from the rest: contamination a plain likelihood fit learns as a mode of its own."""
    rng = np.random.default_rng(0)
    loadings = rng.normal(size=(features, 2))
    x = rng.normal(size=(rows, 2)) @ loadings.T + 0.3 * rng.normal(size=(rows, features))
    x[:planted] = 4.0 + 0.1 * rng.normal(size=(planted, features))
    x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x, dtype=torch.float32), planted


PLAIN = dict(robust_trim=0.0, weight_prior=0.0)
# a 20 % trim from the first update at a fifth of the weight, the worst 5 % still dropped
TWO_TIER = dict(robust_trim=0.2, trim_weight=0.2, robust_drop=0.05, trim_from_start=True)


@pytest.mark.parametrize(
    "settings, caught", [(PLAIN, (0.0, 0.2)), ({}, (0.9, 1.0)), (TWO_TIER, (0.9, 1.0))]
)
def test_robust_training_does_not_learn_a_planted_cluster(settings, caught):
    x, planted = _planted_cluster()
    mask = torch.ones_like(x, dtype=torch.bool)
    model = VAE(VAEConfig(n_continuous=x.shape[1], latent_dim=2, hidden=[32, 32]))
    train(model, x, mask, TrainConfig(epochs=20, **settings))
    score = score_records(model, x, mask, log_std=None, k=16).anomaly_score.numpy()
    above = np.mean(score[:planted] > np.quantile(score[planted:], 0.99))
    # measured: the plain ELBO scores 0 % of the cluster above the normal rows' 99th percentile
    # (it learned them), the default 5 % trim 100 %, the two-tier trim 100 % (without its dropped
    # 5 %, down-weighting alone: 12 %; a tight cluster is cheap to learn at a fifth of the weight)
    assert caught[0] <= above <= caught[1]


@pytest.mark.parametrize("from_start, caught", [(False, (0.0, 0.2)), (True, (0.9, 1.0))])
def test_trimming_from_the_start_does_not_learn_a_cluster_larger_than_the_default_trim(
    from_start, caught
):
    x, planted = _planted_cluster(rows=600, planted=48)  # 8 %: above the default 5 % trim
    mask = torch.ones_like(x, dtype=torch.bool)
    model = VAE(VAEConfig(n_continuous=x.shape[1], latent_dim=2, hidden=[32, 32]))
    config = TrainConfig(
        epochs=20,
        robust_trim=0.2,
        robust_drop=0.2,
        trim_from_start=from_start,
        trim_weight=0.0,
        weight_prior=0.0,
    )
    train(model, x, mask, config)
    score = score_records(model, x, mask, log_std=None, k=16).anomaly_score.numpy()
    above = np.mean(score[:planted] > np.quantile(score[planted:], 0.99))
    # measured (seeds 0 and 1, 300 to 3,000 rows): 0 % when the 20 % trim starts after the KL
    # warm-up (the cluster is learned during it, then explained too well to be trimmed), 100 %
    # when it trims from the first update
    assert caught[0] <= above <= caught[1]


def test_robust_mean_weights_the_trimmed_records_by_hand():
    losses = torch.tensor([3.0, 10.0, 1.0, 2.0], requires_grad=True)
    # a quarter trimmed: 10 counts half, the others 1: (1 + 2 + 3 + 0.5 * 10) / 3.5
    value = robust_mean(losses, 0.25, trim_weight=0.5)
    assert value.item() == pytest.approx(11.0 / 3.5)
    value.backward()
    assert losses.grad.tolist() == pytest.approx([1 / 3.5, 0.5 / 3.5, 1 / 3.5, 1 / 3.5])
    assert robust_mean(losses, 0.25).item() == pytest.approx(2.0)  # weight 0: left out
    assert robust_mean(losses, 0.25, trim_weight=1.0).item() == pytest.approx(4.0)  # plain mean
    assert robust_mean(losses, 0.0, trim_weight=0.5).item() == pytest.approx(4.0)


def test_robust_mean_drops_the_worst_and_down_weights_the_next_by_hand():
    losses = torch.tensor([5.0, 1.0, 40.0, 2.0, 3.0, 4.0, 30.0, 6.0, 7.0, 8.0], requires_grad=True)
    # trim 30 %: 40, 30 and 8 are trimmed; drop 10 %: 40 counts nothing, 30 and 8 count 0.25
    value = robust_mean(losses, 0.3, trim_weight=0.25, drop=0.1)
    expected = (1 + 2 + 3 + 4 + 5 + 6 + 7 + 0.25 * (30 + 8)) / (7 + 0.25 * 2)
    assert value.item() == pytest.approx(expected)
    value.backward()
    weights = losses.grad * (7 + 0.25 * 2)
    assert weights.tolist() == pytest.approx([1, 1, 0, 1, 1, 1, 0.25, 1, 1, 0.25])
    # the dropped share never exceeds the trimmed share
    assert robust_mean(losses, 0.1, trim_weight=0.25, drop=0.3).item() == pytest.approx(66 / 9)


def test_the_weight_prior_is_spread_over_the_training_rows():
    config = TrainConfig(weight_decay=1e-4, weight_prior=2.0)
    assert config.decay_per_record(58) == pytest.approx(1e-4 + 2.0 / 58)
    assert config.decay_per_record(20_000) == pytest.approx(1e-4 + 2.0 / 20_000)
    with pytest.raises(ValueError, match="weight_prior"):
        TrainConfig(weight_prior=-1.0)
    with pytest.raises(ValueError, match="trim_weight"):
        TrainConfig(trim_weight=1.5)


def _weight_norm(model: VAE) -> float:
    return float(
        sum(p.detach().square().sum() for n, p in model.named_parameters() if "weight" in n)
    )


def test_the_weight_prior_shrinks_the_weights_of_a_small_table_more_than_of_a_large_one():
    def norm(rows: int, prior: float) -> float:
        x, _ = _planted_cluster(rows=rows, planted=0)
        model = VAE(VAEConfig(n_continuous=x.shape[1], latent_dim=2, hidden=[32, 32]))
        config = TrainConfig(epochs=6, weight_prior=prior, patience=100, seed=0)
        train(model, x, torch.ones_like(x, dtype=torch.bool), config)
        return _weight_norm(model)

    # the same prior is a strong penalty per row on 60 rows and a weak one on 6,000 (measured:
    # the weights' squared norm x0.06 and x0.59 after 6 epochs; Adam's step normalisation lets
    # even a weak L2 term shrink the weights the loss barely uses)
    small = norm(60, 20.0) / norm(60, 0.0)
    large = norm(6000, 20.0) / norm(6000, 0.0)
    assert small < 0.25 and large > 3 * small, (small, large)


@pytest.mark.parametrize("rows", [300, 1200])
def test_the_default_objective_learns_a_legitimate_mode_larger_than_its_trim(rows):
    """A second mode holding a quarter of the rows is normal data and must not be trimmed away:
    measured 5 % of it flagged against the bulk's 99th percentile with the defaults (300 and
    1,200 rows with the large-table profile), 12-16 % when a 20 % trim from the first update
    drops its rows, 11-18 % with the two-tier trim; the small-table profile (the two-tier trim
    and a weight prior), which the 300-row table now gets by default, 8 %, and 20 % when forced
    on the 1,200-row one."""
    rng = np.random.default_rng(1)
    mode = rows // 4
    loadings = rng.normal(size=(6, 2))
    x = rng.normal(size=(rows, 2)) @ loadings.T + 0.3 * rng.normal(size=(rows, 6))
    x[:mode] += np.array([-3.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    mask = torch.ones_like(x, dtype=torch.bool)
    model = VAE(VAEConfig(n_continuous=6, latent_dim=2, hidden=[32, 32]))
    train(model, x, mask, TrainConfig(epochs=20, seed=0))
    score = score_records(model, x, mask, log_std=None, k=16).anomaly_score.numpy()
    flagged = np.mean(score[:mode] > np.quantile(score[mode:], 0.99))
    assert flagged <= 0.1, flagged


@pytest.mark.parametrize(
    "rows, latent, hidden",
    [(77, 2, (16, 16)), (220, 5, (32, 32)), (500, 8, (64, 64)), (724, 8, (64, 64)),
     (725, 8, (128, 128)), (100_000, 8, (128, 128))],
)  # fmt: skip
def test_capacity_scales_with_the_training_rows(rows, latent, hidden):
    assert capacity(rows) == (latent, hidden)


@pytest.mark.parametrize(
    "rows, small", [(60, True), (724, True), (725, False), (100_000, False)]
)  # fmt: skip
def test_the_training_profile_follows_the_network_size(rows, small):
    """A table whose network `capacity` narrows (up to 724 rows) trains with the small-table
    profile, a larger one with the large-table profile; values given explicitly stay."""
    profile = defaults.SMALL_TABLE_TRAINING if small else defaults.LARGE_TABLE_TRAINING
    assert (capacity(rows)[1] != (128, 128)) == small
    assert (rows <= SMALL_TABLE_MAX_ROWS) == small
    resolved = TrainConfig().for_rows(rows)
    assert {name: getattr(resolved, name) for name in profile} == profile
    given = TrainConfig(robust_trim=0.1, trim_from_start=False).for_rows(rows)
    assert (given.robust_trim, given.trim_from_start) == (0.1, False)
    assert given.weight_prior == profile["weight_prior"]
    assert TrainConfig().decay_per_record(rows) == pytest.approx(profile["weight_prior"] / rows)
    # a profile asked for by name is used whatever the size
    for name, forced in (("small", defaults.SMALL_TABLE_TRAINING),
                         ("large", defaults.LARGE_TABLE_TRAINING)):  # fmt: skip
        resolved = TrainConfig(profile=name).for_rows(rows)
        assert {field: getattr(resolved, field) for field in forced} == forced
    with pytest.raises(ValueError, match="profile must be one of auto, small, large"):
        TrainConfig(profile="smal")


def test_a_small_table_is_trained_robustly_by_default():
    """On a 400-row table a tight cluster of 6 % of the rows (more than the large-table trim
    leaves out) is learned as a mode under the large-table profile and caught with the
    defaults, which give a table that small the small-table profile. Measured on seeds 0 and
    1: 0 % of the cluster above the normal rows' 99th percentile under the large-table
    profile, 100 % with the defaults (at 10 % both learn it)."""
    x, planted = _planted_cluster(rows=400, planted=24)
    mask = torch.ones_like(x, dtype=torch.bool)
    caught = {}
    for name, settings in (("defaults", {}), ("large", defaults.LARGE_TABLE_TRAINING)):
        model = VAE(VAEConfig(n_continuous=x.shape[1], latent_dim=2, hidden=[32, 32]))
        train(model, x, mask, TrainConfig(epochs=20, **settings))
        score = score_records(model, x, mask, log_std=None, k=16).anomaly_score.numpy()
        caught[name] = np.mean(score[:planted] > np.quantile(score[planted:], 0.99))
    assert caught["defaults"] >= 0.9 and caught["large"] <= 0.1, caught


def test_the_dropped_share_waits_for_the_warm_up(monkeypatch):
    """--robust-drop counts nothing only once the KL warm-up is over (dropped from the first
    update it is a share of every table that is never learned); the down-weighting starts from
    the first update when asked."""
    import vaewatch.model.training.loop as training

    calls = []
    real = training.robust_mean

    def spy(losses, trim, trim_weight=0.0, drop=0.0):
        calls.append((trim, trim_weight, drop))
        return real(losses, trim, trim_weight, drop)

    monkeypatch.setattr(training, "robust_mean", spy)
    x, _ = _planted_cluster(rows=200, planted=0)
    model = VAE(VAEConfig(n_continuous=x.shape[1], latent_dim=2, hidden=[8]))
    config = TrainConfig(
        epochs=3,
        kl_warmup_epochs=2,
        min_steps_per_epoch=1,
        batch_size=200,
        patience=10,
        robust_trim=0.2,
        trim_weight=0.2,
        robust_drop=0.05,
        trim_from_start=True,
    )
    train(model, x, torch.ones_like(x, dtype=torch.bool), config)
    assert calls == [(0.2, 0.2, 0.0), (0.2, 0.2, 0.0), (0.2, 0.2, 0.05)]


def test_the_far_out_cutoff_by_hand():
    # 1..9: the quartiles (linear interpolation at positions 2 and 6 of 0..8) are 3 and 7
    cutoff, quartiles = far_out_cutoff(np.arange(9.0, 0.0, -1.0), fence=3.0)
    assert quartiles == (3.0, 7.0) and cutoff == 7.0 + 3.0 * 4.0
    # 0, 0, 10, 10: positions 0.75 and 2.25 fall between equal values, so Q1 = 0 and Q3 = 10
    assert far_out_cutoff(np.array([0.0, 0.0, 10.0, 10.0]), fence=1.5)[0] == 10 + 1.5 * 10
    with pytest.raises(ValueError, match="refit_fence"):
        TrainConfig(refit_fence=0.0)


def _large_table_fit(x, **settings):
    mask = torch.ones_like(x, dtype=torch.bool)
    model = VAE(VAEConfig(n_continuous=x.shape[1], latent_dim=2, hidden=[32, 32]))
    result = train(model, x, mask, TrainConfig(epochs=20, seed=0, **settings))
    score = score_records(model, x, mask, log_std=None, k=16).anomaly_score.numpy()
    return result, score


def test_the_refit_sets_aside_a_far_cluster_and_still_does_not_learn_it():
    """The large-table profile's refit leaves out the planted cluster's training rows (beyond
    the robust fit's far-out fence) and little else, and the refit model still scores the
    cluster above the normal rows' 99th percentile. Measured (seed 0): 97 rows set aside, where
    the cluster has 82 training rows (the other 15 are 0.6 % of the normal ones); the cluster
    100 % above."""
    x, planted = _planted_cluster()
    result, score = _large_table_fit(x)
    _, validation = split_indices(x.shape[0], TrainConfig().validation_fraction, seed=0)
    planted_train = planted - int((validation < planted).sum())
    aside = result.set_aside
    assert aside is not None and aside.refit_epochs >= 1
    assert planted_train <= aside.rows <= planted_train + 0.01 * x.shape[0], aside
    assert any(h.refit for h in result.history) and not result.history[0].refit
    assert np.mean(score[:planted] > np.quantile(score[planted:], 0.99)) >= 0.9


def test_the_refit_sets_aside_almost_nothing_of_a_clean_table():
    """On a clean Gaussian table the fence leaves out about 1 % of the rows, where the robust
    fit's trim left out 5 % of every batch (measured: 1.1 % of this 6-feature table)."""
    x, _ = _planted_cluster(planted=0)
    result, _ = _large_table_fit(x)
    assert result.set_aside.share < 0.02, result.set_aside
    # without a trim the fit is the plain likelihood throughout: nothing is set aside
    plain, _ = _large_table_fit(x, robust_trim=0.0)
    assert plain.set_aside.rows == 0 and plain.set_aside.refit_epochs >= 1


def test_the_small_table_profile_has_no_refit():
    x, _ = _planted_cluster(rows=400, planted=0)
    mask = torch.ones_like(x, dtype=torch.bool)
    model = VAE(VAEConfig(n_continuous=x.shape[1], latent_dim=2, hidden=[32, 32]))
    result = train(model, x, mask, TrainConfig(epochs=8, seed=0))
    assert result.set_aside is None and not any(h.refit for h in result.history)
