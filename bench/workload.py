"""The benchmark model and batch of bench/estimators.py and bench/speedup.py: 32 features (24
continuous, 4 boolean, 4 categorical of 10 values + OOV), the default VAEConfig, random but
valid encodings with 5 % of values missing (the estimators' cost does not depend on the values).
Only `VAE` and `VAEConfig` are imported, so earlier commits' code runs it too."""

from __future__ import annotations

import torch

from vaewatch.model.network.vae import VAE, VAEConfig

N_CONTINUOUS, N_BOOLEAN, CATEGORIES = 24, 4, [11, 11, 11, 11]


def model_and_batch(records: int, device: torch.device) -> tuple[VAE, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    config = VAEConfig(n_continuous=N_CONTINUOUS, n_boolean=N_BOOLEAN, category_sizes=CATEGORIES)
    model = VAE(config).eval().to(device)
    x = torch.randn(records, config.n_features)
    x[:, N_CONTINUOUS : N_CONTINUOUS + N_BOOLEAN] = (
        x[:, N_CONTINUOUS : N_CONTINUOUS + N_BOOLEAN] > 0
    ).float()
    x[:, N_CONTINUOUS + N_BOOLEAN :] = torch.randint(0, 11, (records, len(CATEGORIES))).float()
    mask = torch.rand(records, config.n_features) > 0.05
    return model, x.to(device), mask.to(device)
