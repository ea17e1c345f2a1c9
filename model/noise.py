"""The shared latent points of scoring: common random numbers, randomised quasi-Monte Carlo.

Scoring reuses one set of K points for every record (model/estimators.py, "Randomness"):
`noise` draws them as R independently scrambled Sobol sequences of K/R points, through the
normal inverse CDF, so each point is marginally N(0, I), the points cover the space evenly, and
the R replicates give a standard error. `iid_noise` is the i.i.d. baseline they are measured
against, and the fresh noise of training.
"""

from __future__ import annotations

import torch

REPLICATES = 4  # independent scramblings: their spread is the standard error (3 dof)


def replicates(count: int) -> int:
    """How many equal, independent replicates `count` points are drawn as: 4, 3, 2 or 1."""
    return next(r for r in (REPLICATES, 3, 2, 1) if count % r == 0 and count >= r)


def noise(count: int, latent_dim: int, seed: int, stream: int) -> torch.Tensor:
    """(count, latent_dim) float64 points, each marginally N(0, I): `replicates(count)` blocks,
    each a scrambled Sobol sequence with its own seed, through the normal inverse CDF.

    A pure function of (seed, stream, count), made on the CPU, so the same seed gives the same
    points on any device and worker."""
    blocks = replicates(count)
    points = []
    for block in range(blocks):
        engine = torch.quasirandom.SobolEngine(
            latent_dim, scramble=True, seed=_block_seed(seed, stream, block)
        )
        uniform = engine.draw(count // blocks, dtype=torch.float64)
        points.append(torch.special.ndtri(uniform.clamp(2.0**-53, 1.0 - 2.0**-53)))
    return torch.cat(points)


def iid_noise(count: int, latent_dim: int, seed: int, stream: int) -> torch.Tensor:
    """(count, latent_dim) i.i.d. standard normals from the seed: the baseline `noise` is
    measured against (bench/estimators.py), and fresh noise for training."""
    generator = torch.Generator(device="cpu").manual_seed(_block_seed(seed, stream, 0))
    return torch.randn((count, latent_dim), generator=generator, dtype=torch.float64)


def _block_seed(seed: int, stream: int, block: int) -> int:
    return (int(seed) * 1_000_003 + stream * 7_919 + block) % (2**63 - 1)
