"""The fused inference path (model/network/fused.py) computes what the eager layers compute."""

import pytest
import torch
from torch import nn

from vaewatch.model.estimation.estimators import score_records
from vaewatch.model.network import fused
from vaewatch.model.network.vae import VAE, VAEConfig, mlp

needs_onednn = pytest.mark.skipif(not fused.available(), reason="torch built without oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(
    not fused.available(torch.bfloat16), reason="no oneDNN bf16 kernel on this CPU"
)


@needs_onednn
@pytest.mark.parametrize("activation", ["relu", "tanh", "silu", "gelu"])
def test_fused_mlp_equals_the_eager_layers_in_float32(activation):
    torch.manual_seed(0)
    net = mlp([8, 32, 32, 20], activation).eval()
    z = torch.randn(3, 50, 8)  # (K, B, D)
    expected = net(z)
    with torch.inference_mode():
        got = fused.run(net, z)
    assert got.dtype == torch.float32 and got.shape == (3, 50, 20)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)


@needs_onednn_bf16
def test_fused_mlp_under_bf16_autocast_matches_eager_autocast():
    """The same bf16 matmuls, bias and ReLU: only where the bias is added (before or after
    rounding the product to bf16) may differ, so within bf16's resolution."""
    torch.manual_seed(1)
    net = mlp([8, 128, 128, 96], "relu").eval()
    z = torch.randn(4, 256, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = net(z)
        got = fused.run(net, z)
    assert got.dtype == expected.dtype == torch.bfloat16
    scale = expected.float().abs().max()
    assert (got.float() - expected.float()).abs().max() <= 2**-7 * scale


def test_a_leading_activation_and_gradients_use_the_eager_modules():
    torch.manual_seed(2)
    net = nn.Sequential(nn.ReLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    h = torch.randn(10, 6)
    with torch.inference_mode():
        torch.testing.assert_close(fused.run(net, h), net(h))
    # with gradients on (training) the eager layers run, so backward works
    out = fused.run(net, h)
    out.sum().backward()
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0


def test_bf16_without_a_onednn_kernel_runs_the_eager_layers(monkeypatch):
    """On a CPU without bf16 instructions (AVX2 only) oneDNN cannot build a bf16 linear:
    the fused path must step aside, not fail, and give eager autocast's result."""
    torch.manual_seed(4)
    net = mlp([8, 32, 6], "relu").eval()
    z = torch.randn(2, 40, 8)
    monkeypatch.setattr(fused, "available", lambda dtype=torch.float32: dtype == torch.float32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.compute_dtype(z) is None
        torch.testing.assert_close(fused.run(net, z), net(z), rtol=0, atol=0)


def test_float64_runs_the_eager_layers():
    net = mlp([4, 8, 2], "relu").double().eval()
    h = torch.randn(5, 4, dtype=torch.float64)
    with torch.inference_mode():
        assert fused.compute_dtype(h) is None
        torch.testing.assert_close(fused.run(net, h), net(h))


@needs_onednn
def test_scores_with_the_fused_path_equal_the_eager_ones(monkeypatch):
    """The whole production estimator, fp32: IWAE, ELBO, SE and attribution unchanged."""
    torch.manual_seed(3)
    config = VAEConfig(n_continuous=5, n_boolean=2, category_sizes=[4, 6])
    model = VAE(config).eval()
    x = torch.randn(300, config.n_features)
    x[:, 5:7] = (x[:, 5:7] > 0).float()
    x[:, 7] = torch.randint(0, 4, (300,)).float()
    x[:, 8] = torch.randint(0, 6, (300,)).float()
    mask = torch.rand(300, config.n_features) > 0.1
    log_std = torch.randn(5)
    fast = score_records(model, x, mask, log_std=log_std, k=16)
    monkeypatch.setattr(fused, "available", lambda dtype=torch.float32: False)
    eager = score_records(model, x, mask, log_std=log_std, k=16)
    for name in ("log_likelihood", "elbo", "log_likelihood_se", "feature_nll"):
        torch.testing.assert_close(getattr(fast, name), getattr(eager, name), rtol=1e-5, atol=1e-4)


def test_cached_bf16_copy_follows_the_parameter():
    """At inference the bf16 copy of a weight is kept and reused; an in-place update of the
    parameter (an optimiser step, a loaded state) must be seen at the next call."""
    layer = nn.Linear(4, 3)
    with torch.inference_mode():
        first = fused.cast(layer.weight, torch.bfloat16)
        assert fused.cast(layer.weight, torch.bfloat16) is first  # reused
    with torch.no_grad():
        layer.weight.add_(1.0)
    with torch.inference_mode():
        second = fused.cast(layer.weight, torch.bfloat16)
    assert second is not first
    torch.testing.assert_close(second, layer.weight.detach().to(torch.bfloat16), rtol=0, atol=0)
    layer.load_state_dict({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)})
    with torch.no_grad():
        assert fused.cast(layer.weight, torch.bfloat16).abs().max() == 0
    # with gradients it is a differentiable conversion, never the cached copy
    converted = fused.cast(layer.weight, torch.bfloat16)
    assert converted.requires_grad and converted.grad_fn is not None


@needs_onednn
@pytest.mark.parametrize("vocabulary", [10, 120])  # encoder input built whole / looked up
def test_a_record_gets_the_same_bits_alone_or_in_any_batch(vocabulary):
    """The encoder and the fused MLP give a record the same float32 bits whatever else is in
    its batch: oneDNN's GEMM does not depend on the number of rows, and a single row (its
    matrix-vector kernel sums in another order) is run as two. (MKL's sgemm, the eager path,
    differs in the last bit for 1-11 rows on AVX2 CPUs.)"""
    torch.manual_seed(5)
    config = VAEConfig(n_continuous=6, n_boolean=1, category_sizes=[vocabulary, 7])
    model = VAE(config).eval()
    narrow = config.encoder_input_dim <= config.hidden[0]
    assert narrow == (vocabulary == 10)
    n = 500
    x = torch.randn(n, config.n_features)
    x[:, 6] = (x[:, 6] > 0).float()
    x[:, 7] = torch.randint(0, vocabulary, (n,)).float()
    x[:, 8] = torch.randint(0, 7, (n,)).float()
    mask = torch.rand(n, config.n_features) > 0.1
    z = torch.randn(3, n, config.latent_dim)
    with torch.inference_mode():
        whole = model.encoder(x, mask)
        decoded = fused.run(model.decoder.net, z)
        for size in (1, 2, 3, 7, 64):
            parts = [model.encoder(x[i : i + size], mask[i : i + size]) for i in range(0, n, size)]
            assert torch.equal(torch.cat([p.mean for p in parts]), whole.mean), size
            assert torch.equal(torch.cat([p.log_var for p in parts]), whole.log_var), size
            for i in (0, 17):  # one sample of one record, alone
                alone = fused.run(model.decoder.net, z[1:2, i : i + 1])
                assert torch.equal(alone[0, 0], decoded[1, i]), (size, i)
