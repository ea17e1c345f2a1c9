"""The two-level softmax for large vocabularies (model/network/categorical.py): log p(code | z) is
the
cluster's log_softmax plus the class's log_softmax within its cluster, computed here by hand
from the eager last layer's full output; it must be a normalised distribution over the
vocabulary, carry the same gradients, and be able to fit any distribution."""

import math

import pytest
import torch

from vaewatch.model import defaults
from vaewatch.model.data.features import Feature, FeatureKind, FeatureSpec
from vaewatch.model.estimation.estimators import bytes_per_pair
from vaewatch.model.network import categorical
from vaewatch.model.network.categorical import layout, pack_blocks, two_level_shape
from vaewatch.model.network.vae import VAE, VAEConfig

# a 300- and a 320-class group side by side (18 classes per cluster) share a block of 18
# clusters: the 300-class group uses 17 of them, its last holding 300 - 16 * 18 = 12 classes. A
# 260-class group (17 per cluster, 16 clusters, the last holding 5) is a block of its own; the
# 3- and 5-class groups stay flat.
SIZES = [3, 300, 320, 5, 260]
CONFIG = dict(
    n_continuous=1, n_boolean=1, category_sizes=SIZES, latent_dim=3, hidden=[8], two_level_min=100
)


def test_shape_covers_every_code_once_and_leaves_no_cluster_empty():
    for size in [256, 257, 260, 300, 1000, 1001, 1024, 1025, 4096, 50_000]:
        clusters, width = two_level_shape(size)
        assert width == math.ceil(math.sqrt(size))
        assert (clusters - 1) * width < size <= clusters * width  # the last cluster has a code
    assert two_level_shape(300) == (17, 18) and two_level_shape(320) == (18, 18)
    assert two_level_shape(260) == (16, 17)


def test_layout_runs_groups_of_one_width_together():
    rows, blocks, shapes = layout(SIZES, 100)
    assert blocks == [(0, 1), (1, 3), (3, 4), (4, 5)]
    assert shapes == [None, (18, 18), None, (16, 17)]
    assert rows == [3, 18 * 19, 18 * 19, 5, 16 * 18]
    assert layout(SIZES, 0)[0] == SIZES and layout(SIZES, 400)[0] == SIZES  # all flat
    assert pack_blocks([3, 2500, 700, 5, 2], limit=2048, runs=None) == [(0, 1), (1, 2), (2, 5)]
    categories = VAE(VAEConfig(**CONFIG)).decoder.categories
    assert categories.two_level == [False, True, True, False, True]
    assert categories.blocks == blocks


def _by_hand(block: torch.Tensor, codes: torch.Tensor, sizes: list[int], shape) -> torch.Tensor:
    """log p(code) for each group of a two-level block from the last layer's rows (..., B, R):
    the m groups' class rows (clusters x width each), then their cluster rows (clusters each).
    Written per record and group with plain indexing; rows past a group's last code (a
    cluster's unused positions, clusters it does not use) are left out of its softmaxes."""
    clusters, width = shape
    m = codes.shape[1]
    classes = block[..., : m * clusters * width].unflatten(-1, (m, clusters, width))
    tops = block[..., m * clusters * width :].unflatten(-1, (m, clusters))
    result = torch.empty((*block.shape[:-1], m), dtype=block.dtype)
    for j, size in enumerate(sizes):
        top = torch.log_softmax(tops[..., j, : math.ceil(size / width)], -1)
        for b in range(codes.shape[0]):
            c, r = divmod(int(codes[b, j]), width)
            used = min(width, size - c * width)
            within = torch.log_softmax(classes[..., b, j, c, :used], -1)
            result[..., b, j] = top[..., b, c] + within[..., r]
    return result


def _inputs(b: int):
    torch.manual_seed(5)
    codes = torch.stack([torch.randint(0, n, (b,)) for n in SIZES], 1)
    codes[:3, 1] = torch.tensor([0, 299, 288])  # the first code, the last, the last cluster's first
    codes[:3, 2] = torch.tensor([319, 306, 305])
    codes[:3, 4] = torch.tensor([259, 255, 0])
    x = torch.cat([torch.randn(b, 1), torch.randint(0, 2, (b, 1)).float(), codes.float()], 1)
    return x.double(), torch.ones(b, 2 + len(SIZES), dtype=torch.bool)


@pytest.mark.parametrize("gathered", [categorical.TRAIN_GATHERED, 1])
def test_two_level_groups_are_the_hand_computed_factorisation_with_their_gradients(
    gathered, monkeypatch
):
    """gathered=1: with gradients every group runs as its own checkpointed call."""
    monkeypatch.setattr(categorical, "TRAIN_GATHERED", gathered)
    config = VAEConfig(**CONFIG)
    per_group = [3, 18 * 19, 18 * 19, 5, 16 * 18]
    assert config.decoder_output_dim == 2 + 1 + sum(per_group)
    decoder = VAE(config).decoder.double()
    x, mask = _inputs(40)
    z = torch.randn(4, 40, 3, dtype=torch.float64)

    got = decoder.log_prob(z, x, mask).categorical  # (4, 40, 5)
    got.sum().backward()
    grads = [p.grad.clone() for p in decoder.parameters()]
    decoder.zero_grad()

    out = decoder.net(z)  # eager, every row of the last layer
    start = 3  # mean, log-variance, the boolean
    bounds = [start + sum(per_group[:g]) for g in range(6)]
    codes = x[:, 2:].long()
    pair = _by_hand(out[..., bounds[1] : bounds[3]], codes[:, 1:3], [300, 320], (18, 18))
    single = _by_hand(out[..., bounds[4] : bounds[5]], codes[:, 4:5], [260], (16, 17))
    torch.testing.assert_close(got[..., 1:3], pair, rtol=0, atol=1e-10)
    torch.testing.assert_close(got[..., 4:5], single, rtol=0, atol=1e-10)
    # the flat groups: a log_softmax of their own rows
    for g in (0, 3):
        flat = torch.log_softmax(out[..., bounds[g] : bounds[g + 1]], -1)
        flat = flat.gather(-1, codes[:, g].expand(4, 40)[..., None])[..., 0]
        torch.testing.assert_close(got[..., g], flat, rtol=0, atol=1e-10)
    reference = (
        pair.sum()
        + single.sum()
        + sum(
            torch.log_softmax(out[..., bounds[g] : bounds[g + 1]], -1)
            .gather(-1, codes[:, g].expand(4, 40)[..., None])
            .sum()
            for g in (0, 3)
        )
    )
    reference.backward()
    for g, e in zip(grads, [p.grad for p in decoder.parameters()], strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_two_level_probabilities_sum_to_one_over_the_vocabulary():
    """Every code of the 300-, 320- and 260-class groups scored under the same z: each group's
    probabilities sum to 1."""
    decoder = VAE(VAEConfig(**CONFIG)).decoder.double()
    x, mask = _inputs(300)
    x[:, 3] = torch.arange(300, dtype=torch.float64)
    x[:, 4] = torch.arange(300, dtype=torch.float64)  # 320-class: codes 0-299 here, 20-319 below
    x[:, 6] = torch.arange(300, dtype=torch.float64) % 260
    z = torch.randn(6, 1, 3, dtype=torch.float64).expand(6, 300, 3)
    with torch.no_grad():
        lp = decoder.log_prob(z, x, mask).categorical  # (6, 300, 5)
    ones = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(lp[..., 1].exp().sum(-1), ones, atol=1e-12, rtol=0)
    torch.testing.assert_close(lp[:, :260, 4].exp().sum(-1), ones, atol=1e-12, rtol=0)
    x[:, 4] = torch.arange(20, 320, dtype=torch.float64)
    with torch.no_grad():
        upper = decoder.log_prob(z, x, mask).categorical[..., 2]
    total = lp[:, :20, 2].exp().sum(-1) + upper.exp().sum(-1)
    torch.testing.assert_close(total, ones, atol=1e-12, rtol=0)


def test_two_level_head_fits_an_arbitrary_distribution():
    """Gradient descent on the head alone (z fixed) reaches the empirical frequencies of a
    skewed 300-class distribution: the factorisation restricts nothing."""
    torch.manual_seed(0)
    target = torch.distributions.Dirichlet(torch.full((300,), 0.3)).sample().double()
    decoder = VAE(VAEConfig(**CONFIG)).decoder.double()
    x, mask = _inputs(300)
    x[:, 3] = torch.arange(300, dtype=torch.float64)
    z = torch.zeros(1, 300, 3, dtype=torch.float64)
    optimiser = torch.optim.Adam(decoder.parameters(), lr=0.05)
    for _ in range(400):
        optimiser.zero_grad()
        lp = decoder.log_prob(z, x, mask).categorical[0, :, 1]  # log p(code) for every code
        loss = -(target * lp).sum()  # cross-entropy, minimised at p = target
        loss.backward()
        optimiser.step()
    entropy = -(target * target.clamp_min(1e-300).log()).sum()
    assert float(loss.detach() - entropy) < 1e-3  # KL(target || p) in nats


def test_bf16_inference_stays_close_to_float32():
    torch.manual_seed(2)
    decoder = VAE(VAEConfig(**CONFIG)).decoder
    x, mask = _inputs(64)
    x = x.float()
    z = torch.randn(8, 64, 3)
    with torch.no_grad():
        exact = decoder.log_prob(z, x, mask).categorical[..., 1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = decoder.log_prob(z, x, mask).categorical[..., 1]
    assert low.dtype == torch.float32
    assert float((low - exact).abs().max()) < 0.05


def test_new_models_are_two_level_and_saved_ones_stay_flat():
    features = [
        Feature("amount", FeatureKind.CONTINUOUS, mean=0.0, std=1.0),
        Feature("merchant", FeatureKind.CATEGORICAL, vocabulary=[f"m{i}" for i in range(999)]),
        Feature("country", FeatureKind.CATEGORICAL, vocabulary=["a", "b"]),
    ]
    config = VAEConfig.for_spec(FeatureSpec(features, rows=5000))
    assert config.two_level_min == defaults.TWO_LEVEL_MIN_CLASSES
    assert VAE(config).decoder.categories.two_level == [True, False]
    saved = config.to_json()
    del saved["two_level_min"]  # a model written before the two-level head existed
    old = VAEConfig.from_json(saved)
    assert old.two_level_min == 0 and not any(VAE(old).decoder.categories.two_level)
    assert old.decoder_output_dim == config.decoder_output_dim - (32 + 32 * 32 - 1000)


@pytest.mark.parametrize("two_level_min", [0, 100])
def test_working_memory_counts_the_two_level_logits(two_level_min):
    """A pair holds the 300- and 320-class groups' 18 cluster + 18 class logits each, not all
    888 logits."""
    model = VAE(VAEConfig(**{**CONFIG, "two_level_min": two_level_min}))
    assert model.decoder.categories.materialised == (72 if two_level_min else 888)
    assert bytes_per_pair(model) > 0
