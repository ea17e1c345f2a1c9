"""Feature encoding: Arrow columns <-> the (x, mask) tensors the VAE reads.

A `FeatureSpec` is fitted once, at training, from Parquet record batches (streamed: it never
needs the whole table in memory), stored as JSON inside the model artifact, and applied to every
batch at scoring time. Three kinds of feature:

- continuous (any integer or floating column): standardised with the training mean and std.
  The std is kept so log-densities can be reported in the column's original units.
- boolean: 0/1, modelled as Bernoulli.
- categorical (string, large_string, dictionary<string>, or any column the user names): a
  vocabulary of the training values (most frequent first, capped), plus one out-of-vocabulary
  bucket at index len(vocabulary) for everything else.

Encoded layout: `x` and `mask` are (B, F) with features grouped by kind, in the order
continuous, boolean, categorical (each group keeps the user's column order). Categorical
entries of `x` hold the integer code as a float. A missing value (null, or NaN in a float
column) has mask False and x 0. Everything is vectorised with pyarrow.compute / numpy.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from model.errors import UserError

SPEC_FORMAT_VERSION = 1
# Values further than this many training standard deviations from the mean cannot be scored in
# float32: the Gaussian term (x - mu)^2 / sigma^2 overflows near (1e17)^2 with the variance
# floor. 1e15 leaves margin; anything this far out (1e308 sent as a sentinel, say) is rejected
# as value_out_of_range instead of producing a NaN score.
MAX_STANDARDISED = 1e15


class FeatureKind(str, enum.Enum):
    CONTINUOUS = "continuous"
    BOOLEAN = "boolean"
    CATEGORICAL = "categorical"


KIND_ORDER = (FeatureKind.CONTINUOUS, FeatureKind.BOOLEAN, FeatureKind.CATEGORICAL)


class SchemaMismatchError(UserError):
    """A column the model needs is missing from the data, or has a type it cannot use."""


class RowProblem(enum.IntEnum):
    """Why a row cannot be scored (0 means it can). Stable codes: they end up in `reason`."""

    OK = 0
    NON_FINITE = 1  # a continuous value is +inf or -inf
    ALL_MISSING = 2  # every model feature is null/NaN: there is nothing to score
    OUT_OF_RANGE = 3  # a continuous value is over MAX_STANDARDISED training stds from the mean

    @property
    def reason(self) -> str:
        return {
            RowProblem.OK: "",
            RowProblem.NON_FINITE: "non_finite_value",
            RowProblem.ALL_MISSING: "all_features_missing",
            RowProblem.OUT_OF_RANGE: "value_out_of_range",
        }[self]


@dataclass
class Feature:
    name: str
    kind: FeatureKind
    mean: float = 0.0  # continuous only: training mean, original units
    std: float = 1.0  # continuous only: training std (1.0 for a constant column)
    vocabulary: list[str] = field(default_factory=list)  # categorical only
    # continuous only: the grid every training value lies on (1.0 for integer-valued columns,
    # 0.01 for cents, ...; a power of ten <= 1), None when the values are not on such a grid
    resolution: float | None = None

    @property
    def cardinality(self) -> int:
        """Number of categorical classes the decoder predicts, out-of-vocabulary included."""
        return len(self.vocabulary) + 1

    def to_json(self) -> dict:
        out = {"name": self.name, "kind": self.kind.value}
        if self.kind is FeatureKind.CONTINUOUS:
            out.update(mean=self.mean, std=self.std, resolution=self.resolution)
        if self.kind is FeatureKind.CATEGORICAL:
            out["vocabulary"] = list(self.vocabulary)
        return out

    @classmethod
    def from_json(cls, d: dict) -> Feature:
        return cls(
            name=d["name"],
            kind=FeatureKind(d["kind"]),
            mean=float(d.get("mean", 0.0)),
            std=float(d.get("std", 1.0)),
            vocabulary=list(d.get("vocabulary", [])),
            resolution=d.get("resolution"),
        )


@dataclass
class EncodedBatch:
    x: torch.Tensor  # (B, F) float32, features grouped by kind
    mask: torch.Tensor  # (B, F) bool, True where the value is observed
    problems: np.ndarray  # (B,) uint8 RowProblem codes; rows with a code != 0 must not be scored

    @property
    def ok(self) -> np.ndarray:
        return self.problems == RowProblem.OK


def _kind_of(arrow_type: pa.DataType) -> FeatureKind | None:
    if pa.types.is_boolean(arrow_type):
        return FeatureKind.BOOLEAN
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return FeatureKind.CONTINUOUS
    if pa.types.is_decimal(arrow_type):
        return FeatureKind.CONTINUOUS
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return FeatureKind.CATEGORICAL
    if pa.types.is_dictionary(arrow_type) and (
        pa.types.is_string(arrow_type.value_type) or pa.types.is_large_string(arrow_type.value_type)
    ):
        return FeatureKind.CATEGORICAL
    return None  # timestamps, binary, nested: never features unless the user says otherwise


def _to_float64(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """A numeric/boolean column as float64 numpy, nulls as NaN. Integers beyond 2^53 round to
    the nearest float64 (a safe cast would refuse the whole batch for one such value; found by
    the hostile-input property test)."""
    try:
        options = pc.CastOptions(pa.float64(), allow_float_truncate=True)
        as_float = pc.cast(column, options=options)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise SchemaMismatchError(
            f"column {name!r} has type {column.type}, which cannot be read as a number: {err}"
        ) from err
    return np.asarray(pc.fill_null(as_float, math.nan).to_numpy(zero_copy_only=False))


def _to_string(column: pa.ChunkedArray | pa.Array, name: str) -> pa.Array:
    """A categorical column as a plain string array (dictionary decoded, numbers formatted)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise SchemaMismatchError(
            f"column {name!r} has type {column.type}, which cannot be read as a category: {err}"
        ) from err


class _RunningMoments:
    """Streaming mean and variance (Chan et al. parallel update), exact in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        n_b = values.size
        if n_b == 0:
            return
        mean_b = float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    @property
    def std(self) -> float:
        if self.n < 2:
            return 1.0
        std = math.sqrt(self.m2 / self.n)
        return std if std > 0.0 and math.isfinite(std) else 1.0


class _Grid:
    """The coarsest power of ten (10^0 down to 10^-6) that every finite value is a multiple of.

    Counts, ages and pixel intensities are integers; prices are whole cents. A Gaussian decoder
    can shrink its variance without limit on values that repeat exactly, and the likelihood of
    such a column then measures float noise, not surprise; the resolution lets the model keep
    its variance at or above the grid's own quantisation noise (r^2 / 12).
    """

    FINEST = -6

    def __init__(self) -> None:
        self.exponent = 0

    def update(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        while self.exponent >= self.FINEST and values.size:
            q = values / 10.0**self.exponent
            if np.all(np.abs(q - np.round(q)) <= 1e-9 * np.maximum(1.0, np.abs(q))):
                return
            self.exponent -= 1

    @property
    def resolution(self) -> float | None:
        return 10.0**self.exponent if self.exponent >= self.FINEST else None


@dataclass
class FeatureSpec:
    features: list[Feature]  # grouped by kind in KIND_ORDER; this order is the tensor layout

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        data: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch],
        *,
        exclude: Sequence[str] = (),
        features: Sequence[str] | None = None,
        categorical: Sequence[str] = (),
        continuous: Sequence[str] = (),
        max_categories: int = 1000,
        min_category_count: int = 1,
    ) -> FeatureSpec:
        """Fit from a table or a stream of record batches (one pass, bounded memory).

        `features` names the columns to use (default: every column with a usable type);
        `exclude` removes columns (ids, timestamps); `categorical` forces integer columns to be
        treated as categories; `continuous` asserts that the named columns are numeric (and
        makes them features even if `features` does not list them). Vocabulary: values seen at
        least `min_category_count` times, the `max_categories` most frequent, ties broken by
        value so the result is deterministic.
        """
        batches = _as_batches(data)
        first = next(batches, None)
        if first is None:
            raise UserError("cannot fit a FeatureSpec on no data: the input has no record batches")
        schema = first.schema
        chosen = _choose_columns(
            schema,
            exclude=exclude,
            features=features,
            categorical=categorical,
            continuous=continuous,
        )

        moments = {n: _RunningMoments() for n, k in chosen if k is FeatureKind.CONTINUOUS}
        grids = {n: _Grid() for n in moments}
        counts = {n: Counter() for n, k in chosen if k is FeatureKind.CATEGORICAL}
        observed = {n: 0 for n, _ in chosen}
        for batch in itertools.chain([first], batches):
            for name, kind in chosen:
                column = batch.column(name)
                observed[name] += len(column) - column.null_count
                if kind is FeatureKind.CONTINUOUS:
                    values = _to_float64(column, name)
                    observed[name] -= int(np.isnan(values).sum()) - column.null_count
                    moments[name].update(values)
                    grids[name].update(values)
                elif kind is FeatureKind.CATEGORICAL:
                    vc = pc.value_counts(_to_string(column, name).drop_null())
                    for value, count in zip(
                        vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True
                    ):
                        counts[name][value] += count

        empty = [name for name, n in observed.items() if n == 0]
        if empty:
            raise UserError(
                f"feature column(s) {empty} have no non-null values in the training data; "
                "exclude them (--exclude) or fix the data"
            )

        fitted = []
        for name, kind in chosen:
            if kind is FeatureKind.CONTINUOUS:
                m = moments[name]
                fitted.append(
                    Feature(name, kind, mean=m.mean, std=m.std, resolution=grids[name].resolution)
                )
            elif kind is FeatureKind.CATEGORICAL:
                ranked = sorted(
                    (item for item in counts[name].items() if item[1] >= min_category_count),
                    key=lambda item: (-item[1], item[0]),
                )
                fitted.append(
                    Feature(name, kind, vocabulary=[v for v, _ in ranked[:max_categories]])
                )
            else:
                fitted.append(Feature(name, kind))
        return cls(_grouped(fitted))

    # ------------------------------------------------------------------ layout
    def names(self, kind: FeatureKind | None = None) -> list[str]:
        return [f.name for f in self.features if kind is None or f.kind is kind]

    def count(self, kind: FeatureKind) -> int:
        return sum(f.kind is kind for f in self.features)

    @property
    def category_sizes(self) -> list[int]:
        return [f.cardinality for f in self.features if f.kind is FeatureKind.CATEGORICAL]

    @property
    def quantisation_variance(self) -> list[float]:
        """Per continuous feature, in standardised units: the variance of rounding to the
        feature's grid, (resolution / std)^2 / 12, capped at 1 (the marginal's own variance);
        0 for a feature not on a grid. The decoder never goes below it."""
        return [
            min(1.0, (f.resolution / f.std) ** 2 / 12.0) if f.resolution else 0.0
            for f in self.features
            if f.kind is FeatureKind.CONTINUOUS
        ]

    @property
    def continuous_log_std(self) -> torch.Tensor:
        """(F_cont,) float64: log of each continuous feature's std, the standardisation Jacobian."""
        return torch.tensor(
            [math.log(f.std) for f in self.features if f.kind is FeatureKind.CONTINUOUS],
            dtype=torch.float64,
        )

    # ------------------------------------------------------------------ encoding
    def check_schema(self, schema: pa.Schema) -> None:
        """Raise SchemaMismatchError naming the column, expected and found type."""
        for f in self.features:
            index = schema.get_field_index(f.name)
            if index < 0:
                raise SchemaMismatchError(
                    f"model feature {f.name!r} (expected {f.kind.value}) is missing from the "
                    f"input; input columns are {schema.names}"
                )
            found = schema.field(index).type
            compatible = {
                FeatureKind.CONTINUOUS: lambda t: (
                    _kind_of(t) in (FeatureKind.CONTINUOUS, FeatureKind.BOOLEAN)
                ),
                FeatureKind.BOOLEAN: lambda t: _kind_of(t) is FeatureKind.BOOLEAN,
                FeatureKind.CATEGORICAL: lambda t: _kind_of(t) is not None or pa.types.is_null(t),
            }[f.kind]
            if not (compatible(found) or pa.types.is_null(found)):
                raise SchemaMismatchError(
                    f"model feature {f.name!r} expects a {f.kind.value} column but the input has "
                    f"type {found}; cast the column or retrain the model on this schema"
                )

    def encode(self, data: pa.Table | pa.RecordBatch) -> EncodedBatch:
        """Encode a batch. Vectorised per column; no per-row Python."""
        self.check_schema(data.schema)
        n_rows = data.num_rows
        x = np.zeros((n_rows, len(self.features)), dtype=np.float32)
        mask = np.zeros((n_rows, len(self.features)), dtype=bool)
        non_finite = np.zeros(n_rows, dtype=bool)
        out_of_range = np.zeros(n_rows, dtype=bool)
        for j, f in enumerate(self.features):
            column = data.column(f.name)
            if f.kind is FeatureKind.CATEGORICAL:
                strings = _to_string(column, f.name)
                valid = np.asarray(strings.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
                codes = pc.index_in(strings, value_set=pa.array(f.vocabulary, type=pa.string()))
                codes = pc.fill_null(codes, len(f.vocabulary))  # unseen -> the OOV bucket
                values = np.asarray(codes.to_numpy(zero_copy_only=False), dtype=np.float32)
            else:
                raw = _to_float64(column, f.name)
                valid = ~np.isnan(raw)
                if f.kind is FeatureKind.CONTINUOUS:
                    inf = np.isinf(raw)
                    non_finite |= inf
                    valid &= ~inf
                    values = (raw - f.mean) / f.std
                    far = valid & (np.abs(values) > MAX_STANDARDISED)
                    out_of_range |= far
                    valid &= ~far
                else:
                    values = raw
            x[:, j] = np.where(valid, values, 0.0)
            mask[:, j] = valid
        problems = np.zeros(n_rows, dtype=np.uint8)
        problems[~mask.any(axis=1)] = RowProblem.ALL_MISSING
        problems[out_of_range] = RowProblem.OUT_OF_RANGE
        problems[non_finite] = RowProblem.NON_FINITE
        return EncodedBatch(torch.from_numpy(x), torch.from_numpy(mask), problems)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        return {
            "format_version": SPEC_FORMAT_VERSION,
            "features": [f.to_json() for f in self.features],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, d: dict) -> FeatureSpec:
        version = d.get("format_version")
        if version != SPEC_FORMAT_VERSION:
            raise UserError(
                f"feature spec has format_version {version!r}; this vaewatch reads "
                f"{SPEC_FORMAT_VERSION}. Retrain the model or upgrade vaewatch."
            )
        return cls(_grouped([Feature.from_json(item) for item in d["features"]]))

    @classmethod
    def loads(cls, text: str) -> FeatureSpec:
        return cls.from_json(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureSpec) and [asdict(f) for f in self.features] == [
            asdict(f) for f in other.features
        ]


def _grouped(features: list[Feature]) -> list[Feature]:
    return [f for kind in KIND_ORDER for f in features if f.kind is kind]


def _as_batches(data) -> Iterable[pa.RecordBatch]:
    if isinstance(data, pa.Table):
        return iter(data.to_batches())
    if isinstance(data, pa.RecordBatch):
        return iter([data])
    return iter(data)


def _choose_columns(
    schema: pa.Schema,
    *,
    exclude: Sequence[str],
    features: Sequence[str] | None,
    categorical: Sequence[str],
    continuous: Sequence[str] = (),
) -> list[tuple[str, FeatureKind]]:
    for group, names in (
        ("exclude", exclude),
        ("features", features or ()),
        ("categorical", categorical),
        ("continuous", continuous),
    ):
        missing = [n for n in names if n not in schema.names]
        if missing:
            raise SchemaMismatchError(
                f"{group} names column(s) {missing} that are not in the data; "
                f"the data has columns {schema.names}"
            )
    both = sorted(set(categorical) & set(continuous))
    if both:
        raise SchemaMismatchError(f"column(s) {both} are named both categorical and continuous")
    for name in continuous:
        arrow_type = schema.field(name).type
        if _kind_of(arrow_type) is not FeatureKind.CONTINUOUS:
            raise SchemaMismatchError(
                f"column {name!r} is named continuous but has type {arrow_type}, which is not "
                "numeric; cast it to a number in the data, or drop it from --continuous "
                "(string columns are modelled as categorical)"
            )
    names = list(features) if features is not None else list(schema.names)
    names += [n for n in continuous if n not in names]
    chosen = []
    for name in names:
        if name in exclude:
            continue
        arrow_type = schema.field(name).type
        kind = FeatureKind.CATEGORICAL if name in categorical else _kind_of(arrow_type)
        if kind is None:
            if features is not None:
                raise SchemaMismatchError(
                    f"column {name!r} has type {arrow_type}, which vaewatch cannot model; "
                    "use numeric, boolean or string columns, or drop it from --features"
                )
            continue  # silently skipped only when the user did not ask for it
        chosen.append((name, kind))
    if not chosen:
        raise SchemaMismatchError(
            f"no usable feature columns: the data has {schema.names} (types "
            f"{[str(t) for t in schema.types]}); after exclusions nothing numeric, boolean or "
            "string is left"
        )
    return chosen
