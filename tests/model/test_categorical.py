"""Categorical log-probabilities (model/network/categorical.py), against torch.log_softmax per
group:
the one-block normaliser (fast and safe paths) and the blocked head used for large vocabularies,
which must be the same function of the weights as the full last layer, gradients included."""

import pytest
import torch

from vaewatch.model.estimation.estimators import bytes_per_pair
from vaewatch.model.network.categorical import pack_blocks
from vaewatch.model.network.vae import VAE, VAEConfig


def _per_group(logits: torch.Tensor, sizes: list[int], codes: torch.Tensor) -> torch.Tensor:
    """log_softmax within each group, at each record's code: (..., B, n_cat)."""
    return torch.stack(
        [
            torch.log_softmax(group, -1)
            .gather(-1, codes[:, j].expand(group.shape[:-1]).unsqueeze(-1))
            .squeeze(-1)
            for j, group in enumerate(logits.split(sizes, dim=-1))
        ],
        dim=-1,
    )


def test_categorical_normaliser_safe_path_equals_log_softmax():
    """Logits hundreds of nats apart underflow the fast exp-sum path; the per-group fallback
    must still give each group's exact log_softmax."""
    config = VAEConfig(n_continuous=0, category_sizes=[3, 1001, 2], latent_dim=2, hidden=[4])
    decoder = VAE(config).decoder.double()
    torch.manual_seed(1)
    logits = 300.0 * torch.randn(6, 1006, dtype=torch.float64)
    codes = torch.stack([torch.randint(0, n, (6,)) for n in config.category_sizes], dim=1)  # (6, 3)
    got = decoder.categories.log_prob(logits, codes)
    expected = torch.stack(
        [
            torch.log_softmax(logits[:, :3], -1).gather(1, codes[:, :1]).squeeze(1),
            torch.log_softmax(logits[:, 3:1004], -1).gather(1, codes[:, 1:2]).squeeze(1),
            torch.log_softmax(logits[:, 1004:], -1).gather(1, codes[:, 2:]).squeeze(1),
        ],
        dim=1,
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("spread", [3.0, 400.0])
def test_categorical_normalisation_fast_and_safe_paths_agree_with_log_softmax(spread):
    """spread=3 takes the exp-and-matmul path; spread=400 makes one group underflow there, so
    the per-group shift must take over. Both must equal a per-group log_softmax."""
    config = VAEConfig(category_sizes=[3, 5, 2], latent_dim=2, hidden=[4])
    decoder = VAE(config).decoder
    torch.manual_seed(0)
    logits = torch.randn(6, 7, 10)
    logits[..., 3:8] -= spread  # the second group sits far below the others
    codes = torch.stack([torch.randint(0, s, (7,)) for s in config.category_sizes], dim=-1)
    got = decoder.categories.log_prob(logits, codes)
    expected = torch.stack(
        [
            torch.log_softmax(group, -1)
            .gather(-1, codes[:, j].expand(6, 7).unsqueeze(-1))
            .squeeze(-1)
            for j, group in enumerate(logits.split(config.category_sizes, dim=-1))
        ],
        dim=-1,
    )
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pack_blocks_fills_greedily_and_isolates_large_groups():
    assert pack_blocks([3, 2500, 700, 5, 2], limit=2048) == [(0, 1), (1, 2), (2, 5)]
    assert pack_blocks([1000, 1000, 1000], limit=2048) == [(0, 2), (2, 3)]
    assert pack_blocks([10, 10], limit=2048) == [(0, 2)]
    assert pack_blocks([], limit=2048) == []


# continuous (one zero-inflated), a boolean, five categoricals of which two are large, and two
# features with a modelled observation: every kind of row of the last layer is present
WIDE = dict(
    n_continuous=2,
    n_boolean=1,
    category_sizes=[3, 2500, 700, 5, 2],
    atom_features=[1],
    atom_values=[0.0],
    missing_features=[0, 4],
    latent_dim=3,
    hidden=[8],
)


def _inputs(config: VAEConfig, b: int = 6):
    torch.manual_seed(3)
    x = torch.cat(
        [
            torch.randn(b, 2, dtype=torch.float64),
            torch.randint(0, 2, (b, 1)).double(),
            torch.stack([torch.randint(0, n, (b,)) for n in config.category_sizes], 1).double(),
        ],
        dim=1,
    )
    x[0, 1] = 0.0  # at the point mass
    mask = torch.rand(b, config.n_features) > 0.2
    return x, mask


def test_blocked_head_is_the_full_last_layer():
    """Large vocabularies are evaluated block by block; every output (densities, point mass,
    Bernoullis, missingness, each categorical) must equal the unblocked decoder with the same
    weights, and the categoricals a log_softmax of the full layer's logits. Gradients too."""
    config = VAEConfig(**WIDE)
    decoder = VAE(config).decoder.double()
    assert decoder.categories.blocked
    assert decoder.categories.blocks == [(0, 1), (1, 2), (2, 5)]
    x, mask = _inputs(config)
    z = torch.randn(4, 6, 3, dtype=torch.float64)

    blocked = decoder.log_prob(z, x, mask)
    blocked_total = blocked.total().sum()
    blocked_total.backward()
    grads = [p.grad.clone() for p in decoder.parameters()]
    decoder.zero_grad()

    decoder.categories.blocks = []  # the same decoder through its one-piece path
    whole = decoder.log_prob(z, x, mask)
    whole.total().sum().backward()
    for name in ("continuous", "boolean", "categorical"):
        torch.testing.assert_close(getattr(blocked, name), getattr(whole, name), rtol=0, atol=1e-10)
    for got, expected in zip(grads, [p.grad for p in decoder.parameters()], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)

    first = 2 * config.n_continuous + config.n_boolean
    logits = decoder.net(z)[..., first : first + sum(config.category_sizes)]
    expected = _per_group(logits, config.category_sizes, x[:, 3:].long())
    expected = torch.where(mask[:, 3:], expected, 0.0)
    expected[..., 1] += torch.nn.functional.logsigmoid(
        torch.where(mask[:, 4], -1.0, 1.0) * decoder.net(z)[..., -1]
    )  # feature 4 (the 2,500-value categorical): its observation is modelled, the last logit
    torch.testing.assert_close(blocked.categorical, expected, rtol=0, atol=1e-10)


def test_working_memory_counts_one_block_of_logits():
    """The budgeted chunk of a blocked model holds the widest block (2,500 logits here), not the
    whole vocabulary (3,210): bytes per pair fall by the difference, five passes of it."""
    config = VAEConfig(**WIDE)
    model = VAE(config)
    assert model.decoder.categories.materialised == 2500
    blocked = bytes_per_pair(model)
    model.decoder.categories.blocks = []
    assert model.decoder.categories.materialised == 3210
    assert bytes_per_pair(model) - blocked == 5 * (3210 - 2500) * 4
