"""GPU: train on CUDA (bfloat16 autocast), save, load and score on a CPU-only path.

Skipped without CUDA. Run on a GPU machine with `pytest -m cuda -s` (prints epoch times and
the measured gaps)."""

import numpy as np
import pytest
import torch

from vaewatch.model import device as devices
from vaewatch.model.artifact import ModelArtifact
from vaewatch.model.calibration.scores import Calibration
from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.estimation.estimators import score_records
from vaewatch.model.network.vae import VAE, VAEConfig
from vaewatch.model.scoring import Scorer
from vaewatch.model.synthetic import LABEL_COLUMNS, transactions
from vaewatch.model.training.loop import TrainConfig, train

pytestmark = pytest.mark.cuda


def _epoch_seconds(spec, enc, device: str, epochs: int = 3) -> tuple[VAE, float]:
    """Mean seconds of the epochs after the first (which sets up the CUDA context and cuBLAS)."""
    model = VAE(VAEConfig.for_spec(spec))
    result = train(
        model, enc.x, enc.mask, TrainConfig(epochs=epochs, batch_size=1024, device=device, seed=0)
    )
    later = [e.seconds for e in result.history[1:]]
    return model, sum(later) / len(later)


def test_train_on_gpu_then_load_and_score_on_cpu(tmp_path):
    table = transactions(50_000, anomaly_rate=0.01, seed=0)
    spec = FeatureSpec.fit(table, exclude=LABEL_COLUMNS)
    enc = spec.encode(table)
    gpu_model, gpu_epoch = _epoch_seconds(spec, enc, "cuda")
    _, cpu_epoch = _epoch_seconds(spec, enc, "cpu")
    print(f"\nepoch seconds (50k rows, batch 1024): cuda {gpu_epoch:.3f}  cpu {cpu_epoch:.3f}")
    assert next(gpu_model.parameters()).device.type == "cuda"

    log_std = spec.continuous_log_std
    x, mask = enc.x[:2000], enc.mask[:2000]
    on_gpu = score_records(gpu_model, x.cuda(), mask.cuda(), log_std=log_std.cuda(), k=64)
    calibration = Calibration.fit(
        on_gpu.anomaly_score.cpu().numpy(), on_gpu.feature_nll.cpu().numpy()
    )
    ModelArtifact.from_model(gpu_model, spec, calibration).save(tmp_path / "m")

    loaded = ModelArtifact.load(tmp_path / "m").build("cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    on_cpu = score_records(loaded, x, mask, log_std=log_std, k=64)
    # same weights and common random numbers: CPU and GPU agree to float32 round-off
    torch.testing.assert_close(
        on_cpu.log_likelihood, on_gpu.log_likelihood.cpu(), rtol=1e-4, atol=1e-3
    )


def _column(result, name: str) -> np.ndarray:
    return result.aligned()[name].to_numpy(zero_copy_only=False)


def test_cuda_scores_match_cpu_and_bf16_costs_less_than_the_monte_carlo_error(fitted):
    """The bounds of test_precision.py, on CUDA: fp32 there agrees with the CPU's fp32 to
    round-off; bf16 (what `auto` picks on a GPU with bf16) moves ordinary records by less than a
    quarter of their Monte Carlo error and changes at most 1 flag in 1,000."""
    artifact, table = fitted
    cuda = torch.device("cuda")
    assert devices.resolve_precision("auto", cuda) is (
        torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    )
    cpu = Scorer(artifact, model_version="t", device="cpu", precision="fp32").score(table)
    exact = Scorer(artifact, model_version="t", device="cuda", precision="fp32").score(table)
    fast = Scorer(artifact, model_version="t", device="cuda", precision="bf16").score(table)
    c, a, b = (_column(r, "log_likelihood") for r in (cpu, exact, fast))
    se = _column(exact, "log_likelihood_se")
    ok = np.isfinite(a)
    assert (np.isfinite(c) == ok).all() and (np.isfinite(b) == ok).all()
    ordinary = ok & (a > -1000.0)
    cpu_gap = np.abs(c[ordinary] - a[ordinary])
    delta = np.abs(a[ordinary] - b[ordinary])
    flags = [_column(r, "is_anomaly")[ok] for r in (cpu, exact, fast)]
    print(
        f"\ncuda fp32 vs cpu fp32: mean |delta| {cpu_gap.mean():.2e}, max {cpu_gap.max():.2e}; "
        f"cuda bf16 vs fp32: mean {delta.mean():.4f}, max {delta.max():.3f}, median se "
        f"{np.median(se[ordinary]):.4f}, flags changed {(flags[1] != flags[2]).sum()}"
    )
    np.testing.assert_allclose(c[ok], a[ok], rtol=1e-4, atol=1e-3)
    assert (flags[0] != flags[1]).sum() <= 1
    assert delta.mean() < 0.25 * np.median(se[ordinary])
    extreme = ok & ~ordinary
    np.testing.assert_allclose(b[extreme], a[extreme], rtol=0.15)
    assert (flags[1] != flags[2]).mean() <= 1e-3
    assert np.corrcoef(_ranks(a[ok]), _ranks(b[ok]))[0, 1] > 0.999
    assert 0 < delta.mean()  # the bf16 path really ran


def _ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def test_cuda_scores_barely_depend_on_batching(fitted):
    """A record's score must not depend on which bundle it lands in. cuBLAS picks its kernels by
    shape, so on CUDA the same record in a batch of 777 and of 8,000 can be summed in another
    order: the tolerance is stated against the Monte Carlo error, not round-off."""
    artifact, table = fitted
    for precision in ("fp32", "bf16"):
        scorer = Scorer(artifact, model_version="t", device="cuda", precision=precision)
        whole = scorer.score(table)
        parts = np.concatenate(
            [
                _column(scorer.score(table.slice(i, 777)), "log_likelihood")
                for i in range(0, 8000, 777)
            ]
        )
        a, se = _column(whole, "log_likelihood"), _column(whole, "log_likelihood_se")
        ok = np.isfinite(a) & (a > -1000.0)
        gap = np.abs(parts[ok] - a[ok])
        print(
            f"\n{precision} on cuda, batches of 777 vs 8,000: mean |delta| {gap.mean():.2e}, "
            f"max {gap.max():.2e} (median se {np.median(se[ok]):.3f})"
        )
        assert gap.max() < 0.05 * np.median(se[ok]), precision
