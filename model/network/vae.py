"""The variational autoencoder: an MLP encoder q(z|x) and a decoder p(x|z) with one likelihood per
feature kind. Reads top to bottom: config, building blocks, encoder, decoder, the model.

Everything here works in *standardised* units (what FeatureSpec.encode produces). Converting
log-densities back to the original units is the estimators' job (model/estimation/estimators.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vaewatch.model import defaults
from vaewatch.model.choices import Missingness
from vaewatch.model.data.features import FeatureKind, FeatureSpec
from vaewatch.model.network import fused
from vaewatch.model.network.categorical import Categories, layout

LOG_2PI = math.log(2.0 * math.pi)
MISSINGNESS = Missingness.values()


@dataclass
class VAEConfig:
    n_continuous: int = 0  # Gaussian features, standardised
    n_boolean: int = 0  # Bernoulli features
    category_sizes: list[int] = field(default_factory=list)  # classes per categorical, OOV included
    latent_dim: int = defaults.LATENT_DIM  # reasons for both: model/defaults.py
    hidden: list[int] = field(default_factory=lambda: list(defaults.HIDDEN))
    activation: str = "relu"  # cheapest on CPU: SiLU cost 19% of IWAE time for no quality gain seen
    min_variance: float = 1e-4  # Gaussian variance floor (std units): stops densities blowing up
    # per continuous feature, a higher floor where the values lie on a grid (integers, cents):
    # the grid's quantisation variance in std units (FeatureSpec.quantisation_variance)
    variance_floor: list[float] = field(default_factory=list)
    max_variance: float = 1e4  # and a ceiling, so a diverging head cannot produce inf/NaN
    encoder_log_var_range: tuple[float, float] = (-12.0, 6.0)  # keeps q(z|x) numerically sane
    # zero-inflated continuous features (indices among the continuous ones) and the standardised
    # value of each one's point mass: p(x) = pi(z) at the atom, (1 - pi(z)) N(x; mu, s2) elsewhere
    atom_features: list[int] = field(default_factory=list)
    atom_values: list[float] = field(default_factory=list)
    # features (indices in the layout) whose observation is modelled: a Bernoulli decoded from z
    # gives log p(missing | z) for a missing value and log p(observed | z) for an observed one
    missing_features: list[int] = field(default_factory=list)
    # per feature, the log-probability charged for a missing value of a feature that was never
    # missing in training (no Bernoulli to learn); empty = 0 for all (marginalise)
    missing_log_prob: list[float] = field(default_factory=list)
    # a categorical with at least this many classes (OOV included) is decoded as a two-level
    # softmax (model/network/categorical.py); 0: none
    two_level_min: int = 0

    @classmethod
    def for_spec(cls, spec: FeatureSpec, missingness: str = "model", **overrides) -> VAEConfig:
        """`missingness`: "model" (the observation pattern is part of the record) or "marginal"
        (a missing value is marginalised out and costs nothing: the density of what was
        observed)."""
        Missingness.check("missingness", missingness)
        continuous = [f for f in spec.features if f.kind is FeatureKind.CONTINUOUS]
        atoms = [(j, f.atom) for j, f in enumerate(continuous) if f.zero_atom]
        modelled = missingness == "model"
        # a value never missing in `rows` training rows: the rule of succession's estimate,
        # (0 + 1/2) / (rows + 1), for the chance of it missing now
        unseen = math.log(0.5 / (spec.rows + 1)) if modelled and spec.rows else 0.0
        return cls(
            n_continuous=len(continuous),
            n_boolean=spec.count(FeatureKind.BOOLEAN),
            category_sizes=spec.category_sizes,
            atom_features=[j for j, _ in atoms],
            atom_values=[v for _, v in atoms],
            missing_features=(
                [j for j, f in enumerate(spec.features) if f.missing_share > 0] if modelled else []
            ),
            missing_log_prob=[0.0 if f.missing_share > 0 else unseen for f in spec.features],
            **{
                "variance_floor": spec.quantisation_variance,
                "two_level_min": defaults.TWO_LEVEL_MIN_CLASSES,
                **overrides,
            },
        )

    @property
    def n_features(self) -> int:
        return self.n_continuous + self.n_boolean + len(self.category_sizes)

    @property
    def encoder_input_dim(self) -> int:
        # observed values (continuous, boolean), one-hot categories, then the observation mask
        return self.n_continuous + self.n_boolean + sum(self.category_sizes) + self.n_features

    def category_offsets(self) -> torch.Tensor:
        """(n_cat,) long: where each categorical's block starts in the flat one-hot vector."""
        return torch.tensor([0, *self.category_sizes[:-1]], dtype=torch.long).cumsum(0)

    @property
    def decoder_output_dim(self) -> int:
        # mean and log-variance per continuous feature, a logit per boolean, logits per category,
        # a point-mass logit per zero-inflated feature, a missingness logit per modelled feature
        return (
            2 * self.n_continuous
            + self.n_boolean
            + self.category_logit_rows
            + len(self.atom_features)
            + len(self.missing_features)
        )

    @property
    def category_logit_rows(self) -> int:
        """Rows of the decoder's last layer that hold categorical logits
        (model/network/categorical.py)."""
        return sum(layout(self.category_sizes, self.two_level_min)[0])

    def to_json(self) -> dict:
        d = asdict(self)
        d["encoder_log_var_range"] = list(self.encoder_log_var_range)
        return d

    @classmethod
    def from_json(cls, d: dict) -> VAEConfig:
        d = dict(d)
        d["encoder_log_var_range"] = tuple(d["encoder_log_var_range"])
        return cls(**d)


_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
_INPLACE = {"silu": {"inplace": True}, "relu": {"inplace": True}}  # saves a pass over activations


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers of the given sizes, an activation between them, none after the last."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(_ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation](**_INPLACE.get(activation, {})))
    return nn.Sequential(*layers)


@dataclass
class Posterior:
    mean: torch.Tensor  # (B, D)
    log_var: torch.Tensor  # (B, D)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.log_var)

    def widened(self, scale: float) -> Posterior:
        """The same Gaussian with its standard deviation times `scale` (a wider proposal)."""
        if scale == 1.0:
            return self
        return Posterior(self.mean, self.log_var + 2.0 * math.log(scale))


@dataclass
class FeatureLogProbs:
    """log p(x_j | z) per feature, in the spec's feature order (continuous, boolean,
    categorical); for a missing x_j the observation model's term (0 when missing values are
    marginalised). One tensor, so the sum over features and the attribution read it in place."""

    values: torch.Tensor  # (..., B, F)
    n_continuous: int
    n_boolean: int

    def total(self) -> torch.Tensor:  # (..., B)
        return self.values.sum(-1)

    def stacked(self) -> torch.Tensor:  # (..., B, F)
        return self.values

    @property
    def continuous(self) -> torch.Tensor:  # (..., B, F_continuous)
        return self.values[..., : self.n_continuous]

    @property
    def boolean(self) -> torch.Tensor:  # (..., B, F_boolean)
        return self.values[..., self.n_continuous : self.n_continuous + self.n_boolean]

    @property
    def categorical(self) -> torch.Tensor:  # (..., B, F_categorical)
        return self.values[..., self.n_continuous + self.n_boolean :]


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.net = mlp(
            [config.encoder_input_dim, *config.hidden, 2 * config.latent_dim], config.activation
        )
        self.register_buffer("category_offsets", config.category_offsets(), persistent=False)

    def inputs(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, F) values + mask -> (B, encoder_input_dim): the values, each category one-hot,
        the mask; missing entries are zero everywhere."""
        c = self.config
        n_num, width = c.n_continuous + c.n_boolean, sum(c.category_sizes)
        observed = mask.to(x.dtype)
        out = torch.zeros(x.shape[0], c.encoder_input_dim, dtype=x.dtype, device=x.device)
        torch.mul(x[:, :n_num], observed[:, :n_num], out=out[:, :n_num])
        codes = x[:, n_num:].long() + self.category_offsets + n_num
        out.scatter_(1, codes, observed[:, n_num:])  # a missing category writes its 0
        out[:, n_num + width :] = observed
        return out

    def first_layer(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The first Linear applied to `inputs(x, mask)` without building the one-hot columns:
        the same function (the one-hot block times W is a lookup of W's columns), computed as
        a dense matmul over the values and the mask plus one `embedding_bag` over the category
        codes. Memory is (B, hidden) whatever the vocabularies: a 20-column table with 1,000
        values each would otherwise materialise 20,000 input columns per record."""
        c, layer = self.config, self.net[0]
        n_num, n_cat = c.n_continuous + c.n_boolean, len(c.category_sizes)
        if n_cat == 0:
            return layer(self.inputs(x, mask))
        observed = mask.to(x.dtype)
        width = sum(c.category_sizes)
        weight = layer.weight  # (hidden, n_num + width + n_features)
        dense_weight = torch.cat([weight[:, :n_num], weight[:, n_num + width :]], dim=1)
        dense = torch.cat([x[:, :n_num] * observed[:, :n_num], observed], dim=1)
        out = fused.linear(dense, dense_weight, layer.bias)  # oneDNN at inference: see fused
        codes = x[:, n_num:].long() + self.category_offsets  # (B, n_cat) rows of the table
        table = weight[:, n_num : n_num + width].t()  # (width, hidden)
        looked_up = F.embedding_bag(
            codes, table, per_sample_weights=observed[:, n_num:].to(table.dtype), mode="sum"
        )
        return out + looked_up.to(out.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Posterior:
        # under bf16 autocast: the MLP's matmuls in bf16, the posterior in the input's precision.
        # At inference an input no wider than the first layer's output is built whole, and the
        # first Linear fuses with its activation like the others (1.5x on 32 features); wider
        # ones take `first_layer`'s lookup, which never builds the one-hot columns.
        narrow = self.config.encoder_input_dim <= self.net[0].out_features
        if narrow and fused.compute_dtype(x) is not None:
            h = fused.run(self.net, self.inputs(x, mask)).to(x.dtype)
        else:
            h = fused.run(self.net[1:], self.first_layer(x, mask)).to(x.dtype)
        mean, log_var = h.chunk(2, dim=-1)
        low, high = self.config.encoder_log_var_range
        return Posterior(mean, log_var.clamp(low, high))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.net = mlp(
            [config.latent_dim, *config.hidden, config.decoder_output_dim], config.activation
        )
        # the categorical logits are rows [2 nc + nb, + category_logit_rows) of the last layer
        first = 2 * config.n_continuous + config.n_boolean
        self.categories = Categories(
            config.category_sizes, first, two_level_min=config.two_level_min
        )
        if self.categories.blocked:  # the last layer's other rows, evaluated apart from them
            end = first + self.categories.rows
            other = [torch.arange(first), torch.arange(end, config.decoder_output_dim)]
            self.register_buffer("other_rows", torch.cat(other), persistent=False)
        floor = [config.min_variance] * config.n_continuous
        if config.variance_floor:
            if len(config.variance_floor) != config.n_continuous:
                raise ValueError(
                    f"variance_floor has {len(config.variance_floor)} entries, "
                    f"expected one per continuous feature ({config.n_continuous})"
                )
            floor = [max(a, b) for a, b in zip(floor, config.variance_floor, strict=True)]
        self.register_buffer(
            "min_log_var", torch.log(torch.tensor(floor, dtype=torch.float32)), persistent=False
        )
        if len(config.atom_values) != len(config.atom_features):
            raise ValueError("atom_values needs one value per entry of atom_features")
        self.register_buffer(
            "atom_index", torch.tensor(config.atom_features, dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "atom_values", torch.tensor(config.atom_values, dtype=torch.float32), persistent=False
        )
        missing = torch.tensor(config.missing_features, dtype=torch.long)
        self.register_buffer("missing_index", missing, persistent=False)
        unseen = config.missing_log_prob or [0.0] * config.n_features
        if len(unseen) != config.n_features:
            raise ValueError(
                f"missing_log_prob needs {config.n_features} entries, got {len(unseen)}"
            )
        self.register_buffer(
            "missing_log_prob", torch.tensor(unseen, dtype=torch.float32), persistent=False
        )

    def log_variance(self, raw: torch.Tensor) -> torch.Tensor:
        """Per-record Gaussian log-variance: the head's output clamped to [floor, max] variance,
        the floor per feature. (A clamp rather than floor + softplus: softplus cost 10% of IWAE
        time on CPU.)"""
        floor = self.min_log_var.to(raw.dtype)
        ceiling = torch.full_like(floor, math.log(self.config.max_variance))
        return torch.clamp(raw, min=floor, max=ceiling)  # one pass over (..., B, F_cont)

    def at_atom(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, n_atoms) bool: the zero-inflated features whose observed value is the atom."""
        values = x[:, : self.config.n_continuous].index_select(1, self.atom_index)
        observed = mask[:, : self.config.n_continuous].index_select(1, self.atom_index)
        return observed & (values == self.atom_values)

    def density_mask(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, n_continuous) bool: the continuous values scored by a density (observed and not
        at a point mass), the ones the standardisation Jacobian applies to."""
        dense = mask[:, : self.config.n_continuous]
        if self.config.atom_features:
            dense = dense.clone()
            dense[:, self.atom_index] &= ~self.at_atom(x, mask)
        return dense

    def log_prob(self, z: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> FeatureLogProbs:
        """z: (..., B, D); x, mask: (B, F) -> per-feature log p(x_j|z), each (..., B, F_kind).

        A missing value contributes log p(missing | z) where missingness is modelled, the
        config's constant for a feature never missing in training, else 0; an observed value
        its density (or point mass) plus log p(observed | z) where missingness is modelled."""
        c = self.config
        nc, nb, n_cat = c.n_continuous, c.n_boolean, len(c.category_sizes)
        x_cont, x_bool, x_cat = x.split([nc, nb, n_cat], dim=-1)
        cat_rows = self.categories.rows  # the layout, computed once when the decoder was built
        widths = [nc, nc, nb, cat_rows, len(c.atom_features), len(c.missing_features)]
        # densities in the input's precision, whatever the MLP's
        if self.categories.blocked:
            hidden, head = fused.run(self.net[:-1], z), self.net[-1]
            # the last layer in the hidden units' dtype once (bf16 at inference: cached)
            weight, bias = (
                fused.cast(head.weight, hidden.dtype),
                fused.cast(head.bias, hidden.dtype),
            )
            rows = self.other_rows
            out = fused.linear(hidden, weight[rows], bias[rows]).to(z.dtype)
            widths[3] = 0
            lp_cat = self.categories.from_hidden(hidden, weight, bias, x_cat.long(), z.dtype)
        else:
            out = fused.run(self.net, z).to(z.dtype)
        mean, raw_log_var, logits_bool, logits_cat, logits_atom, logits_missing = out.split(
            widths, dim=-1
        )
        if not self.categories.blocked:
            lp_cat = self.categories.log_prob(logits_cat, x_cat.long()) if n_cat else logits_cat

        log_var = self.log_variance(raw_log_var)
        # -0.5 (log 2 pi + log s2 + (x - m)^2 / s2); the in-place steps scale addcmul's result,
        # which no backward reads, so training's autograd is unaffected
        lp_cont = torch.addcmul(log_var, (x_cont - mean).square(), torch.exp(-log_var))
        lp_cont = lp_cont.mul_(-0.5).sub_(0.5 * LOG_2PI)
        if c.atom_features:
            at = self.at_atom(x, mask)  # (B, n_atoms)
            dense = lp_cont.index_select(-1, self.atom_index) + F.logsigmoid(-logits_atom)
            mixed = torch.where(at, F.logsigmoid(logits_atom), dense)
            lp_cont = lp_cont.index_copy(-1, self.atom_index, mixed)
        # Bernoulli with logits, x l - softplus(l), as one pass
        lp_bool = -F.binary_cross_entropy_with_logits(
            logits_bool, x_bool.expand_as(logits_bool), reduction="none"
        )
        lp = torch.cat([lp_cont, lp_bool, lp_cat], dim=-1)  # (..., B, F)
        if not bool(mask.all()):  # a pass over (..., B, F) only where something is missing
            lp = torch.where(mask, lp, self.missing_log_prob.to(lp.dtype))
        if c.missing_features:
            observed = mask.index_select(1, self.missing_index)
            # log p(observed) = logsigmoid(-l), log p(missing) = logsigmoid(l)
            sign = torch.where(observed, -1.0, 1.0).to(lp.dtype)
            # in place: lp is a fresh tensor whose producers (cat, where) keep no copy of it
            lp.index_add_(-1, self.missing_index, F.logsigmoid(sign * logits_missing))
        return FeatureLogProbs(lp, n_continuous=nc, n_boolean=nb)

    def distribution(self, z: torch.Tensor, j: int) -> FeatureDistribution:
        """Feature j's p(x_j | z) for z (..., D): only its own rows of the last layer. What
        the explanations mix over the posterior samples (model/estimation/conditionals.py)."""
        c = self.config
        nc, nb = c.n_continuous, c.n_boolean
        hidden = fused.run(self.net[:-1], z).float()
        head = self.net[-1]

        def rows(index: int) -> torch.Tensor:
            weight, bias = head.weight[index].float(), head.bias[index].float()
            return nn.functional.linear(hidden, weight, bias)

        tail = 2 * nc + nb + self.categories.rows  # the point-mass rows, then the missingness rows
        out = FeatureDistribution(FeatureKind.CONTINUOUS, unseen_log_prob=0.0)
        if c.missing_log_prob:
            out.unseen_log_prob = float(c.missing_log_prob[j])
        if j in c.missing_features:
            out.missing_logit = rows(tail + len(c.atom_features) + c.missing_features.index(j))
        if j < nc:
            out.mean = rows(j)
            ceiling = math.log(c.max_variance)
            out.log_var = rows(nc + j).clamp(min=float(self.min_log_var[j]), max=ceiling)
            if j in c.atom_features:
                at = c.atom_features.index(j)
                out.atom_logit, out.atom = rows(tail + at), float(c.atom_values[at])
        elif j < nc + nb:
            out.kind, out.logit = FeatureKind.BOOLEAN, rows(2 * nc + j - nc)
        else:
            out.kind = FeatureKind.CATEGORICAL
            group = j - nc - nb
            out.log_probs = self.categories.distribution(hidden, head.weight, head.bias, group)
        return out


@dataclass
class FeatureDistribution:
    """p(x_j | z) of one feature at each z, float32, standardised units: the decoder's heads for
    it. A continuous feature has `mean` and `log_var` (its Gaussian, the variance clamped as
    `log_prob` clamps it) and, when zero-inflated, `atom_logit` (the point mass at `atom`); a
    boolean has `logit` (of true); a categorical `log_probs` (..., classes). `missing_logit`
    is log p(missing | z) - log p(observed | z) where the feature's observation is modelled,
    else None (`unseen_log_prob`: the constant charged for a missing value, 0 when marginal)."""

    kind: FeatureKind
    mean: torch.Tensor | None = None
    log_var: torch.Tensor | None = None
    atom_logit: torch.Tensor | None = None
    atom: float | None = None
    logit: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    missing_logit: torch.Tensor | None = None
    unseen_log_prob: float = 0.0


def gaussian_kl_dims(posterior: Posterior) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per record and latent dimension, analytic. (B, D)"""
    return 0.5 * (posterior.mean**2 + posterior.log_var.exp() - 1.0 - posterior.log_var)


def gaussian_kl(posterior: Posterior) -> torch.Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) per record, summed over latent dims. (B,)"""
    return gaussian_kl_dims(posterior).sum(-1)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def reset_parameters(self) -> None:
        """Fresh default init of every layer from torch's global RNG (training seeds it)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def check_input(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        n = self.config.n_features
        if x.dim() != 2 or x.shape[1] != n:
            raise ValueError(f"batch has shape {tuple(x.shape)}, model expects (B, {n}) features")
        if mask.shape != x.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, x has {tuple(x.shape)}")
