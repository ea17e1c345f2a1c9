"""Run in a fresh process: peak resident memory added by one IWAE call under a byte budget.

Prints one JSON line {"budget": ..., "peak_delta": ...}. Used by test_estimators.py. The peak is
the kernel's high-water mark of this process's resident set (VmHWM), reset just before the call
by writing 5 to /proc/self/clear_refs. (getrusage's ru_maxrss is no use here: Linux carries it
over from the parent across fork+exec, so a child of a large pytest process starts "peaked".)
"""

import json
import sys
from pathlib import Path

import torch

from vaewatch.model.estimation.estimators import iwae
from vaewatch.model.network.vae import VAE, VAEConfig


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def reset_peak() -> int:
    """Reset the high-water mark to the current RSS and return that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


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
        before = reset_peak()
        result = iwae(model, x, mask, k=k, memory_budget=budget, contributions=True)
        after = peak_rss_bytes()
    assert torch.isfinite(result.log_likelihood).all()
    print(json.dumps({"budget": budget, "peak_delta": after - before}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
