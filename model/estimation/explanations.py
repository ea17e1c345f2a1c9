"""The `top_features` column: the features that made each record unusual and, for the flagged
records, what the model expected of each of them, in the data's own units.

Each entry holds (model/contract.py, TOP_FEATURE_FIELDS):
- `feature` and `contribution`: nats above the feature's usual value
  (model/estimation/attribution.py); `basis` says how it was measured;
- for a flagged record within the explanation budget (`basis` "conditional"): the observed value
  as text, and p(x_j | x_-j) (model/estimation/conditionals.py) read in the column's units. A
  number gets the median (`expected`) and the 5-95 % range (`low`, `high`), and `probability`,
  the share of that distribution beyond the observed value on its side of the median. A boolean
  or a category gets the observed class's probability and the `likely` classes. A missing value
  gets p(missing | x_-j). `direction` sums it up (contract.Direction).

A feature after a record's first is measured with the first left out too (attribution.py,
`_chained`); its expectation is read the same way, so a far-out amount does not drag what the
model expects of the hour.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from vaewatch.model.contract import TOP_FEATURE_TYPE, Basis, Direction
from vaewatch.model.data.features import FeatureKind, FeatureSpec
from vaewatch.model.estimation.attribution import Explained, top_indices
from vaewatch.model.estimation.conditionals import Conditionals, conditionals, from_weights
from vaewatch.model.network.vae import VAE

OTHER = "(other)"  # the name of a category's out-of-vocabulary class among the likely ones
_BOOLEAN = ("false", "true")


class Expectations:
    """p(x_j | x_-j) for the listed features of the explained records, as entry fields."""

    def __init__(
        self,
        model: VAE,
        spec: FeatureSpec,
        x: torch.Tensor,
        mask: torch.Tensor,
        explained: Explained,
        estimator: dict,
        source: tuple[pa.Table, np.ndarray] | None = None,
    ):
        """`source`: the input table and the positions of x's rows in it, to show values as
        the input held them (else they are decoded from x)."""
        self.model, self.spec, self.x, self.mask = model, spec, x, mask
        self.explained, self.estimator, self.source = explained, estimator, source

    def fields(self, rows: np.ndarray, features: np.ndarray) -> dict[str, pa.Array]:
        """The expectation fields of entries (rows[e], features[e]), e over every listed entry:
        filled for the explained records, null for the others. Built for the explained entries
        alone, then placed with one `take` (no per-entry Python for the rest)."""
        n = len(rows)
        size = max(int(rows.max(initial=-1)), int(self.explained.rows.max(initial=-1))) + 1
        where = np.full(size, -1, dtype=np.int64)
        where[self.explained.rows] = np.arange(len(self.explained.rows))
        at = np.flatnonzero(where[rows] >= 0) if n else np.zeros(0, dtype=np.int64)
        m = at.size
        out = {
            "direction": np.full(m, None, dtype=object),
            "observed": np.full(m, None, dtype=object),
            "expected": np.full(m, math.nan),
            "low": np.full(m, math.nan),
            "high": np.full(m, math.nan),
            "probability": np.full(m, math.nan),
            "likely": np.full(m, None, dtype=object),
        }
        if m:
            self._fill(out, np.arange(m), rows[at], features[at], where[rows[at]])
        place = np.full(n, -1, dtype=np.int64)
        place[at] = np.arange(m)
        place = pa.array(place, mask=place < 0)
        return {
            "direction": pa.array(out["direction"], pa.string()).take(place),
            "observed": pa.array(out["observed"], pa.string()).take(place),
            **{
                name: pa.array(out[name], pa.float64(), mask=np.isnan(out[name])).take(place)
                for name in ("expected", "low", "high", "probability")
            },
            "likely": pa.array(out["likely"], pa.list_(pa.string())).take(place),
        }

    def _fill(self, out, at, rows, features, explained_at) -> None:
        device = self.x.device
        index = torch.from_numpy(rows).to(device)
        feature = torch.from_numpy(features).to(device)
        x, mask = self.x[index], self.mask[index].clone()
        lead = self.explained.lead[explained_at]
        chained = lead != features  # measured with the record's first feature left out
        if chained.any():
            hide = torch.from_numpy(np.flatnonzero(chained)).to(device)
            mask[hide, torch.from_numpy(lead[chained]).to(device)] = False
        found = self._conditionals(x, mask, feature, explained_at, features, lead)
        observed = mask.gather(1, feature[:, None]).squeeze(1).cpu().numpy()
        values = x.gather(1, feature[:, None]).squeeze(1).to(torch.float64).cpu().numpy()
        out["observed"][at] = self._observed_text(rows, features, values, observed)
        for j in np.unique(features):
            mine = features == j
            e = at[mine]
            f = self.spec.features[j]
            missing = ~observed[mine]
            if f.kind is FeatureKind.CONTINUOUS:
                quantiles = found.quantiles[mine]
                if f.zero_atom:  # a quantile on the point mass is the column's exact 0
                    quantiles = np.where(np.abs(quantiles - f.atom) < 1e-6, np.nan, quantiles)
                low, median, high = np.nan_to_num(f.mean + f.std * quantiles.T, nan=0.0)
                value = f.mean + f.std * values[mine]
                if f.zero_atom:
                    value = np.where(np.abs(values[mine] - f.atom) < 1e-6, 0.0, value)
                cdf = found.cdf[mine]
                out["expected"][e], out["low"][e], out["high"][e] = median, low, high
                out["probability"][e] = np.where(value > median, 1.0 - cdf, cdf)
                out["direction"][e] = np.where(
                    value > high,
                    Direction.ABOVE.value,
                    np.where(value < low, Direction.BELOW.value, Direction.WITHIN.value),
                )
            else:
                names = _BOOLEAN if f.kind is FeatureKind.BOOLEAN else [*f.vocabulary, OTHER]
                unusual = (
                    Direction.UNUSUAL_VALUE
                    if f.kind is FeatureKind.BOOLEAN
                    else Direction.UNUSUAL_CATEGORY
                )
                out["probability"][e] = found.p_observed[mine]
                out["direction"][e] = np.where(
                    found.usual[mine], Direction.WITHIN.value, unusual.value
                )
                out["likely"][e] = [
                    [names[c] for c in codes if c >= 0] for codes in found.likely[mine]
                ]
            if missing.any():
                gone = e[missing]
                out["direction"][gone] = Direction.UNUSUALLY_MISSING.value
                out["probability"][gone] = found.p_missing[mine][missing]

    def _conditionals(self, x, mask, feature, explained_at, features, lead) -> Conditionals:
        """p(x_j | x_-j) of each entry: from the points and weights the leave-one-out passes
        kept for the same pairs (a record's first feature from the first pass, the others from
        the chained one), else by a pass of their own."""
        e = self.explained
        if e.first is None or e.chained is None:
            return conditionals(self.model, x, mask, feature, **self.estimator)
        chained = lead != features
        n_features = x.shape[1]
        index = np.where(
            chained,
            e.chained.find(explained_at, features, n_features),
            e.first.find(explained_at, features, n_features),
        )
        if (index < 0).any():  # a pair neither pass measured (not expected): measure them all
            return conditionals(self.model, x, mask, feature, **self.estimator)
        out = Conditionals.empty(len(features))
        for which, weights in ((~chained, e.first), (chained, e.chained)):
            rows = np.flatnonzero(which)
            if rows.size:
                at = torch.from_numpy(rows).to(x.device)
                out.put(rows, from_weights(self.model, weights, index[rows], x[at], mask[at],
                                           **self.estimator))  # fmt: skip
        return out

    def _observed_text(self, rows, features, values, observed) -> np.ndarray:
        """Each entry's value as the input held it (`source`), else as decoded from x."""
        text = np.full(len(rows), None, dtype=object)
        for j in np.unique(features):
            mine = np.flatnonzero((features == j) & observed)
            if mine.size == 0:
                continue
            f = self.spec.features[j]
            if self.source is not None and f.name in self.source[0].column_names:
                table, positions = self.source
                column = table.column(f.name).take(pa.array(positions[rows[mine]]))
                if pa.types.is_dictionary(column.type):
                    column = column.cast(column.type.value_type)
                text[mine] = pc.cast(column, pa.string()).to_pylist()
            elif f.kind is FeatureKind.CONTINUOUS:
                text[mine] = [repr(float(np.float32(f.mean + f.std * v))) for v in values[mine]]
            elif f.kind is FeatureKind.BOOLEAN:
                text[mine] = [_BOOLEAN[int(v)] for v in values[mine]]
            else:
                names = [*f.vocabulary, OTHER]
                text[mine] = [names[int(v)] for v in values[mine]]
        return text


def top_features(
    excess: np.ndarray,
    names: list[str],
    n: int,
    *,
    basis: np.ndarray | None = None,
    expectations: Expectations | None = None,
) -> pa.ListArray:
    """Per record, up to n features by `excess` ((B, F), contribution above the baseline),
    largest first; only features above their baseline are listed (a missing value only where
    its conditional was measured). `basis` (B,) each record's index in contract.Basis
    (`record_basis`), or None (null);
    `expectations` fills the explained records' fields. One Arrow array, no per-row Python
    outside the explained records."""
    top, values, keep = top_indices(excess, np.zeros(excess.shape[1]), n)
    counts = keep.sum(axis=1)
    offsets = np.zeros(top.shape[0] + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    rows = np.repeat(np.arange(top.shape[0]), counts)
    features = top[keep]
    entries = len(rows)
    if expectations is not None:
        details = expectations.fields(rows, features)
    else:
        details = {
            field.name: pa.nulls(entries, field.type)
            for field in TOP_FEATURE_TYPE.value_type
            if field.name not in ("feature", "contribution", "basis")
        }
    basis_column = (
        pa.nulls(entries, pa.string())
        if basis is None
        else pa.array([b.value for b in Basis], pa.string()).take(pa.array(basis[rows]))
    )
    struct = TOP_FEATURE_TYPE.value_type
    arrays = {
        "feature": pa.array(names, type=pa.string()).take(pa.array(features)),
        "contribution": pa.array(values[keep]),
        "basis": basis_column,
        **details,
    }
    entries_array = pa.StructArray.from_arrays(
        [arrays[field.name] for field in struct], fields=list(struct)
    )
    return pa.ListArray.from_arrays(pa.array(offsets), entries_array, type=TOP_FEATURE_TYPE)


def record_basis(
    flagged: np.ndarray, explained: Explained | None, why_not: Basis | None
) -> np.ndarray:
    """(B,) int8 index in contract.Basis per record: conditional for the explained,
    not_flagged for the rest of the records not flagged, and for the flagged others
    over_budget, or `why_not` when the run measures no conditional at all."""
    code = {b: np.int8(i) for i, b in enumerate(Basis)}
    out = np.where(flagged, code[Basis.OVER_BUDGET], code[Basis.NOT_FLAGGED]).astype(np.int8)
    if why_not is not None:
        out[np.asarray(flagged, dtype=bool)] = code[why_not]
    if explained is not None:
        out[explained.rows] = code[Basis.CONDITIONAL]
    return out
