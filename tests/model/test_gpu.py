"""GPU: train on CUDA (bfloat16 autocast), save, load and score on a CPU-only path.

Skipped without CUDA. Run on a GPU machine with `pytest -m cuda -s` (prints epoch times)."""

import time

import pytest
import torch

from vaewatch.model.artifact import ModelArtifact
from vaewatch.model.calibration import Calibration
from vaewatch.model.estimators import score_records
from vaewatch.model.features import FeatureSpec
from vaewatch.model.synthetic import LABEL_COLUMNS, transactions
from vaewatch.model.training import TrainConfig, train
from vaewatch.model.vae import VAE, VAEConfig

pytestmark = pytest.mark.cuda


def _epoch_seconds(spec, enc, device: str, epochs: int = 3) -> tuple[VAE, float]:
    model = VAE(VAEConfig.for_spec(spec))
    started = time.perf_counter()
    result = train(
        model, enc.x, enc.mask, TrainConfig(epochs=epochs, batch_size=1024, device=device, seed=0)
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, (time.perf_counter() - started) / len(result.history)


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
