"""Run in a fresh process: peak resident memory added by one IWAE call under a byte budget.

Prints one JSON line {"budget": ..., "peak_delta": ...}. Used by test_estimators.py; peak RSS is
per process and only grows, so each measurement needs its own interpreter.
"""

import json
import resource
import sys

import torch

from model.estimators import iwae
from model.vae import VAE, VAEConfig


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(budget: int, records: int, k: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = VAEConfig(n_continuous=6, n_boolean=1, category_sizes=[5], latent_dim=4, hidden=[32])
    model = VAE(config).eval()
    x = torch.randn(records, config.n_features)
    x[:, 6] = (x[:, 6] > 0).float()
    x[:, 7] = torch.randint(0, 5, (records,)).float()
    mask = torch.ones_like(x, dtype=torch.bool)
    with torch.inference_mode():
        iwae(model, x[:64], mask[:64], k=8, memory_budget=budget)  # warm up allocator and kernels
        before = peak_rss_bytes()
        result = iwae(model, x, mask, k=k, memory_budget=budget, contributions=True)
        after = peak_rss_bytes()
    assert torch.isfinite(result.log_likelihood).all()
    print(json.dumps({"budget": budget, "peak_delta": after - before}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
