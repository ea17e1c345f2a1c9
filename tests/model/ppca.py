"""Probabilistic PCA as a VAE with hand-set weights: the one VAE whose log p(x) is closed form.

Generative model (standardised units): z ~ N(0, I_D), x = W z + b + e, e ~ N(0, diag psi).
Marginal: x ~ N(b, W W^T + diag psi). We pick W = diag(sqrt psi) Q diag(lam) with Q orthonormal,
so W^T diag(psi)^-1 W = diag(lam^2) and the exact posterior is diagonal:
    q*(z|x) = N(A (x - b), diag(1 / (1 + lam^2))),  A = diag(1/(1+lam^2)) W^T diag(psi)^-1,
which a linear encoder with a diagonal Gaussian can represent exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from vaewatch.model.data.features import Feature, FeatureKind, FeatureSpec
from vaewatch.model.network.vae import VAE, VAEConfig


@dataclass
class PPCA:
    W: np.ndarray  # (F, D)
    b: np.ndarray  # (F,)
    psi: np.ndarray  # (F,) noise variances
    mean: np.ndarray  # (F,) original-units offset used by the FeatureSpec
    std: np.ndarray  # (F,) original-units scale used by the FeatureSpec

    @property
    def n_features(self) -> int:
        return self.W.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.W.shape[1]

    @property
    def covariance(self) -> np.ndarray:
        return self.W @ self.W.T + np.diag(self.psi)

    @property
    def posterior_var(self) -> np.ndarray:  # (D,)
        return 1.0 / (1.0 + np.diag(self.W.T @ np.diag(1.0 / self.psi) @ self.W))

    @property
    def posterior_gain(self) -> np.ndarray:  # (D, F): A
        return np.diag(self.posterior_var) @ self.W.T @ np.diag(1.0 / self.psi)

    def spec(self) -> FeatureSpec:
        return FeatureSpec(
            [
                Feature(f"x{j}", FeatureKind.CONTINUOUS, mean=float(m), std=float(s))
                for j, (m, s) in enumerate(zip(self.mean, self.std, strict=True))
            ]
        )

    def sample_table(self, n: int, rng: np.random.Generator) -> pa.Table:
        z = rng.standard_normal((n, self.latent_dim))
        x_std = (
            z @ self.W.T + self.b + rng.standard_normal((n, self.n_features)) * np.sqrt(self.psi)
        )
        x = self.mean + self.std * x_std
        return pa.table({f"x{j}": x[:, j] for j in range(self.n_features)})

    def exact_log_likelihood(
        self, table: pa.Table, observed: list[int] | None = None
    ) -> np.ndarray:
        """log p(x_observed) in original units (closed form), per row."""
        idx = np.arange(self.n_features) if observed is None else np.asarray(observed)
        x = np.stack([table.column(f"x{j}").to_numpy() for j in idx], axis=1)
        x_std = (x - self.mean[idx]) / self.std[idx]
        cov = self.covariance[np.ix_(idx, idx)]
        diff = x_std - self.b[idx]
        _, logdet = np.linalg.slogdet(cov)
        maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        log_std_std = -0.5 * (len(idx) * math.log(2 * math.pi) + logdet + maha)
        return log_std_std - np.log(self.std[idx]).sum()

    def to_vae(
        self, mean_scale: float = 1.0, var_scale: float = 1.0, hidden_at_mean: bool = False
    ) -> VAE:
        """A linear VAE with these weights. The encoder is the exact posterior when both scales
        are 1; other values give a deliberately mismatched proposal. A hidden (missing) value
        reads as x_std = 0, or with `hidden_at_mean` as its mean b_j (its term drops out of the
        posterior mean, as a trained encoder learns to do)."""
        n, d = self.n_features, self.latent_dim
        config = VAEConfig(n_continuous=n, latent_dim=d, hidden=[], min_variance=1e-4)
        vae = VAE(config)
        A = self.posterior_gain * mean_scale
        with torch.no_grad():
            enc = vae.encoder.net[0]  # Linear(2n -> 2d): inputs [x, mask], outputs [mu, log_var]
            enc.weight.zero_()
            enc.weight[:d, :n] = torch.tensor(A)
            if hidden_at_mean:  # the mask inputs carry -A b, one feature at a time
                enc.weight[:d, n:] = torch.tensor(-A * self.b[None, :])
            else:
                enc.bias[:d] = torch.tensor(-A @ self.b)
            enc.bias[d:] = torch.tensor(np.log(self.posterior_var * var_scale))
            dec = vae.decoder.net[0]  # Linear(d -> 2n): outputs [mean, log-variance]
            dec.weight.zero_()
            dec.weight[:n] = torch.tensor(self.W)
            dec.bias[:n] = torch.tensor(self.b)
            dec.bias[n:] = torch.tensor(np.log(self.psi))  # the head outputs log-variance
        return vae.eval()


def make_ppca(n_features: int = 20, latent_dim: int = 4, seed: int = 0) -> PPCA:
    rng = np.random.default_rng(seed)
    psi = rng.uniform(0.1, 0.5, n_features)
    Q, _ = np.linalg.qr(rng.standard_normal((n_features, latent_dim)))
    lam = rng.uniform(1.0, 3.0, latent_dim)
    W = np.diag(np.sqrt(psi)) @ Q @ np.diag(lam)
    return PPCA(
        W=W,
        b=rng.normal(0.0, 0.5, n_features),
        psi=psi,
        mean=rng.normal(0.0, 100.0, n_features),
        std=rng.uniform(0.01, 50.0, n_features),
    )
