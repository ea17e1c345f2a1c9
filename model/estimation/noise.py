"""The shared latent points of scoring: common random numbers, randomised designs.

Scoring reuses one set of K points for every record (model/estimation/estimators.py, "Randomness"),
drawn
as R independent replicates of K/R points, each point marginally N(0, I), so the ELBO stays
unbiased, the IWAE keeps its bound, and the replicates' spread is a standard error. Two designs
of a replicate (`DESIGNS`; a model records the one it was calibrated with):

- `spherical` (defaults.POINTS since 2026-12-04): the points' directions are the vertices of
  regular simplices centred on 0 (groups of up to D + 1 points, each group turned by its own
  uniformly random rotation), their radii stratified quantiles of the chi distribution with D
  degrees of freedom (one radius from each of K/R equal-probability strata, in random order). A
  direction uniform on the sphere times an independent chi radius is N(0, I); within a group
  the directions cancel (their sum is 0), a generalisation of antithetic pairs, and the radii
  cover the distance from the posterior's centre evenly. That wins while a replicate holds a
  few simplices; from more than SIMPLICES x (D + 1) points a replicate, a Sobol sequence fills
  the space better (its error falls faster with K), so those replicates are Sobol's.
  bench/notes/, "Rotated simplices with stratified radii".
- `sobol`: scrambled Sobol sequences through the normal inverse CDF (models saved before it:
  model/artifact.py).

`iid_noise` is the i.i.d. baseline they are measured against, and the fresh noise of training.
"""

from __future__ import annotations

import functools
import math

import torch

from vaewatch.model import defaults
from vaewatch.model.choices import Points

REPLICATES = 4  # independent replicates: their spread is the standard error (3 dof)
SPHERICAL, SOBOL = Points.SPHERICAL.value, Points.SOBOL.value
DESIGNS = Points.values()
SIMPLICES = 2  # replicates of at most this many simplices' points are spherical, larger Sobol's


def replicates(count: int) -> int:
    """How many equal, independent replicates `count` points are drawn as: 4, 3, 2 or 1."""
    return next(r for r in (REPLICATES, 3, 2, 1) if count % r == 0 and count >= r)


def noise(
    count: int, latent_dim: int, seed: int, stream: int, points: str = defaults.POINTS
) -> torch.Tensor:
    """(count, latent_dim) float64 points, each marginally N(0, I): `replicates(count)`
    independent blocks of the design `points`.

    A pure function of its arguments, made on the CPU, so the same seed gives the same points on
    any device and worker. Cached: treat the tensor as read-only."""
    if _simplices(count, latent_dim, points):
        return _spherical(count, latent_dim, seed, stream)
    return _sobol(count, latent_dim, seed, stream)


def _simplices(count: int, latent_dim: int, points: str) -> bool:
    """Whether `count` points of the design `points` are rotated simplices (else Sobol's)."""
    Points.check("points", points)
    return points == SPHERICAL and count // replicates(count) <= SIMPLICES * (latent_dim + 1)


@functools.lru_cache(maxsize=32)
def _spherical(count: int, latent_dim: int, seed: int, stream: int) -> torch.Tensor:
    directions, u = _spherical_parts(count, latent_dim, seed, stream)
    return directions * _chi_quantile(u, latent_dim)[:, None]


def _spherical_parts(
    count: int, latent_dim: int, seed: int, stream: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """((count, latent_dim) unit directions, (count,) the stratified uniforms of their radii)."""
    blocks, d = replicates(count), latent_dim
    size = count // blocks
    generator = torch.Generator(device="cpu").manual_seed(_block_seed(seed, stream, 0))
    directions, uniforms = [], []
    for _ in range(blocks):
        for start in range(0, size, d + 1):
            n = min(d + 1, size - start)
            frame = _random_frame(max(n - 1, 1), d, generator)  # (n - 1, d) orthonormal rows
            directions.append(_simplex(n) @ frame if n > 1 else frame)
        strata = torch.randperm(size, generator=generator).to(torch.float64)
        uniforms.append(
            (strata + torch.rand(size, generator=generator, dtype=torch.float64)) / size
        )
    return torch.cat(directions), torch.cat(uniforms)


@functools.lru_cache(maxsize=64)
def _simplex(n: int) -> torch.Tensor:
    """(n, n - 1): the unit vertices of a regular simplex centred on 0 (sum 0, equal angles).
    Cached: read-only."""
    centred = torch.eye(n, dtype=torch.float64) - 1.0 / n  # rank n - 1, rows of norm sqrt(1-1/n)
    basis = torch.zeros(n, n - 1, dtype=torch.float64)  # an orthonormal basis of that space
    for j in range(n - 1):  # (1, -1, 0...)/sqrt2, (1, 1, -2, 0...)/sqrt6, ...: Helmert's
        basis[: j + 1, j] = 1.0
        basis[j + 1, j] = -(j + 1.0)
        basis[:, j] /= math.sqrt((j + 1.0) * (j + 2.0))
    return centred @ basis / math.sqrt(1.0 - 1.0 / n)


def _random_frame(rows: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, d) orthonormal rows, uniformly distributed (Gram-Schmidt of Gaussian vectors)."""
    uniform = torch.rand((rows, d), generator=generator, dtype=torch.float64)
    vectors = torch.special.ndtri(uniform.clamp(2.0**-53, 1.0 - 2.0**-53))
    frame = []
    for v in vectors:
        for f in frame:
            v = v - (v * f).sum() * f
        frame.append(v / v.norm())
    return torch.stack(frame)


def _chi_quantile(u: torch.Tensor, d: int) -> torch.Tensor:
    """The radius r with P(|N(0, I_d)| <= r) = u, by bisection on the regularised gamma
    function (64 halvings of [0, sqrt(d) + 40]: to float64 resolution)."""
    lo, hi = torch.zeros_like(u), torch.full_like(u, math.sqrt(d) + 40.0)
    shape = torch.tensor(d / 2.0, dtype=torch.float64)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        below = torch.special.gammainc(shape, 0.5 * mid * mid) < u
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=32)
def _sobol(count: int, latent_dim: int, seed: int, stream: int) -> torch.Tensor:
    blocks = replicates(count)
    points = []
    for block in range(blocks):
        engine = torch.quasirandom.SobolEngine(
            latent_dim, scramble=True, seed=_block_seed(seed, stream, block)
        )
        uniform = engine.draw(count // blocks, dtype=torch.float64)
        points.append(torch.special.ndtri(uniform.clamp(2.0**-53, 1.0 - 2.0**-53)))
    return torch.cat(points)


def independent_draws(
    draws: int, count: int, latent_dim: int, seed: int, stream: int, points: str = defaults.POINTS
) -> torch.Tensor:
    """(draws, count, latent_dim): `draws` independent copies of `noise(count, ...)`, from seeds
    derived from `seed` on `stream` (one that scoring does not use), for a question about the
    design's expected behaviour rather than one draw's luck (model/estimation/proposal.py). Not
    cached."""
    seeds = [seed * draws + j for j in range(draws)]
    if _simplices(count, latent_dim, points):
        parts = [_spherical_parts(count, latent_dim, s, stream) for s in seeds]
        directions = torch.stack([p[0] for p in parts])
        radii = _chi_quantile(torch.stack([p[1] for p in parts]), latent_dim)  # one bisection
        return directions * radii[..., None]
    return torch.stack([_sobol.__wrapped__(count, latent_dim, s, stream) for s in seeds])


def iid_noise(count: int, latent_dim: int, seed: int, stream: int) -> torch.Tensor:
    """(count, latent_dim) i.i.d. standard normals from the seed: the baseline `noise` is
    measured against (bench/estimators.py), and fresh noise for training."""
    generator = torch.Generator(device="cpu").manual_seed(_block_seed(seed, stream, 0))
    return torch.randn((count, latent_dim), generator=generator, dtype=torch.float64)


def _block_seed(seed: int, stream: int, block: int) -> int:
    return (int(seed) * 1_000_003 + stream * 7_919 + block) % (2**63 - 1)
